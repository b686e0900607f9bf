"""``fillup-data score OUT``: CLIP score, classifier confidence and nearest real image for every sample,
written as new columns of ``index.parquet`` (the shards are only read).

Pass 1 scores shard by shard (each result stored under ``.fillup/scores/`` as soon as it is done);
pass 2 compares every synthetic image with the real training images of its class on the stored
features; then the index is rewritten atomically and the manifest records what scored the build.
At millions of images only the real training images' features stay in memory (grouped by class):
pass 2 reads the synthetic ones back a shard at a time, and the new columns are built as arrays.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from fillup_data.errors import FillupError
from fillup_data.fastpath import device_description
from fillup_data.quality.shard_scores import ShardScores, read_shard_scores, write_shard_scores
from fillup_data.schema.manifest import Manifest
from fillup_data.schema.scores import CLIP_PROMPT, NEAR_COPY, SCORE_COLUMNS, SCORE_NAMES

if TYPE_CHECKING:
    import torch

_ROW_COLUMNS = ["key", "shard", "split", "image_offset", "image_size", "label", "is_synthetic"]


@dataclass
class ScoreSummary:
    out: Path
    shards_scored: int
    shards_reused: int
    is_synthetic: np.ndarray  # [rows] bool, index order
    values: dict[str, np.ndarray]  # clip_score, class_confidence, real_similarity of every row, index order
    seconds: float
    scores: dict = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"scored {self.out}: {len(self.is_synthetic):,} samples in {self.shards_scored + self.shards_reused} "
                 f"shards ({self.shards_scored} scored now, {self.shards_reused} reused from .fillup/scores) "
                 f"in {self.seconds:.1f}s; CLIP {self.scores.get('clip_model')}, classifier "
                 f"{self.scores.get('classifier') or 'none (class_confidence is NaN)'}"]
        for name, synthetic in (("real", False), ("synthetic", True)):
            sel = self.is_synthetic == synthetic
            if not sel.any():
                continue
            parts = [f"{name:<10}{int(sel.sum()):>8,}"]
            for col in ("clip_score", "class_confidence", "real_similarity"):
                v = self.values[col][sel]
                if np.isfinite(v).any():
                    parts.append(f"{col} mean {np.nanmean(v):.3f}")
            if synthetic:
                sim = self.values["real_similarity"][sel]
                parts.append(f"near-copies (real_similarity >= {NEAR_COPY}) {int(np.sum(sim >= NEAR_COPY))}")
            lines.append("  ".join(parts))
        return "\n".join(lines)


def resolve_device(device: str) -> torch.device:
    import torch  # here, not at import: `quality` needs this module's refresh_card, not torch (~0.5 GB)

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FillupError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


def _read_index(out: Path):
    import pyarrow.parquet as pq

    path = out / "index.parquet"
    if not path.is_file():
        raise FillupError(f"{path}: no index.parquet: is {out} a finished build? Run `fillup-data build ... --out "
                          f"{out}` (or relaunch it) first")
    try:
        # without the score columns of an earlier run: they are replaced (millions of strings and floats)
        table = pq.read_table(path, columns=[c for c in pq.read_schema(path).names if c not in SCORE_NAMES])
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise FillupError(f"{path}: not a readable parquet file ({err}); relaunch the build to rewrite it") from None
    missing = [c for c in _ROW_COLUMNS if c not in table.column_names]
    if missing:
        raise FillupError(f"{path}: no column {missing[0]!r}; it is not an index of `fillup-data build`")
    return table


def _shard_file(out: Path, manifest: Manifest, shard: str) -> tuple[Path, str]:
    """The shard's file and its sha256, checked against the manifest (the index's offsets point into it)."""
    from fillup_data.shards.writer import sha256_file

    entry = manifest.shard(shard)
    path = out / shard
    if entry is None:
        raise FillupError(f"{out / 'index.parquet'}: rows in shard {shard!r}, which manifest.json does not list; "
                          "relaunch the build to rewrite both")
    try:
        sha = sha256_file(path)
    except OSError as err:
        raise FillupError(f"{path}: cannot read the shard ({err.strerror or err}); relaunch the build to rewrite "
                          f"it, or fetch it again") from None
    if entry.sha256 and sha != entry.sha256:
        raise FillupError(f"{path}: sha256 differs from manifest.json (the shard changed after the build); run "
                          f"`fillup-data inspect {out}` and relaunch the build")
    return path, sha


def _images(path: Path, rows: list[dict]):
    from fillup_data.shards.index_parquet import read_stored_image

    folder = path.parent.parent  # rows name their shard as data/NAME.tar, relative to the build
    for r in rows:
        yield read_stored_image(folder, r)


def _score_shard(path: Path, rows: list[dict], clip, text: torch.Tensor, classifier, device, batch_size: int,
                 bar) -> ShardScores:
    import torch

    feats, clip_scores, confidences = [], [], []
    images = _images(path, rows)
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start:start + batch_size]
        batch = [next(images) for _ in batch_rows]
        labels = torch.tensor([r["label"] for r in batch_rows])
        f = clip.image_features(batch)
        feats.append(f.numpy())
        clip_scores.append((f * text[labels]).sum(dim=-1).double().numpy())
        if classifier is not None:
            probs = classifier.probabilities(batch, device)
            confidences.append(probs[torch.arange(len(batch_rows)), labels].double().numpy())
        else:
            confidences.append(np.full(len(batch_rows), np.nan))
        bar.update(len(batch_rows))
    dim = feats[0].shape[1] if feats else 0
    return ShardScores([r["key"] for r in rows], np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
                       np.concatenate(clip_scores) if feats else np.zeros(0),
                       np.concatenate(confidences) if feats else np.zeros(0))


def scores_identity(clip_identity: str, classifier_identity: str | None, device: str = "", batch_size: int = 0) -> str:
    """What the stored results depend on besides the shard's bytes: the models, the prompt, and the device
    kind and batch size (they decide the last bits, so a resume never mixes results of two setups)."""
    text = f"{clip_identity}\n{classifier_identity or 'none'}\n{CLIP_PROMPT}\n{device}\n{batch_size}"
    return hashlib.sha256(text.encode()).hexdigest()


class _RealFeatures:
    """The CLIP features of the real training images, grouped by class (what pass 2 compares with): one
    float32 matrix, class ``c`` in ``rows[bounds[c]:bounds[c+1]]``, index order within a class; the only
    features ``score`` holds beyond one shard's."""

    def __init__(self, label: np.ndarray, real_train: np.ndarray, num_classes: int):
        rows = np.flatnonzero(real_train)
        self.rows = rows[np.argsort(label[rows], kind="stable")]  # index rows, by class
        self.bounds = np.searchsorted(label[self.rows], np.arange(num_classes + 1))
        self.place = np.full(len(label), -1, np.int64)
        self.place[self.rows] = np.arange(len(self.rows))
        self.features: np.ndarray | None = None

    def take(self, rows: np.ndarray, features: np.ndarray) -> None:
        """Keep the features of a shard's real training rows (``rows``: the shard's index rows, in its order)."""
        places = self.place[rows]
        kept = places >= 0
        if not kept.any():
            return
        if self.features is None:
            self.features = np.zeros((len(self.rows), features.shape[1]), np.float32)
        self.features[places[kept]] = features[kept]

    def of_class(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.bounds[label], self.bounds[label + 1]
        return self.features[lo:hi] if self.features is not None else np.zeros((0, 0), np.float32), self.rows[lo:hi]


def _nearest_real(real: _RealFeatures, rows: np.ndarray, label: np.ndarray, synthetic: np.ndarray,
                  features: np.ndarray, similarity: np.ndarray, nearest: np.ndarray) -> None:
    """Pass 2 for one shard (``rows``: its index rows, ``features`` in that order): each synthetic row's
    highest cosine to a real training image of its class into ``similarity``, that image's index row into
    ``nearest``."""
    syn = np.flatnonzero(synthetic[rows])
    syn = syn[np.argsort(label[rows[syn]], kind="stable")]  # by class, shard order within a class
    labels = label[rows[syn]]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(syn) else np.zeros(0, np.int64)
    for lo, hi in zip(starts, np.r_[starts[1:], len(syn)]):
        m, real_rows = real.of_class(int(labels[lo]))
        if not len(real_rows):
            continue
        idx = syn[lo:hi]
        sims = features[idx].astype(np.float64) @ m.astype(np.float64).T
        best = sims.argmax(axis=1)
        similarity[rows[idx]] = sims[np.arange(len(idx)), best]
        nearest[rows[idx]] = real_rows[best]


def _rows_by_shard(path: Path) -> dict[str, np.ndarray]:
    """Each shard's index rows in index order, from one sort (no per-row Python objects); the shard column is
    read again as a dictionary, which costs less than encoding millions of strings."""
    import pyarrow.parquet as pq

    shards = pq.read_table(path, columns=["shard"], read_dictionary=["shard"]).column("shard").combine_chunks()
    codes = shards.indices.to_numpy(zero_copy_only=False)
    by_shard = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[by_shard], np.arange(len(shards.dictionary) + 1))
    return {name: by_shard[bounds[i]:bounds[i + 1]] for i, name in enumerate(shards.dictionary.to_pylist())}


