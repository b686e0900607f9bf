"""The build's record (``manifest.json``, contract) and the per-sample ``index.parquet`` (contract)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fillup_data.errors import FillupError
from fillup_data.shards.writer import METADATA_KEYS, encodes_as_utf8, show_undecodable
from fillup_data.state import read_json_record, replace_durably, unique_temp_path

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


def write_index(path: Path, rows: list[dict]) -> None:
    cols = {f.name: [r.get(f.name, 0 if f.name == "retries" else None) for r in rows] for f in INDEX_SCHEMA}
    try:
        table = pa.table(cols, schema=INDEX_SCHEMA)
    except UnicodeEncodeError:
        key, name, value = next((r["key"], k, v) for r in rows for k, v in r.items()
                                if isinstance(v, str) and not encodes_as_utf8(v))
        shown = show_undecodable(value)
        raise FillupError(
            f"{path}: sample {key}: {name} '{shown}' is not valid UTF-8 (a file name in another encoding?): "
            "rename the file to UTF-8 (e.g. with convmv) and rerun"
        ) from None
    tmp = unique_temp_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        raise FillupError(f"{path}: no manifest (is {out} a finished fillup-data build?)")
    manifest = read_json_record(path)
    if manifest is None:
        raise FillupError(f"{path}: unreadable (empty or not JSON); relaunch the build with the same --out to rewrite it")
    return manifest
