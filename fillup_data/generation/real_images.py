"""The real training images of each class, for the strategies that start from them (captions, image
variations, reimagine): their keys in plan order (``real_keys[c][k]`` = the class's k-th real sample) and a
loader by key.

Two places hold them: the source, during a build (the same file the real shard is written from, decoded
by the same source loader that inversion uses), and the finished build's real shards, for ``regenerate``
(a sample is made again from the build alone, on a machine without the source).
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


def from_build(build: Path, num_classes: int, token_files=None) -> StrategyContext:
    """Keys and loader from a finished build's real training shards (via ``index.parquet``)."""
    from PIL import Image

    from fillup_data.shards.index_parquet import read_index

    build = Path(build)
    rows = read_index(build / "index.parquet", columns=["key", "shard", "split", "label", "is_synthetic",
                                                       "image_offset", "image_size"])
    where = {}
    keys: list[list[str]] = [[] for _ in range(num_classes)]
    for r in rows:
        if r["split"] == "train" and not r["is_synthetic"]:
            where[r["key"]] = r
            keys[r["label"]].append(r["key"])
    for k in keys:
        k.sort()

    def load(key: str):
        if key not in where:
            raise FillupError(f"{build / 'index.parquet'}: no real training sample {key!r} (a build published "
                              "without its real shards cannot regenerate samples made from real images)")
        r = where[key]
        try:
            with open(build / r["shard"], "rb") as f:
                f.seek(r["image_offset"])
                data = f.read(r["image_size"])
            return Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError) as err:
            raise FillupError(f"{build / r['shard']}: cannot read the real image {key} ({err})") from None

    return StrategyContext(out=build, token_files=dict(token_files or {}), real_keys=keys, load_real=load)
