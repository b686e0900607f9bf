"""Stage 3, real shards: decode, re-encode and write one shard of real images."""

from __future__ import annotations

from pathlib import Path

from fillup_data.plan import RealSample, ShardPlan
from fillup_data.recipe import Recipe
from fillup_data.schema.sample import real_metadata
from fillup_data.shards.index_parquet import index_row
from fillup_data.shards.writer import ShardWriter, encode_image
from fillup_data.sources import ImageLoadError, open_source
from fillup_data.state import completed_shard, save_shard_record, shard_record


def write_real_shard(recipe: Recipe, shard: ShardPlan, out: Path, class_names: list[str]) -> dict:
    """Write the shard's tar (atomically) and return its completion record (not saved yet)."""
    source = open_source(recipe)
    writer = ShardWriter(out / shard.path, recipe.shards.image_format)
    rows, skipped, metas = [], [], []
    try:
        for s in shard.samples:
            assert isinstance(s, RealSample)
            try:
                img = source.load(s.item)
            except ImageLoadError as err:  # changed on disk since indexing: report, never lose silently
                skipped.append({"split": shard.split, "label": s.item.label, "source_path": s.item.source_path,
                                "where": s.item.where, "reason": err.reason, "detail": err.detail})
                continue
            meta = real_metadata(s.item.label, class_names[s.item.label], s.item.source_path)
            writer.write(s.key, s.item.label, encode_image(img, recipe.shards), meta)
            metas.append(meta)
        num_bytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    for rec, meta in zip(writer.records, metas):
        rows.append(index_row(rec, shard.path, shard.split, meta))
    return shard_record(shard, len(rows), num_bytes, sha, rows, skipped)


def run_real_shard(recipe: Recipe, shard: ShardPlan, out: Path, class_names: list[str]) -> dict:
    """The task: skip when done; else write the shard, then its completion record (last)."""
    if completed_shard(out, shard) is not None:
        return {"skipped": True}
    record = write_real_shard(recipe, shard, out, class_names)
    save_shard_record(out, shard, record)
    return {"images": record["num_samples"]}
