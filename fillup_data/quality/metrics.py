"""FID and precision/recall (Kynkäänniemi et al. 2019) from feature matrices, in plain numpy.

Both take ``[n, dim]`` arrays (here L2-normalised CLIP image features of a class's real and
synthetic images).  They return NaN where the sets are too small to define the value: FID needs two
images per set (a covariance), precision/recall k+1 (a k-th nearest neighbour).
"""

from __future__ import annotations

import numpy as np

K_NEAREST = 3  # Kynkäänniemi et al. 2019 use k=3


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), the FID formula on any features.

    Tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    S_a^1/2 S_b S_a^1/2 (same spectrum), which stays real where scipy's sqrtm can turn complex."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa, sb = np.atleast_2d(sa), np.atleast_2d(sb)
    root = _sqrtm_psd(sa)
    cross = np.linalg.eigvalsh(root @ sb @ root)
    value = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(d, 0, None))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in its own set (itself excluded)."""
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _coverage(points: np.ndarray, manifold: np.ndarray, k: int) -> float:
    """Fraction of ``points`` inside some k-NN ball of ``manifold``."""
    radii = _radii(manifold, k)
    return float(np.mean((_pairwise(points, manifold) <= radii[None, :]).any(axis=1)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K_NEAREST) -> tuple[float, float]:
    """Precision: fraction of synthetic images inside the real manifold (the union of balls reaching
    each real image's k-th nearest real neighbour); recall: fraction of real images inside the
    synthetic manifold.  NaN for a set of k images or fewer."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        return float("nan"), float("nan")
    return _coverage(fake, real, k), _coverage(real, fake, k)
