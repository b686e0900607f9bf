"""``fillup-data score OUT``: CLIP score, classifier confidence and nearest real image for every sample,
written as new columns of ``index.parquet`` (the shards are only read).

Pass 1 scores shard by shard (each result stored under ``.fillup/scores/`` as soon as it is done);
pass 2 compares every synthetic image with the real training images of its class on the stored
features; then the index is rewritten atomically and the manifest records what scored the build.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fillup_data.errors import FillupError
from fillup_data.fastpath import device_description
from fillup_data.quality.shard_scores import ShardScores, read_shard_scores, write_shard_scores
from fillup_data.schema.manifest import Manifest
from fillup_data.schema.scores import CLIP_PROMPT, SCORE_COLUMNS, SCORE_NAMES

NEAR_COPY = 0.95  # real_similarity at or above which the summary counts a synthetic image as a near-copy
_ROW_COLUMNS = ["key", "shard", "split", "image_offset", "image_size", "label", "is_synthetic"]


@dataclass
class ScoreSummary:
    out: Path
    shards_scored: int
    shards_reused: int
    rows: list[dict]  # split, is_synthetic and the score values of every row
    seconds: float
    scores: dict = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"scored {self.out}: {len(self.rows):,} samples in {self.shards_scored + self.shards_reused} shards "
                 f"({self.shards_scored} scored now, {self.shards_reused} reused from .fillup/scores) "
                 f"in {self.seconds:.1f}s; CLIP {self.scores.get('clip_model')}, classifier "
                 f"{self.scores.get('classifier') or 'none (class_confidence is NaN)'}"]
        for name, synthetic in (("real", False), ("synthetic", True)):
            sel = [r for r in self.rows if r["is_synthetic"] == synthetic]
            if not sel:
                continue
            parts = [f"{name:<10}{len(sel):>8,}"]
            for col in ("clip_score", "class_confidence", "real_similarity"):
                v = np.array([r[col] for r in sel], dtype=np.float64)
                if np.isfinite(v).any():
                    parts.append(f"{col} mean {np.nanmean(v):.3f}")
            if synthetic:
                sim = np.array([r["real_similarity"] for r in sel], dtype=np.float64)
                parts.append(f"near-copies (real_similarity >= {NEAR_COPY}) {int(np.sum(sim >= NEAR_COPY))}")
            lines.append("  ".join(parts))
        return "\n".join(lines)


def resolve_device(device: str) -> torch.device:
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
        table = pq.read_table(path)
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


def _nearest_real(by_shard: dict[str, ShardScores], rows_by_key: dict[str, dict]) -> dict[str, tuple[float, str]]:
    """Pass 2: each synthetic row's highest cosine to a real training image of its class, and that image's key."""
    real: dict[int, tuple[list[np.ndarray], list[str]]] = {}
    for res in by_shard.values():
        for i, key in enumerate(res.keys):
            r = rows_by_key[key]
            if not r["is_synthetic"] and r["split"] == "train":
                feats, keys = real.setdefault(r["label"], ([], []))
                feats.append(res.features[i])
                keys.append(key)
    matrices = {c: (np.stack(f), k) for c, (f, k) in real.items()}
    nearest = {}
    for res in by_shard.values():
        syn = [i for i, key in enumerate(res.keys) if rows_by_key[key]["is_synthetic"]]
        for label in sorted({rows_by_key[res.keys[i]]["label"] for i in syn}):
            idx = [i for i in syn if rows_by_key[res.keys[i]]["label"] == label]
            if label not in matrices:
                continue
            m, keys = matrices[label]
            sims = res.features[idx].astype(np.float64) @ m.astype(np.float64).T
            best = sims.argmax(axis=1)
            for j, i in enumerate(idx):
                nearest[res.keys[i]] = (float(sims[j, best[j]]), keys[best[j]])
    return nearest


def _write_scored_index(out: Path, table, columns: dict[str, list]) -> None:
    import pyarrow as pa

    from fillup_data.shards.index_parquet import write_index_table

    table = table.drop_columns([c for c in SCORE_NAMES if c in table.column_names])
    for col in SCORE_COLUMNS:
        table = table.append_column(pa.field(col.name, col.arrow_type), pa.array(columns[col.name], col.arrow_type))
    write_index_table(out / "index.parquet", table)


def score_build(out: str | Path, *, clip_model: str, classifier_run: str | None = None,
                classifier_arch: str | None = None, classifier_weights: str | None = None,
                classifier_image_size: int = 224, classifier_resize: int = 256, device: str = "auto",
                batch_size: int = 64, progress: bool = True, log: Callable[[str], None] = print) -> ScoreSummary:
    from tqdm.auto import tqdm

    from fillup_data.quality.classifier import classifier_from_run, classifier_from_weights
    from fillup_data.quality.clip_model import load_clip
    from fillup_data.state import STATE_DIR, BuildLock

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
        rows = table.select(_ROW_COLUMNS).to_pylist()
        bad = next((r for r in rows if not 0 <= r["label"] < len(names)), None)
        if bad is not None:
            raise FillupError(f"{out / 'index.parquet'}: sample {bad['key']} has class {bad['label']}, the manifest "
                              f"has {len(names)} classes; relaunch the build")
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

        by_shard_rows: dict[str, list[dict]] = {}
        for r in rows:
            by_shard_rows.setdefault(r["shard"], []).append(r)
        order = [s.path for s in manifest.shards if s.path in by_shard_rows]
        order += sorted(set(by_shard_rows) - set(order))  # reported as not in the manifest by _shard_file
        files = {s: _shard_file(out, manifest, s) for s in order}
        results: dict[str, ShardScores] = {}
        todo = []
        for s in order:
            res = read_shard_scores(out, s, files[s][1], identity)
            if res is not None and res.keys == [r["key"] for r in by_shard_rows[s]]:
                results[s] = res
            else:
                todo.append(s)
        log(f"{len(order)} shard(s): {len(results)} already scored with this model, {len(todo)} to score "
            f"on {dev}")
        bar = tqdm(total=sum(len(by_shard_rows[s]) for s in todo), desc="score", unit="img",
                   disable=not progress or not todo)
        scored = 0
        with bar:
            for s in todo:
                res = _score_shard(files[s][0], by_shard_rows[s], clip, text, classifier, dev, batch_size, bar)
                write_shard_scores(out, s, files[s][1], identity, res)
                results[s] = res
                scored += 1

        rows_by_key = {r["key"]: r for r in rows}
        nearest = _nearest_real(results, rows_by_key)
        values = {}
        for res in results.values():
            for i, key in enumerate(res.keys):
                values[key] = (float(res.clip_score[i]), float(res.class_confidence[i]))
        columns: dict[str, list] = {c: [] for c in SCORE_NAMES}
        summary_rows = []
        for r in rows:
            clip_score, confidence = values[r["key"]]
            sim, near = nearest.get(r["key"], (float("nan"), ""))
            v = {"clip_score": clip_score, "class_confidence": confidence, "real_similarity": sim,
                 "nearest_real_key": near}
            for c in SCORE_NAMES:
                columns[c].append(v[c])
            summary_rows.append({"split": r["split"], "is_synthetic": r["is_synthetic"], **v})
        _write_scored_index(out, table, columns)

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
    return ScoreSummary(out, scored, len(order) - scored, summary_rows, time.time() - t0, record)


def refresh_card(out: Path, manifest: Manifest) -> None:
    """The local card follows the manifest: it links the quality report exactly when one is recorded."""
    from fillup_data.shards.card import render_card

    (out / "README.md").write_text(render_card(manifest.to_dict(), include_real=True), encoding="utf-8")
