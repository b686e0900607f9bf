"""``fillup-data quality OUT``: the per-class quality report of a scored build.

Writes ``OUT/quality/``: ``summary.json`` (every number), ``README.md`` (rendered from it), overall and
per-class score histograms, and per class a grid of its best and worst synthetic images by
``clip_score`` with real training images below them (plus a synthetic-only grid, which a repo
published without real images links instead).  FID and precision/recall (k=3) compare a class's
synthetic images with its real training images on the CLIP features ``score`` stored.  Same
input, same bytes: PNGs carry no software or time stamp, JSON is written sorted.

Memory stays bounded at millions of images: the index is read as columns, the stored features are
streamed once into a class-sorted temporary file under ``.fillup/`` and read back one class at a
time; the pooled FID merges per-class moments and the pooled precision/recall (quadratic in the
images) runs on a seeded sample of at most ``pooled_sample`` real and synthetic images.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image

from fillup_data.errors import FillupError
from fillup_data.quality.metrics import (K_NEAREST, PooledMoments, feature_moments, frechet_distance,
                                         frechet_distance_low_rank, frechet_from_moments, frechet_from_pooled,
                                         precision_recall)
from fillup_data.quality.shard_scores import read_shard_scores
from fillup_data.schema.groups import GROUPS
from fillup_data.schema.manifest import Manifest
from fillup_data.schema.scores import NEAR_COPY, SCORE_BY_NAME, SCORE_NAMES
from fillup_data.shards.index_parquet import read_stored_image

QUALITY_DIR = "quality"
REPORT = f"{QUALITY_DIR}/README.md"
SUMMARY = f"{QUALITY_DIR}/summary.json"
HISTOGRAMS = ("clip_score", "class_confidence", "real_similarity")
_THUMB = 64
# Per-class figures go in subfolders of this many classes: 3 files a class stay under the Hub's 10,000 per folder.
CLASSES_PER_FOLDER = 1000
# Pooled precision/recall compares every image of a set with every other: above this many real or synthetic
# images it runs on a seeded sample of this size (10,000 x 10,000 distances take seconds, not hours).
POOLED_SAMPLE = 10_000
POOLED_SEED = 0
# With at least this many classes the per-class figures are drawn in worker processes.
PARALLEL_FIGURES_MIN_CLASSES = 64
_INDEX_COLUMNS = ["key", "shard", "split", "image_offset", "image_size", "label", "is_synthetic"]
_IMAGE_COLUMNS = ["key", "shard", "image_offset", "image_size"]
_FEATURES_TMP = "quality-features.tmp"  # under .fillup/: the class-sorted features, deleted after the report


def _scored_index(out: Path, manifest: Manifest):
    """The index columns the report needs, as an Arrow table (no per-row Python objects)."""
    import pyarrow.parquet as pq

    path = out / "index.parquet"
    if manifest.scores is None:
        raise FillupError(f"{out / 'manifest.json'}: the build has no scores; run `fillup-data score {out}` first")
    if not path.is_file():
        raise FillupError(f"{path}: no index.parquet; relaunch the build, then `fillup-data score {out}`")
    names = pq.read_schema(path).names
    missing = [c for c in SCORE_NAMES if c not in names]
    if missing:
        raise FillupError(f"{path}: no {missing[0]!r} column (the build was rebuilt after scoring?); run "
                          f"`fillup-data score {out}` again")
    # one chunk a column (a take from a chunked column copies all of it, per call); shard and split as
    # dictionaries (a few distinct strings, not millions)
    table = pq.read_table(path, columns=[*_INDEX_COLUMNS, *HISTOGRAMS], read_dictionary=["shard", "split"])
    return table.combine_chunks()


def _numpy(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


class _TrainingRows:
    """The training rows in class order (real, then synthetic, index order within each): class ``c``'s
    real rows are ``rows[bounds[2c]:bounds[2c+1]]``, its synthetic rows ``rows[bounds[2c+1]:bounds[2c+2]]``;
    ``position[row]`` is a row's place in that order (-1: not a training row)."""

    def __init__(self, table, num_classes: int, path: Path):
        import pyarrow.compute as pc

        label = _numpy(table, "label").astype(np.int64)
        synthetic = _numpy(table, "is_synthetic").astype(bool)
        train = np.flatnonzero(pc.equal(table.column("split"), "train").fill_null(False).to_numpy())
        bad = train[(label[train] < 0) | (label[train] >= num_classes)]
        if len(bad):
            raise FillupError(f"{path}: sample {table.column('key')[int(bad[0])].as_py()} has class "
                              f"{label[bad[0]]}, the manifest has {num_classes} classes; relaunch the build")
        group = label[train] * 2 + synthetic[train]
        order = np.argsort(group, kind="stable")
        self.rows = train[order]
        self.bounds = np.searchsorted(group[order], np.arange(2 * num_classes + 1))
        self.position = np.full(len(label), -1, np.int64)
        self.position[self.rows] = np.arange(len(self.rows))
        self.synthetic = synthetic[self.rows]

    def real(self, c: int) -> slice:
        return slice(int(self.bounds[2 * c]), int(self.bounds[2 * c + 1]))

    def synthetic_of(self, c: int) -> slice:
        return slice(int(self.bounds[2 * c + 1]), int(self.bounds[2 * c + 2]))


