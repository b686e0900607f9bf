"""The real training images of each class, for the strategies that start from them (captions, image
variations, reimagine): their keys in plan order (``real_keys[c][k]`` = the class's k-th real sample) and a
loader by key.

Three places hold them: the source (captions are made in phase A, next to the real shards, from the same
file a real shard is written from, re-encoded as the shard stores it); the build's completed real shards
(image strategies, in phase B); and a finished build's real shards, for ``regenerate`` (a sample is made
again from the build alone, on a machine without the source). The last two read the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.generation.strategies import StrategyContext


def from_source(recipe, plan, out: Path | None = None, token_files=None) -> StrategyContext:
    """Keys and loader from the build's source (plan's real training samples, in key order per class)."""
    from PIL import Image

    from fillup_data.shards.writer import encode_image
    from fillup_data.sources import ImageLoadError, open_source

    items = {}
    keys: list[list[str]] = [[] for _ in plan.classes]
    for shard in plan.shards_of("train", "real"):
        for s in shard.samples:
            items[s.key] = s.item
            keys[s.item.label].append(s.key)
    for k in keys:
        k.sort()  # keys end in the zero-padded ordinal: key order is the source's order within a class
    source = None

    def load(key: str):
        nonlocal source
        if key not in items:
            raise FillupError(f"no real training sample {key!r} in the plan")
        source = source or open_source(recipe)
        try:
            image = source.load(items[key])
        except ImageLoadError as err:
            raise FillupError(f"{items[key].where}: the real image {key} no longer loads ({err.reason}: {err.detail}); "
                              "it is a source image of this strategy, restore it or rebuild the index") from None
        # as the real shard stores it (re-encoded: jpg, resize_short_side), so that a sample regenerated from
        # the build's real shards (``from_build``) is conditioned on the very same pixels
        return Image.open(io.BytesIO(encode_image(image, recipe.shards))).convert("RGB")

    return StrategyContext(out=out, token_files=dict(token_files or {}), real_keys=keys, load_real=load)


def _from_rows(folder: Path, rows: list[dict], num_classes: int, where_listed: str, token_files=None,
               missing_hint: str = "") -> StrategyContext:
    """Keys (per class, in key order) and a loader reading each image at its recorded offset in its shard."""
    from fillup_data.shards.index_parquet import read_stored_image

    where = {}
    keys: list[list[str]] = [[] for _ in range(num_classes)]
    for r in rows:
        if r["split"] == "train" and not r["is_synthetic"]:
            where[r["key"]] = r
            keys[r["label"]].append(r["key"])
    for k in keys:
        k.sort()  # keys end in the zero-padded ordinal: key order is the source's order within a class

    def load(key: str):
        if key not in where:
            raise FillupError(f"{where_listed}: no real training sample {key!r}{missing_hint}")
        return read_stored_image(folder, where[key])

    return StrategyContext(out=folder, token_files=dict(token_files or {}), real_keys=keys, load_real=load)


def from_real_shards(out: Path, plan, token_files=None) -> StrategyContext:
    """During a build, once its real training shards are complete (phase A): the images exactly as those
    shards store them, listed by their completion records. An image the source could not load is in no
    shard, so no sample is conditioned on it; the build and ``regenerate`` (``from_build``) see the same
    keys and the same pixels, whatever happens to the source files afterwards."""
    from fillup_data.state import completed_shard

    out = Path(out)
    rows = []
    for shard in plan.shards_of("train", "real"):
        record = completed_shard(out, shard)
        if record is None:
            raise FillupError(f"{out / shard.path}: the real shard is not complete, and the strategy "
                              f"{plan.strategy} conditions on its images; relaunch the build")
        rows += record["rows"]
    return _from_rows(out, rows, len(plan.classes), f"{out}/.fillup/shards", token_files)


def from_build(build: Path, num_classes: int, token_files=None) -> StrategyContext:
    """Keys and loader from a finished build's real training shards (via ``index.parquet``)."""
    from fillup_data.shards.index_parquet import read_index

    build = Path(build)
    rows = read_index(build / "index.parquet", columns=["key", "shard", "split", "label", "is_synthetic",
                                                       "image_offset", "image_size"])
    return _from_rows(build, rows, num_classes, str(build / "index.parquet"), token_files,
                      " (a build published without its real shards cannot regenerate samples made from real images)")
