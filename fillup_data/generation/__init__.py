"""Synthetic image generation: strategies, seeded class-mixed batches, bad-image retries, preview grids.

The names below load their modules on first use: ``plan``, ``status`` and ``inspect`` reach small
modules of this package (prompt files, templates) without importing torch (half a gigabyte of memory).
"""

from fillup_data.lazy import lazy_names

_WHERE = {
    "BLACK_THRESHOLD": "generator", "GeneratedSample": "generator", "SampleSpec": "generator",
    "SyntheticGenerator": "generator", "build_prompt": "generator", "is_bad_image": "generator",
    "preview_grid": "preview",
    "Condition": "strategies", "Conditioning": "strategies", "Strategy": "strategies", "StrategyContext": "strategies",
}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE)
