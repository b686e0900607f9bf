"""Textual Inversion: per-class multi-vector tokens learned on a frozen text-to-image model, and token files.

Names load their modules on first use: ``is_complete`` (asked by ``status`` for every class) needs no torch.
"""

from fillup_data.lazy import lazy_names

_WHERE = {
    "is_complete": "completion",
    **{name: "token_file" for name in ("TokenFile", "export_diffusers", "read_embedding", "read_token_file",
                                       "token_name", "write_token_file")},
    **{name: "trainer" for name in ("TEMPLATES", "InversionJob", "TextualInversionTrainer", "evaluate_token_loss",
                                    "invert_class", "invert_classes", "partial_path", "preprocess_image")},
}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE)
