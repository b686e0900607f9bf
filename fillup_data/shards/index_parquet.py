"""The per-sample ``index.parquet`` (contract): written by the assemble stage, read by regenerate,
the figures and the experiment.  Its columns derive from ``fillup_data.schema.sample``; the build's
record, ``manifest.json``, is ``fillup_data.schema.manifest.Manifest``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fillup_data.errors import FillupError
from fillup_data.schema import sample as sample_schema
from fillup_data.shards.writer import encodes_as_utf8, show_undecodable
from fillup_data.state import replace_durably, unique_temp_path


def _table(path: Path, rows: list[dict], schema) -> pa.Table:
    cols = {f.name: [r.get(f.name, 0 if f.name == "retries" else None) for r in rows] for f in schema}
    try:
        return pa.table(cols, schema=schema)
    except UnicodeEncodeError:
        key, name, value = next((r["key"], k, v) for r in rows for k, v in r.items()
                                if isinstance(v, str) and not encodes_as_utf8(v))
        shown = show_undecodable(value)
        raise FillupError(
            f"{path}: sample {key}: {name} '{shown}' is not valid UTF-8 (a file name in another encoding?): "
            "rename the file to UTF-8 (e.g. with convmv) and rerun"
        ) from None


class IndexWriter:
    """Writes ``index.parquet`` a batch of rows at a time (row groups of ``ROW_GROUP`` rows), so a build of
    millions of samples is indexed with the rows of one shard in memory; renamed into place, durably, only
    by ``close`` (an error or ``abort`` leaves the old index, if any)."""

    ROW_GROUP = 1 << 16

    def __init__(self, path: Path):
        self.path = Path(path)
        self.schema = sample_schema.index_schema()
        self.tmp = unique_temp_path(self.path)
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self._rows: list[dict] = []
        self.num_rows = 0

    def write(self, rows: list[dict]) -> None:
        self._rows += rows
        while len(self._rows) >= self.ROW_GROUP:
            self._flush(self._rows[: self.ROW_GROUP])
            del self._rows[: self.ROW_GROUP]

    def _flush(self, rows: list[dict]) -> None:
        if rows:
            self._writer.write_table(_table(self.path, rows, self.schema), row_group_size=self.ROW_GROUP)
            self.num_rows += len(rows)

    def close(self) -> None:
        try:
            self._flush(self._rows)
            self._rows = []
            self._writer.close()
            replace_durably(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.abort() if exc_type is not None else self.close()


def write_index(path: Path, rows: list[dict]) -> None:
    with IndexWriter(path) as writer:
        writer.write(rows)


def write_index_table(path: Path, table) -> None:
    """Write an index table atomically and durably (zstd), as every writer of ``index.parquet`` does."""
    tmp = unique_temp_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path, columns: list[str] | None = None, filters=None) -> list[dict]:
    """Rows of ``index.parquet`` (all columns, or ``columns``), each with every current metadata key: a
    build made before a key was added gets it at its not-applicable value (``source_key`` = "")."""
    present = set(pq.read_schema(path).names)
    wanted = None if columns is None else [c for c in columns if c in present]
    rows = pq.read_table(path, columns=wanted, filters=filters).to_pylist()
    rows = [sample_schema.as_current(r) for r in rows]
    if columns is not None:
        missing = [c for c in columns if c not in present and c not in sample_schema.METADATA_KEYS]
        if missing:
            raise FillupError(f"{path}: no column {missing[0]!r}; rebuild with `fillup-data build`")
        rows = [{c: r[c] for c in columns} for r in rows]
    return rows


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
    row.update({k: metadata[k] for k in sample_schema.METADATA_KEYS})
    return row


def read_stored_image(folder: Path, row: dict):
    """The image of an index row (``shard``, ``image_offset``, ``image_size``, ``key``) as RGB, read with
    one seek from its tar; a missing shard or an image that does not decode is an error naming the shard
    and the sample."""
    import io

    from PIL import Image

    path = Path(folder) / row["shard"]
    try:
        with open(path, "rb") as f:
            f.seek(row["image_offset"])
            data = f.read(row["image_size"])
    except OSError as err:
        raise FillupError(f"{path}: cannot read the image of sample {row.get('key')} ({err.strerror or err}); "
                          "relaunch the build to rewrite the shard, or fetch it again") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder error: the stored image is damaged
        raise FillupError(f"{path}: the image of sample {row.get('key')} does not decode ({err}); run "
                          f"`fillup-data inspect {Path(folder)}` and relaunch the build") from None
