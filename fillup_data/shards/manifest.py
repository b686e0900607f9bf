"""The build's record (``manifest.json``, contract) and the per-sample ``index.parquet`` (contract)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fillup_data.shards.writer import METADATA_KEYS

MANIFEST_KEYS = ("name", "version", "fingerprint", "recipe", "classes", "shards")

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("split", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("is_synthetic", pa.bool_()),
        ("strategy", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("token_step", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("num_inference_steps", pa.int64()),
        ("model", pa.string()),
        ("source_path", pa.string()),
        ("retries", pa.int64()),
    ]
)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_index(path: Path, rows: list[dict]) -> None:
    cols = {f.name: [r.get(f.name, 0 if f.name == "retries" else None) for r in rows] for f in INDEX_SCHEMA}
    table = pa.table(cols, schema=INDEX_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def index_row(record, shard_path: str, split: str, metadata: dict, retries: int = 0) -> dict:
    row = {
        "key": record.key,
        "shard": shard_path,
        "split": split,
        "offset": record.offset,
        "size": record.size,
        "image_offset": record.image_offset,
        "image_size": record.image_size,
        "retries": retries,
    }
    row.update({k: metadata[k] for k in METADATA_KEYS})
    return row


def read_manifest(out: Path) -> dict:
    path = Path(out) / "manifest.json"
    if not path.is_file():
        from fillup_data.errors import FillupError

        raise FillupError(f"{path}: no manifest (is {out} a finished fillup-data build?)")
    return json.loads(path.read_text(encoding="utf-8"))
