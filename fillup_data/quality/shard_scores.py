"""Per-shard score results under ``OUT/.fillup/scores/``: what makes ``fillup-data score`` resumable.

One safetensors file per shard (L2-normalised float32 CLIP image features and the per-row scores,
in the shard's row order), then a JSON completion record naming it.  Both are keyed by the shard's
sha256 and the scoring identity (CLIP model, classifier, prompt): a changed shard or model finds no
record and is scored again; a killed run leaves either no record or a complete one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fillup_data.state import STATE_DIR

SCORES_DIR = "scores"
FORMAT = 1


def scores_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR / SCORES_DIR


def result_key(shard_sha256: str, identity: str) -> str:
    return hashlib.sha256(f"{FORMAT}\n{shard_sha256}\n{identity}".encode()).hexdigest()[:20]


@dataclass
class ShardScores:
    keys: list[str]
    features: np.ndarray  # [n, dim] float32, L2-normalised
    clip_score: np.ndarray  # [n] float64
    class_confidence: np.ndarray  # [n] float64, NaN without a classifier


def _paths(out: Path, shard: str, shard_sha256: str, identity: str) -> tuple[Path, Path]:
    stem = f"{Path(shard).stem}-{result_key(shard_sha256, identity)}"
    root = scores_dir(out)
    return root / f"{stem}.safetensors", root / f"{stem}.json"


def read_shard_scores(out: Path, shard: str, shard_sha256: str, identity: str) -> ShardScores | None:
    """The stored result for this shard content and identity, or None (missing, partial or damaged)."""
    from safetensors.numpy import load

    from fillup_data.state import read_json_record

    tensors, record = _paths(out, shard, shard_sha256, identity)
    rec = read_json_record(record)
    if not rec or (rec.get("format"), rec.get("shard"), rec.get("shard_sha256"), rec.get("identity")) != (
            FORMAT, shard, shard_sha256, identity):
        return None
    try:
        data = tensors.read_bytes()  # one read, hashed then parsed (`score` reads each result twice already)
        if hashlib.sha256(data).hexdigest() != rec.get("file_sha256"):
            return None
        t = load(data)
        del data
    except Exception:  # noqa: BLE001 - a damaged result is recomputed, whatever the reader raised
        return None
    keys = rec.get("keys")
    if not isinstance(keys, list) or any(len(t[k]) != len(keys) for k in ("features", "clip_score",
                                                                           "class_confidence")):
        return None
    return ShardScores(keys, t["features"], t["clip_score"], t["class_confidence"])


def write_shard_scores(out: Path, shard: str, shard_sha256: str, identity: str, result: ShardScores) -> None:
    """Tensors first (atomically), then the record that makes them count."""
    from safetensors.numpy import save_file

    from fillup_data.shards.writer import sha256_file
    from fillup_data.state import replace_durably, unique_temp_path, write_json_atomic

    tensors, record = _paths(out, shard, shard_sha256, identity)
    tensors.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_path(tensors)
    try:
        save_file({"features": np.ascontiguousarray(result.features, dtype=np.float32),
                   "clip_score": np.ascontiguousarray(result.clip_score, dtype=np.float64),
                   "class_confidence": np.ascontiguousarray(result.class_confidence, dtype=np.float64)}, str(tmp))
        replace_durably(tmp, tensors)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(record, {"format": FORMAT, "shard": shard, "shard_sha256": shard_sha256, "identity": identity,
                               "file": tensors.name, "file_sha256": sha256_file(tensors), "keys": result.keys})
