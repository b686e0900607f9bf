"""The class shapes of the long-tailed benchmarks, and a source of tiny images with that shape on disk.

A shape is what the published split files give: class count, training images in all, the largest and the
smallest class, and how many classes fall in each group of the paper (many > 100, medium 20-100, few < 20
real training images). ``class_counts`` turns it into one count per class that matches every one of those
numbers exactly; the counts are dealt to class indices in a seeded order, as the real lists do not sort
classes by size. ``write_split_file_source`` writes the ImageNet-LT layout (``train/<class>/<i>.jpg``, list
files ``relpath label``, a class-names file) with 16-px JPEGs, so that decoding costs little and every
per-image and per-class code path runs at the real counts.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Shape:
    name: str
    classes: int
    total: int  # training images
    largest: int
    smallest: int
    many: int  # classes with > 100 images
    medium: int  # 20..100
    few: int  # < 20
    test_per_class: int  # the balanced evaluation split the recipes use
    source: str  # where the figures come from


SHAPES = {
    "imagenet-lt": Shape("imagenet-lt", 1000, 115_846, 1280, 5, 385, 479, 136, 50,
                         "Liu et al. 2019 (ImageNet_LT_train.txt; ImageNet_LT_test.txt: 50 per class)"),
    "places-lt": Shape("places-lt", 365, 62_500, 4980, 5, 131, 163, 71, 100,
                       "Places_LT_train.txt / Places_LT_test.txt of facebookresearch/classifier-balancing"),
    "inat2018": Shape("inat2018", 8142, 437_513, 1000, 2, 842, 4076, 3224, 3,
                      "iNaturalist 2018 (iNaturalist18_train.txt; iNaturalist18_val.txt: 3 per class)"),
}


def _spread(n: int, hi: float, lo: float, power: float) -> np.ndarray:
    """``n`` values from ``hi`` down to ``lo``; power > 1 crowds them towards ``lo``."""
    if n == 1:
        return np.array([hi])
    u = np.linspace(0.0, 1.0, n)
    return lo + (hi - lo) * (1.0 - u) ** power


def class_counts(shape: Shape, scale: float = 1.0, seed: int = 0) -> list[int]:
    """One training-image count per class index, matching ``shape`` exactly at scale 1 (total, largest,
    smallest, group sizes). ``scale`` multiplies every count (at least 1 image a class), for the growth
    measurement at a second size: groups then move, the class count does not."""
    assert shape.many + shape.medium + shape.few == shape.classes, shape
    medium = np.round(_spread(shape.medium, 100, 20, 1.0)).astype(int) if shape.medium else np.zeros(0, int)
    few = np.round(_spread(shape.few, 19, shape.smallest, 1.0)).astype(int) if shape.few else np.zeros(0, int)
    rest = shape.total - medium.sum() - few.sum()

    def many_of(power: float) -> np.ndarray:
        m = np.round(_spread(shape.many, shape.largest, 101, power)).astype(int)
        m[0] = shape.largest
        return m

    lo, hi = 0.05, 50.0  # the many group's sum falls as the power grows: bisect for the rest
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if many_of(mid).sum() > rest:
            lo = mid
        else:
            hi = mid
    many = many_of(hi)
    short = int(rest - many.sum())  # a few images off from rounding: +1 to interior classes, in order
    inner = np.arange(1, len(many) - 1)
    for k in range(abs(short)):
        i = inner[k % len(inner)]
        many[i] += 1 if short > 0 else -1
    counts = np.concatenate([many, medium, few])
    assert counts.sum() == shape.total and counts.max() == shape.largest and counts.min() == shape.smallest
    assert (counts > 100).sum() == shape.many and (counts < 20).sum() == shape.few, shape
    order = np.random.default_rng(seed).permutation(shape.classes)
    by_class = np.empty(shape.classes, int)
    by_class[order] = counts
    if scale != 1.0:
        by_class = np.maximum(1, np.round(by_class * scale)).astype(int)
    return [int(c) for c in by_class]


def _tiny_jpegs(label: int, variants: int, side: int) -> list[bytes]:
    rng = np.random.default_rng([label, 17])
    base = rng.integers(0, 256, 3)
    out = []
    for v in range(variants):
        pixels = np.clip(base + rng.integers(-40, 41, (side, side, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_split_file_source(root: Path, counts: list[int], test_per_class: int, side: int = 16,
                            variants: int = 4) -> dict:
    """ImageNet-LT layout under ``root``: ``train.txt``, ``test.txt``, ``classes.txt`` and the images.
    Returns what was written (images, bytes)."""
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)
    train_lines, test_lines, names = [], [], []
    images = size = 0
    for label, n in enumerate(counts):
        jpegs = _tiny_jpegs(label, variants, side)
        folder = f"{label:05d}"
        os.makedirs(root / "train" / folder, exist_ok=True)
        for i in range(n):
            rel = f"train/{folder}/{i:06d}.jpg"
            data = jpegs[i % variants]
            with open(root / rel, "wb") as f:
                f.write(data)
            train_lines.append(f"{rel} {label}\n")
            size += len(data)
        for i in range(test_per_class):
            rel = f"test/{label:05d}_{i:03d}.jpg"
            data = jpegs[(i + 1) % variants]
            with open(root / rel, "wb") as f:
                f.write(data)
            test_lines.append(f"{rel} {label}\n")
            size += len(data)
        images += n + test_per_class
        names.append(f"taxon {label:05d} ({'many' if n > 100 else 'medium' if n >= 20 else 'few'}-shot)\n")
    (root / "train.txt").write_text("".join(train_lines))
    (root / "test.txt").write_text("".join(test_lines))
    (root / "classes.txt").write_text("".join(names))
    return {"images": images, "bytes": size}