def _write_scored_index(out: Path, table, columns: dict) -> None:
    import pyarrow as pa

    from fillup_data.shards.index_parquet import write_index_table

    table = table.drop_columns([c for c in SCORE_NAMES if c in table.column_names])
    for col in SCORE_COLUMNS:
        values = columns[col.name]
        values = values.cast(col.arrow_type) if isinstance(values, pa.Array) else pa.array(values, col.arrow_type)
        table = table.append_column(pa.field(col.name, col.arrow_type), values)
    write_index_table(out / "index.parquet", table)


def score_build(out: str | Path, *, clip_model: str, classifier_run: str | None = None,
                classifier_arch: str | None = None, classifier_weights: str | None = None,
                classifier_image_size: int = 224, classifier_resize: int = 256, device: str = "auto",
                batch_size: int = 64, progress: bool = True, log: Callable[[str], None] | None = None) -> ScoreSummary:
    import pyarrow as pa
    import pyarrow.compute as pc

    from fillup_data.progress import note, progress_bar, track
    from fillup_data.quality.classifier import classifier_from_run, classifier_from_weights
    from fillup_data.quality.clip_model import load_clip
    from fillup_data.state import STATE_DIR, BuildLock

    log = log or note
    t0 = time.time()
    out = Path(out)
    if batch_size < 1:
        raise FillupError(f"--batch-size: must be at least 1, got {batch_size}")
    if classifier_run and (classifier_arch or classifier_weights):
        raise FillupError("--classifier RUN and --classifier-arch/--classifier-weights exclude each other")
    if bool(classifier_arch) != bool(classifier_weights):
        raise FillupError("--classifier-arch and --classifier-weights go together")
    dev = resolve_device(device)
    # read under the build's lock: a build or `quality` may rewrite the manifest and index meanwhile
    with BuildLock.acquire(out / STATE_DIR):
        manifest = Manifest.read(out / "manifest.json")
        table = _read_index(out)
        names = [c.name for c in sorted(manifest.classes, key=lambda c: c.index)]
        label = table.column("label").to_numpy().astype(np.int64)
        bad = np.flatnonzero((label < 0) | (label >= len(names)))
        if len(bad):
            raise FillupError(f"{out / 'index.parquet'}: sample {table.column('key')[int(bad[0])].as_py()} has class "
                              f"{label[bad[0]]}, the manifest has {len(names)} classes; relaunch the build")
        synthetic = table.column("is_synthetic").to_numpy().astype(bool)
        real_train = ~synthetic & pc.equal(table.column("split"), "train").fill_null(False).to_numpy()
        classifier = None
        if classifier_run:
            classifier = classifier_from_run(classifier_run, names)
        elif classifier_arch:
            classifier = classifier_from_weights(classifier_arch, classifier_weights, len(names),
                                                 classifier_image_size, classifier_resize)
        if classifier is not None:
            classifier.model.to(dev)
        clip = load_clip(clip_model, dev)
        identity = scores_identity(clip.identity, classifier.identity if classifier else None,
                                   device_description(str(dev)), batch_size)
        text = clip.text_features([CLIP_PROMPT.format(class_name=n) for n in names])

        shard_rows = _rows_by_shard(out / "index.parquet")  # shard -> its index rows, in index order
        order = [s.path for s in manifest.shards if s.path in shard_rows]
        order += sorted(set(shard_rows) - set(order))  # reported as not in the manifest by _shard_file
        files = {s: _shard_file(out, manifest, s) for s in order}
        keys = table.column("key").combine_chunks()  # a take from a chunked column copies all of it, per call

        def shard_keys(s: str) -> list[str]:
            return keys.take(pa.array(shard_rows[s])).to_pylist()

        # pass 1 keeps of each shard's result only its per-row scores and its real training rows' features
        clip_score, confidence = np.full(len(table), np.nan), np.full(len(table), np.nan)
        real = _RealFeatures(label, real_train, len(names))

        def keep(s: str, res: ShardScores) -> None:
            rows = shard_rows[s]
            clip_score[rows], confidence[rows] = res.clip_score, res.class_confidence
            real.take(rows, res.features)

        todo = []
        for s in order:
            res = read_shard_scores(out, s, files[s][1], identity)
            if res is not None and res.keys == shard_keys(s):
                keep(s, res)
            else:
                todo.append(s)
            del res
        log(f"{len(order)} shard(s): {len(order) - len(todo)} already scored with this model, {len(todo)} to score "
            f"on {dev}")
        bar = progress_bar(sum(len(shard_rows[s]) for s in todo), "score", "img", enabled=progress and bool(todo))
        scored = 0
        row_table = table.select(_ROW_COLUMNS).combine_chunks() if todo else None
        with bar:
            for s in todo:
                rows = row_table.take(pa.array(shard_rows[s])).to_pylist()
                res = _score_shard(files[s][0], rows, clip, text, classifier, dev, batch_size, bar)
                write_shard_scores(out, s, files[s][1], identity, res)
                keep(s, res)
                del res, rows
                scored += 1
        del row_table

        # pass 2: the synthetic rows, a shard at a time, against the real features of their class
        similarity, nearest = np.full(len(table), np.nan), np.full(len(table), -1, np.int64)
        for s in track([s for s in order if synthetic[shard_rows[s]].any()], desc="score: nearest real",
                       unit="shard", enabled=progress):
            res = read_shard_scores(out, s, files[s][1], identity)
            if res is None:
                raise FillupError(f"{out / '.fillup' / 'scores'}: the stored result of {s} vanished or changed "
                                  f"while scoring; run `fillup-data score {out}` again")
            _nearest_real(real, shard_rows[s], label, synthetic, res.features, similarity, nearest)
            del res
        nearest_key = keys.take(pa.array(nearest, mask=nearest < 0)).fill_null("")
        values = {"clip_score": clip_score, "class_confidence": confidence, "real_similarity": similarity}
        _write_scored_index(out, table, {**values, "nearest_real_key": nearest_key})

        record = {"clip_model": clip_model, "clip_identity": clip.identity, "prompt": CLIP_PROMPT,
                  "classifier": classifier.description if classifier else None,
                  "classifier_identity": classifier.identity if classifier else None,
                  "columns": list(SCORE_NAMES), "device": device_description(str(dev)), "batch_size": batch_size,
                  "identity": identity}
        if manifest.scores != record and manifest.quality is not None:
            log(f"the quality report in {out / 'quality'} described other scores: the card no longer links it; "
                f"run `fillup-data quality {out}` again")
            manifest.quality = None
        manifest.scores = record
        manifest.write(out / "manifest.json")
        refresh_card(out, manifest)
    return ScoreSummary(out, scored, len(order) - scored, synthetic, values, time.time() - t0, record)


def refresh_card(out: Path, manifest: Manifest) -> None:
    """The local card follows the manifest: it links the quality report exactly when one is recorded."""
    from fillup_data.shards.card import render_card

    (out / "README.md").write_text(render_card(manifest.to_dict(), include_real=True), encoding="utf-8")
