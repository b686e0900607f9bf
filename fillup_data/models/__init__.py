"""Text-to-image models: loading pipelines by id or path, built-in tiny and full-size random models."""

from fillup_data.models.architectures import build_random_pipeline, count_parameters, load_component_config
from fillup_data.models.pipeline import (
    BUILTIN_MODELS,
    cache_dir,
    default_device,
    load_pipeline,
    load_pipeline_for,
    resolve_dtype,
    resolve_model,
    set_scheduler,
)

__all__ = [
    "BUILTIN_MODELS",
    "build_random_pipeline",
    "cache_dir",
    "count_parameters",
    "default_device",
    "load_component_config",
    "load_pipeline",
    "load_pipeline_for",
    "resolve_dtype",
    "resolve_model",
    "set_scheduler",
]
