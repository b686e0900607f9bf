"""Long-tailed sources (contract names: split_file, image_folder, hf_dataset, demo)."""

from __future__ import annotations

import math
from collections import defaultdict

from fillup_data.recipe import Recipe
from fillup_data.sources.base import SKIP_REASONS, FileState, ImageLoadError, Source, SourceItem


def open_source(recipe: Recipe) -> Source:
    cfg = recipe.source
    if cfg.kind == "split_file":
        from fillup_data.sources.split_file import SplitFileSourceImpl

        return SplitFileSourceImpl(cfg)
    if cfg.kind == "image_folder":
        from fillup_data.sources.image_folder import ImageFolderSourceImpl

        return ImageFolderSourceImpl(cfg)
    if cfg.kind == "hf_dataset":
        from fillup_data.sources.hf_dataset import HFDatasetSourceImpl

        return HFDatasetSourceImpl(cfg)
    if cfg.kind == "demo":
        from fillup_data.demo.source import DemoSource

        return DemoSource(cfg, recipe.seed)
    raise ValueError(cfg.kind)  # unreachable: the schema only admits the kinds above


def longtail_sizes(num_classes: int, imbalance_factor: float, n_max: int) -> list[int]:
    """CIFAR-LT (Cao et al. 2019): n_i = floor(n_max * (1/IF)^(i/(C-1)))."""
    if num_classes == 1:
        return [n_max]
    return [int(math.floor(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1)))) for i in range(num_classes)]


def apply_imbalance(items: list[SourceItem], num_classes: int, imbalance_factor: float, n_max: int | None) -> list[SourceItem]:
    """Keep the first n_i items of class i (source order), turning a balanced set long-tailed."""
    by_class: dict[int, list[SourceItem]] = defaultdict(list)
    for it in items:
        by_class[it.label].append(it)
    if n_max is None:
        n_max = min((len(by_class.get(c, [])) for c in range(num_classes)), default=0)
    sizes = longtail_sizes(num_classes, imbalance_factor, n_max)
    keep = {c: {id(it) for it in by_class.get(c, [])[: sizes[c]]} for c in range(num_classes)}
    return [it for it in items if id(it) in keep[it.label]]


__all__ = [
    "SKIP_REASONS",
    "FileState",
    "ImageLoadError",
    "Source",
    "SourceItem",
    "apply_imbalance",
    "longtail_sizes",
    "open_source",
]