def pooled_sample_rows(n_real: int, n_synthetic: int, cap: int,
                       seed: int = POOLED_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Which real and synthetic training images (positions in index order) the pooled precision/recall
    uses: all of a set of at most ``cap`` images, else ``cap`` of them drawn without replacement, seeded."""
    rng = np.random.default_rng(seed)

    def draw(n: int) -> np.ndarray:
        return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))

    real = draw(n_real)
    return real, draw(n_synthetic)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_rows(f, start: int, stop: int, dim: int) -> np.ndarray:
    """Rows ``start:stop`` of the class-sorted feature file, with plain reads (no mapping stays resident)."""
    rows = np.empty((stop - start, dim), np.float32)
    if rows.size == 0:
        return rows
    view = memoryview(rows).cast("B")
    f.seek(start * dim * 4)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise FillupError(f"{f.name}: the temporary feature file ended early (disk full or removed?); "
                              "free some space and run `fillup-data quality` again")
        done += n
    return rows


def _sort_features(out: Path, manifest: Manifest, table, train: _TrainingRows, sample_rows: np.ndarray,
                   tmp: Path, progress: bool) -> tuple[int, np.ndarray]:
    """Stream every shard's stored CLIP features once into ``tmp`` at the training rows' class-sorted
    places; returns the feature dimension and the features of ``sample_rows`` (training-order places)."""
    import shutil

    import pyarrow as pa

    from fillup_data.progress import progress_bar

    identity = manifest.scores.get("identity")
    shard_codes = table.column("shard").combine_chunks()
    if not pa.types.is_dictionary(shard_codes.type):
        shard_codes = shard_codes.dictionary_encode()
    codes = shard_codes.indices.to_numpy(zero_copy_only=False)
    by_shard = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[by_shard], np.arange(len(shard_codes.dictionary) + 1))
    shard_names = shard_codes.dictionary.to_pylist()
    sample_slot = np.full(len(train.rows), -1, np.int64)
    sample_slot[sample_rows] = np.arange(len(sample_rows))
    keys = table.column("key")
    dim, sample = 0, np.zeros((len(sample_rows), 0), np.float32)
    with open(tmp, "wb") as f, progress_bar(len(train.rows), "quality: sort features", "img",
                                            enabled=progress and len(train.rows) > 0) as bar:
        for code in sorted(range(len(shard_names)), key=lambda i: shard_names[i]):
            rows = by_shard[bounds[code]:bounds[code + 1]]
            places = train.position[rows]
            if not (places >= 0).any():
                continue
            shard = shard_names[code]
            entry = manifest.shard(shard)
            res = read_shard_scores(out, shard, entry.sha256 if entry else "", identity)
            if res is None:
                raise FillupError(f"{out / '.fillup' / 'scores'}: no stored CLIP features of {shard} for the recorded "
                                  f"scores; run `fillup-data score {out}` again (it reuses what is stored)")
            shard_keys = keys.take(pa.array(rows)).to_pylist()
            if res.keys == shard_keys:
                local = np.arange(len(rows))
            else:  # the stored order differs from the index's: match by key
                where = {k: i for i, k in enumerate(res.keys)}
                missing = next((k for k in shard_keys if k not in where), None)
                if missing is not None:
                    raise FillupError(f"{out / '.fillup' / 'scores'}: no stored CLIP features of sample {missing} "
                                      f"in {shard}; run `fillup-data score {out}` again")
                local = np.array([where[k] for k in shard_keys], np.int64)
            if dim == 0:
                dim = res.features.shape[1]
                need, free = len(train.rows) * dim * 4, shutil.disk_usage(tmp.parent).free
                if need > free:
                    raise FillupError(f"{tmp.parent}: the report sorts the CLIP features of {len(train.rows):,} "
                                      f"training images by class in a temporary file of {need / 2**30:.1f} GiB; "
                                      f"{free / 2**30:.1f} GiB are free: free some space and run again")
                sample = np.zeros((len(sample_rows), dim), np.float32)
            if res.features.shape[1] != dim:
                raise FillupError(f"{out / '.fillup' / 'scores'}: the stored features of {shard} have "
                                  f"{res.features.shape[1]} dimensions, other shards' {dim}; run `fillup-data score "
                                  f"{out}` again")
            kept = places >= 0
            order = np.argsort(places[kept])
            dest = places[kept][order]
            feats = np.ascontiguousarray(res.features[local[kept][order]], dtype=np.float32)
            slots = sample_slot[dest]
            sample[slots[slots >= 0]] = feats[slots >= 0]
            # runs of consecutive places are one write each (a class's rows are usually together in a shard)
            breaks = np.flatnonzero(np.diff(dest) != 1) + 1
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(dest)]):
                _pwrite_all(f.fileno(), memoryview(feats[lo:hi]).cast("B"), int(dest[lo]) * dim * 4)
            bar.update(len(dest))
    return dim, sample


def _finite_mean(values) -> float | None:
    v = np.array(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _rounded(v: float) -> float | None:
    return None if np.isnan(v) else round(v, 6)


def _set_stats(fid: float, precision: float, recall: float, dim: int, syn_scores: dict[str, np.ndarray],
               real_scores: dict[str, np.ndarray], near_copy: float) -> dict:
    n_real, n_syn = len(real_scores[HISTOGRAMS[0]]), len(syn_scores[HISTOGRAMS[0]])
    stats = {
        "real": n_real, "synthetic": n_syn, "fid": _rounded(fid),
        # FID's covariance has dim*(dim+1)/2 entries: with fewer images than dimensions it is rank-deficient
        # and the value is dominated by that bias (it also falls as n grows), so it is flagged
        "fid_reliable": bool(min(n_real, n_syn) > dim) and not np.isnan(fid),
        "precision": _rounded(precision), "recall": _rounded(recall),
        "near_copies": int(np.sum(syn_scores["real_similarity"] >= near_copy)),
    }
    for col in HISTOGRAMS:
        for side, sel in (("synthetic", syn_scores), ("real", real_scores)):
            m = _finite_mean(sel[col])
            stats[f"{col}_{side}_mean"] = None if m is None else round(m, 6)
    return stats


def _save_png(fig_or_image, path: Path) -> None:
    """PNG bytes that depend on the pixels only (no Software/date chunk), written atomically."""
    from fillup_data.state import write_bytes_durably

    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durably(path, buf.getvalue())


def _histograms(syn_scores: dict[str, np.ndarray], real_scores: dict[str, np.ndarray], title: str,
                path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = (("synthetic", syn_scores), ("real", real_scores))
    values = {col: {side: np.asarray(sel[col], float) for side, sel in sides} for col in HISTOGRAMS}
    cols = [c for c in HISTOGRAMS if any(np.isfinite(v).any() for v in values[c].values())]
    fig, axes = plt.subplots(1, max(len(cols), 1), figsize=(3.2 * max(len(cols), 1), 2.6), dpi=100, squeeze=False)
    for ax, col in zip(axes[0], cols):
        finite = {k: v[np.isfinite(v)] for k, v in values[col].items()}
        pooled = np.concatenate(list(finite.values()))
        lo, hi = float(pooled.min()), float(pooled.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
        for side, colour in (("real", "#3b6fb6"), ("synthetic", "#f0a04b")):
            if len(finite[side]):
                ax.hist(finite[side], bins=bins, alpha=0.6, color=colour, label=f"{side} ({len(finite[side])})")
        ax.set_title(col, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)


def _thumb(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return image.resize((_THUMB, _THUMB), Image.NEAREST if s * 2 <= _THUMB else Image.BICUBIC)


def _grid(rows_of_thumbs: list[list[Image.Image]], path: Path) -> None:
    """One row of thumbnails per list (grey where a row is short), 4 px gaps; no text, so no font."""
    n = max((len(r) for r in rows_of_thumbs), default=0) or 1
    gap = 4
    canvas = Image.new("RGB", (n * (_THUMB + gap) + gap, len(rows_of_thumbs) * (_THUMB + gap) + gap), (255, 255, 255))
    for y, row in enumerate(rows_of_thumbs):
        for x in range(n):
            tile = row[x] if x < len(row) else Image.new("RGB", (_THUMB, _THUMB), (230,) * 3)
            canvas.paste(tile, (gap + x * (_THUMB + gap), gap + y * (_THUMB + gap)))
    _save_png(canvas, path)


def _draw_class_figures(out: Path, job: dict) -> None:
    """A class's histogram and its two grids (each image decoded once for both); runs in a worker process
    when there are many classes, so ``job`` holds plain arrays and row dicts only."""
    _histograms(job["syn_scores"], job["real_scores"], job["title"], out / job["files"]["scores"])
    thumbs: dict[str, Image.Image] = {}
    rows = {name: [] for name in ("best", "worst", "real")}
    for name in rows:
        for row in job[name]:
            if row["key"] not in thumbs:
                thumbs[row["key"]] = _thumb(read_stored_image(out, row))
            rows[name].append(thumbs[row["key"]])
    _grid([rows["best"], rows["worst"], rows["real"]], out / job["files"]["grid"])
    _grid([rows["best"], rows["worst"]], out / job["files"]["grid_synthetic"])


class _FigureWriter:
    """Draws the per-class figures: matplotlib takes 0.1-0.2 s a histogram (8,142 classes: 15+ minutes in
    one process), so with many classes worker processes draw them, at most two jobs a worker queued so
    memory stays bounded; the bytes are the same either way."""

    def __init__(self, out: Path, workers: int):
        self.out, self.workers, self.pending = out, workers, deque()
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: dict) -> None:
        if self.pool is None:
            _draw_class_figures(self.out, job)
            return
        self.pending.append(self.pool.submit(_draw_class_figures, self.out, job))
        while len(self.pending) > 2 * self.workers:
            self.pending.popleft().result()

    def __enter__(self) -> "_FigureWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            while self.pending and exc_type is None:
                self.pending.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def class_files(index: int) -> dict[str, str]:
    """The one place that names a class's figures: ``quality/classes/FFF/IIIII-*.png`` (FFF = index // 1000)."""
    stem = f"{QUALITY_DIR}/classes/{index // CLASSES_PER_FOLDER:03d}/{index:05d}"
    return {"scores": f"{stem}-scores.png", "grid": f"{stem}-grid.png", "grid_synthetic": f"{stem}-grid-synthetic.png"}


def _image_rows(table, rows: np.ndarray) -> list[dict]:
    import pyarrow as pa

    return table.select(_IMAGE_COLUMNS).take(pa.array(rows, pa.int64())).to_pylist()


def _grid_rows(table, scores: np.ndarray, syn_rows: np.ndarray, real_rows: np.ndarray, per_class: int):
    """Best and worst synthetic rows by clip_score (ties broken by key, NaN left out) and the first real
    rows by key: the grid's image rows."""
    keys = table.column("key")
    finite = np.isfinite(scores)
    cand, cand_scores = syn_rows[finite], scores[finite]
    cand_keys = np.array(keys.take(cand).to_pylist(), dtype=str) if len(cand) else np.zeros(0, str)
    ranked = cand[np.lexsort((cand_keys, -cand_scores))]
    best, worst = ranked[:per_class], ranked[::-1][:per_class]
    real_keys = np.array(keys.take(real_rows).to_pylist(), dtype=str) if len(real_rows) else np.zeros(0, str)
    real = real_rows[np.argsort(real_keys, kind="stable")[:per_class]]
    return _image_rows(table, best), _image_rows(table, worst), _image_rows(table, real)


def write_quality_report(out: str | Path, *, per_class: int = 8, near_copy: float = NEAR_COPY,
                         progress: bool = True, pooled_sample: int = POOLED_SAMPLE,
                         workers: int | None = None) -> dict:
    """Compute the report's numbers, draw its figures, write ``quality/`` and record it in the manifest.

    ``pooled_sample``: at most this many real and synthetic images in the pooled precision/recall
    (seeded sample, reported); ``workers``: processes drawing the per-class figures (default: the
    usable CPUs, at most 8; used from ``PARALLEL_FIGURES_MIN_CLASSES`` classes on).  They are spawned,
    so a script calling this needs the usual ``if __name__ == "__main__":`` guard (or ``workers=1``)."""
    from fillup_data.executors.devices import usable_cpus
    from fillup_data.progress import track
    from fillup_data.shards.writer import sha256_file
    from fillup_data.state import STATE_DIR, BuildLock, write_bytes_durably

    out = Path(out)
    if per_class < 1:
        raise FillupError(f"--per-class: must be at least 1, got {per_class}")
    if not 0 < near_copy <= 1:
        raise FillupError(f"--near-copy: a cosine similarity in (0, 1], got {near_copy}")
    if pooled_sample <= K_NEAREST:
        raise FillupError(f"--pooled-sample: must be more than k={K_NEAREST} images, got {pooled_sample}")
    # read under the build's lock: a build, `score` or another `quality` may rewrite the manifest and index
    with BuildLock.acquire(out / STATE_DIR):
        manifest = Manifest.read(out / "manifest.json")
        table = _scored_index(out, manifest)
        classes_sorted = sorted(manifest.classes, key=lambda c: c.index)
        num_classes = max((c.index for c in classes_sorted), default=-1) + 1
        train = _TrainingRows(table, num_classes, out / "index.parquet")
        index_scores = {col: _numpy(table, col).astype(np.float64) for col in HISTOGRAMS}
        scores = {col: v[train.rows] for col, v in index_scores.items()}  # in class order
        # the pooled sets in index order (the sample is drawn, and the exact pooled FID summed, in that order)
        real_rows, syn_rows = (np.sort(train.rows[train.synthetic == s]) for s in (False, True))
        real_pick, syn_pick = pooled_sample_rows(len(real_rows), len(syn_rows), pooled_sample)
        sample_rows = train.position[np.concatenate([real_rows[real_pick], syn_rows[syn_pick]])]
        tmp = out / STATE_DIR / _FEATURES_TMP
        try:
            dim, sample = _sort_features(out, manifest, table, train, sample_rows, tmp, progress)
            real_sample, syn_sample = sample[:len(real_pick)], sample[len(real_pick):]
            pooled_real, pooled_syn = PooledMoments(), PooledMoments()
            n_workers = workers if workers is not None else min(usable_cpus(), 8)
            n_workers = n_workers if len(classes_sorted) >= PARALLEL_FIGURES_MIN_CLASSES else 1
            classes = []
            with open(tmp, "rb", buffering=0) as features, _FigureWriter(out, n_workers) as figures:
                for c in track(classes_sorted, desc="quality", unit="class", enabled=progress):
                    real_sl, syn_sl = train.real(c.index), train.synthetic_of(c.index)
                    block = _read_rows(features, real_sl.start, syn_sl.stop, dim)
                    real, syn = block[:real_sl.stop - real_sl.start], block[real_sl.stop - real_sl.start:]
                    moments = {}
                    for side, x, pooled in (("real", real, pooled_real), ("synthetic", syn, pooled_syn)):
                        moments[side] = feature_moments(x) if len(x) >= 2 else None
                        pooled.add(x, moments[side])
                    if not (moments["real"] and moments["synthetic"]):
                        fid = float("nan")
                    elif min(len(real), len(syn)) < dim:  # rank-deficient covariances: the cheaper, same formula
                        fid = frechet_distance_low_rank(syn, real)
                    else:
                        fid = frechet_from_moments(*moments["synthetic"], *moments["real"])
                    precision, recall = precision_recall(real, syn)
                    real_scores = {col: v[real_sl] for col, v in scores.items()}
                    syn_scores = {col: v[syn_sl] for col, v in scores.items()}
                    stats = _set_stats(fid, precision, recall, dim if len(block) else 0, syn_scores, real_scores,
                                       near_copy)
                    files = class_files(c.index)
                    best, worst, first_real = _grid_rows(table, syn_scores["clip_score"], train.rows[syn_sl],
                                                         train.rows[real_sl], per_class)
                    figures.submit({"title": f"class {c.index}: {c.name}", "files": files, "syn_scores": syn_scores,
                                    "real_scores": real_scores, "best": best, "worst": worst, "real": first_real})
                    classes.append({"index": c.index, "name": c.name, "group": c.group, **stats, "files": files})
        finally:
            tmp.unlink(missing_ok=True)
        # pooled: precision/recall on the sample; FID on every image (the exact formula when the sample is all)
        complete = len(real_pick) == len(real_rows) and len(syn_pick) == len(syn_rows)
        fid = frechet_distance(syn_sample, real_sample) if complete else frechet_from_pooled(pooled_syn, pooled_real)
        precision, recall = precision_recall(real_sample, syn_sample)
        all_real = {col: v[real_rows] for col, v in index_scores.items()}
        all_syn = {col: v[syn_rows] for col, v in index_scores.items()}
        overall = _set_stats(fid, precision, recall, dim if len(train.rows) else 0, all_syn, all_real, near_copy)
        overall.update(sample_real=len(real_pick), sample_synthetic=len(syn_pick))
        _histograms(all_syn, all_real, f"{manifest.name} {manifest.version}: all classes",
                    out / QUALITY_DIR / "scores.png")
        summary = {"name": manifest.name, "version": manifest.version, "near_copy": near_copy, "k": K_NEAREST,
                   "per_class": per_class, "feature_dim": dim, "scores": manifest.scores,
                   "pooled_sample": pooled_sample, "pooled_seed": POOLED_SEED, "overall": overall,
                   "groups": _group_stats(classes), "classes": classes}
        write_bytes_durably(out / SUMMARY, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
        write_bytes_durably(out / REPORT, render_report(summary, include_real=True).encode("utf-8"))
        listed = [REPORT, SUMMARY, f"{QUALITY_DIR}/scores.png"] + [f for c in classes for f in c["files"].values()]
        manifest.quality = {
            "report": REPORT, "near_copy": near_copy, "scores_identity": manifest.scores.get("identity"),
            "files": [{"path": p, "num_bytes": (out / p).stat().st_size, "sha256": sha256_file(out / p),
                       "real_pixels": p.endswith("-grid.png")} for p in listed],
        }
        manifest.write(out / "manifest.json")
        from fillup_data.quality.scoring import refresh_card

        refresh_card(out, manifest)
    return summary


def _group_stats(classes: list[dict]) -> dict:
    """Per group: classes, images, near-copies, and the mean of the per-class values that are defined."""
    out = {}
    for g in GROUPS:
        cs = [c for c in classes if c["group"] == g]
        out[g] = {"classes": len(cs), "real": sum(c["real"] for c in cs), "synthetic": sum(c["synthetic"] for c in cs),
                  "near_copies": sum(c["near_copies"] for c in cs)}
        for key in ("fid", "precision", "recall"):
            m = _finite_mean([c[key] for c in cs if c[key] is not None])
            out[g][f"mean_{key}"] = None if m is None else round(m, 6)
    return out


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _sample_note(summary: dict) -> list[str]:
    """The line saying which images the pooled precision/recall compared, when not all of them."""
    o = summary["overall"]
    if o.get("sample_real", o["real"]) >= o["real"] and o.get("sample_synthetic", o["synthetic"]) >= o["synthetic"]:
        return []
    return [f"Precision and recall pooled over a seeded sample of {o['sample_real']:,} real and "
            f"{o['sample_synthetic']:,} synthetic images (at most {summary['pooled_sample']:,} of each, seed "
            f"{summary['pooled_seed']}); FID and the other columns over every image.", ""]


def render_report(summary: dict, include_real: bool = True) -> str:
    """The report's Markdown from ``summary.json``; without real images it links the synthetic-only grids."""
    s = summary["scores"] or {}
    o = summary["overall"]
    lines = [
        f"# Quality report: {summary['name']} {summary['version']}",
        "",
        f"Scored with CLIP `{s.get('clip_model')}` (prompt `{s.get('prompt')}`), classifier "
        f"`{s.get('classifier') or 'none'}`. FID and precision/recall (k={summary['k']}, Kynkäänniemi et al. 2019) "
        f"compare each class's synthetic training images with its real training images on the same L2-normalised "
        f"CLIP image features ({summary['feature_dim']} dimensions); near-copies are synthetic images whose "
        f"`real_similarity` is at least {summary['near_copy']}.",
        "",
        "Columns of `index.parquet`: " + "; ".join(f"`{n}`: {SCORE_BY_NAME[n].doc}" for n in SCORE_NAMES) + ".",
        "",
        "## All classes pooled",
        "",
        "| real | synthetic | FID | precision | recall | near-copies | clip_score synthetic / real |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {o['real']:,} | {o['synthetic']:,} | {_fmt(o['fid'])}{'' if o['fid_reliable'] else ' *'} | "
        f"{_fmt(o['precision'])} | {_fmt(o['recall'])} | {o['near_copies']:,} | "
        f"{_fmt(o['clip_score_synthetic_mean'])} / {_fmt(o['clip_score_real_mean'])} |",
        "",
        *_sample_note(summary),
        "![score distributions, all classes](scores.png)",
        "",
        "## By group (means of the per-class values that are defined)",
        "",
        "| group | classes | real | synthetic | FID | precision | recall | near-copies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g, v in summary["groups"].items():
        lines.append(f"| {g} | {v['classes']} | {v['real']:,} | {v['synthetic']:,} | {_fmt(v['mean_fid'])} | "
                     f"{_fmt(v['mean_precision'])} | {_fmt(v['mean_recall'])} | {v['near_copies']:,} |")
    lines += [
        "",
        "## Per class",
        "",
        f"\\* FID from fewer images than the {summary['feature_dim']} feature dimensions in either set: its "
        "covariance is rank-deficient and the value mostly reflects the sample size; compare such values only "
        f"between builds with the same counts. – : not defined (FID needs 2 images per set, precision/recall "
        f"more than k={summary['k']}).",
        "",
        "| class | group | real | synthetic | FID | precision | recall | near-copies | clip_score syn / real | figures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    grid_key = "grid" if include_real else "grid_synthetic"
    for c in summary["classes"]:
        files = {k: v.removeprefix(f"{QUALITY_DIR}/") for k, v in c["files"].items()}
        name = str(c["name"]).replace("|", "\\|")
        lines.append(
            f"| {c['index']} {name} | {c['group']} | {c['real']:,} | {c['synthetic']:,} | "
            f"{_fmt(c['fid'])}{'' if c['fid'] is None or c['fid_reliable'] else ' *'} | {_fmt(c['precision'])} | "
            f"{_fmt(c['recall'])} | {c['near_copies']:,} | {_fmt(c['clip_score_synthetic_mean'])} / "
            f"{_fmt(c['clip_score_real_mean'])} | [scores]({files['scores']}), [grid]({files[grid_key]}) |")
    rows = ("best synthetic by clip_score, worst synthetic, real training images" if include_real
            else "best synthetic by clip_score, worst synthetic (real images are not in this repository)")
    lines += ["", f"Grids, top to bottom: {rows}; {summary['per_class']} per row.", ""]
    return "\n".join(lines)


def report_files(out: Path, manifest: dict, include_real: bool) -> tuple[list[tuple[str, bytes | Path]], list[str]]:
    """What ``publish`` uploads of the report: the files the manifest lists (never what a link says);
    without real images, the grids showing real pixels stay out and the README links the synthetic-only
    grids.  Returns (path, file or bytes) pairs and the paths left out."""
    quality = manifest.get("quality")
    if not quality:
        return [], []
    files, left_out = [], []
    for f in quality["files"]:
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["num_bytes"]:
            raise FillupError(f"{p}: missing or changed since `fillup-data quality` listed it in manifest.json; run "
                              f"`fillup-data quality {out}` again")
        if f.get("real_pixels") and not include_real:
            left_out.append(f["path"])
        elif f["path"] == REPORT and not include_real:
            summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
            files.append((REPORT, render_report(summary, include_real=False).encode("utf-8")))
        else:
            files.append((f["path"], p))
    return files, left_out
