"""Textual Inversion: per-class multi-vector tokens learned on a frozen text-to-image model, and token files."""

from fillup_data.inversion.token_file import (
    TokenFile,
    export_diffusers,
    is_complete,
    read_embedding,
    read_token_file,
    token_name,
    write_token_file,
)
from fillup_data.inversion.trainer import (
    TEMPLATES,
    InversionJob,
    TextualInversionTrainer,
    evaluate_token_loss,
    invert_class,
    invert_classes,
    partial_path,
    preprocess_image,
)

__all__ = [
    "TEMPLATES",
    "InversionJob",
    "TextualInversionTrainer",
    "TokenFile",
    "evaluate_token_loss",
    "export_diffusers",
    "invert_class",
    "invert_classes",
    "is_complete",
    "partial_path",
    "preprocess_image",
    "read_embedding",
    "read_token_file",
    "token_name",
    "write_token_file",
]
