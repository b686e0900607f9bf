"""toyworld: a small text-to-image model of fillup_data.demo.world, trained here and shipped with the package.

It lets the offline demo show Fill-Up working (issue 6): the generator draws the world's shapes and
colours from words, Textual Inversion finds a class from a few images, and the world classifier
judges the results. Everything is stock diffusers/transformers classes in a ``save_pretrained``
folder (``fillup_data/demo/toyworld/pipeline``) that loads with ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

from fillup_data.models.pipeline import toyworld_dir as pipeline_dir

ALIAS = "builtin:toyworld"


def load_toyworld(device: str = "cpu", scheduler: str = "ddim"):
    """The shipped pipeline through the project's loader (float32: fp16 kernels are slow on CPU)."""
    from fillup_data.models.pipeline import load_pipeline

    return load_pipeline(str(pipeline_dir()), dtype="float32", device=device, scheduler=scheduler)


__all__ = ["ALIAS", "load_toyworld", "pipeline_dir"]
