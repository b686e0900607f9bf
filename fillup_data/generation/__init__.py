"""Synthetic image generation: strategies, seeded class-mixed batches, bad-image retries, preview grids."""

from fillup_data.generation.generator import (
    BLACK_THRESHOLD,
    GeneratedSample,
    SampleSpec,
    SyntheticGenerator,
    build_prompt,
    is_bad_image,
)
from fillup_data.generation.preview import preview_grid
from fillup_data.generation.strategies import Condition, Conditioning, Strategy, StrategyContext

__all__ = [
    "BLACK_THRESHOLD",
    "Condition",
    "Conditioning",
    "Strategy",
    "StrategyContext",
    "GeneratedSample",
    "SampleSpec",
    "SyntheticGenerator",
    "build_prompt",
    "is_bad_image",
    "preview_grid",
]
