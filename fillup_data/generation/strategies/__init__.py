"""Generation strategies (paper section 3.1, Table 1, appendix B.1-B.3), one class each behind one interface.

A strategy decides, for every synthetic sample of the plan, what the image is conditioned on -- the exact
prompt, or the real image it varies -- and turns a micro-batch of samples into the denoising loop's
conditioning.  Everything else (seeds, micro-batches, bad-image retries, shards, metadata) is shared.

* ``condition(spec)`` -> :class:`Condition`: the human-readable prompt and, where the image comes from a
  real one, the real sample's key (``source_key``).  Both go into the sample's metadata.  A pure function
  of the plan entry (class, ordinal, token checkpoint) and what the build stored before generation
  (tokens, generated prompts, captions), so every worker, rank and resume agrees.
* ``encode(specs, conditions)`` -> :class:`Conditioning`: the embeddings for ``DenoisingSampler``.
  Text strategies encode the prompt itself, so a sample is regenerated from its recorded prompt alone.

Per-class lists (templates, generated prompts, captions, source images) are used evenly: the sample with
ordinal k of a class takes item ``k mod n`` (paper B.2: "we utilize each source image 260 times").

The registry maps a ``generator.strategy`` value to its class, imported on first use (the recipe is
validated without importing torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from fillup_data.errors import FillupError

if TYPE_CHECKING:  # pragma: no cover
    import torch

# generator.strategy -> "module:Class" (modules under fillup_data.generation.strategies)
REGISTRY: dict[str, str] = {
    "single_template": "templates:SingleTemplate",
    "clip_templates": "templates:ClipTemplates",
    "textual_inversion": "inversion:TextualInversion",
    "lm_prompts": "prompted:LanguageModelPrompts",
    "captions": "prompted:Captions",
    "image_variation": "images:ImageVariation",
    "reimagine": "images:Reimagine",
}


@dataclass(frozen=True)
class Condition:
    """What one synthetic sample is conditioned on, as recorded in its metadata."""

    prompt: str  # the exact prompt ("" where the image is conditioned on a real image alone)
    source_key: str = ""  # the key of the real sample it came from ("" where none)


@dataclass
class Conditioning:
    """A micro-batch's conditioning for ``DenoisingSampler.denoise``: ``embeds`` (the UNet's
    ``encoder_hidden_states``); ``negative`` the unconditional half under guidance (None: the pipeline's
    empty-prompt embeddings); ``class_labels`` extra UNet conditioning (unCLIP's image embeddings), with
    ``negative_class_labels`` its unconditional half."""

    embeds: "torch.Tensor"
    negative: "torch.Tensor | None" = None
    class_labels: "torch.Tensor | None" = None
    negative_class_labels: "torch.Tensor | None" = None


@dataclass
class StrategyContext:
    """What a strategy may read besides its config: the build folder (``prompts/``, ``tokens/``), the
    class token files, and the real training images of each class in plan order (``real_keys[c][k]`` is
    the key of the class's k-th real sample; ``load_real(key)`` its image)."""

    out: Path | None = None
    token_files: dict[int, Path] = field(default_factory=dict)
    real_keys: list[list[str]] | None = None
    load_real: Callable[[str], object] | None = None

    def real_keys_of(self, class_index: int, strategy: str) -> list[str]:
        if self.real_keys is None:
            raise FillupError(f"generator.strategy {strategy}: needs the real images of each class, and none were given")
        keys = self.real_keys[class_index] if class_index < len(self.real_keys) else []
        if not keys:
            raise FillupError(f"generator.strategy {strategy}: class {class_index} has no real training images "
                              "to draw from")
        return keys


class Strategy:
    """The interface; subclasses set ``name`` and implement ``condition`` (and ``encode`` when they do not
    condition on the prompt text alone)."""

    name: ClassVar[str]
    inverts: ClassVar[bool] = False  # needs the invert stage's token files
    prepares: ClassVar[bool] = False  # needs the prompts stage (prompts/ stored in the build)
    uses_real_images: ClassVar[bool] = False  # conditions on the real images of the class

    def __init__(self, cfg, class_names: list[str], context: StrategyContext | None = None):
        self.cfg = cfg
        self.class_names = list(class_names)
        self.context = context or StrategyContext()

    # ------------------------------------------------------------------ the interface
    def condition(self, spec) -> Condition:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, pipe, specs: list, conditions: list[Condition]) -> Conditioning:
        """Default: each sample's recorded prompt through the pipeline's tokenizer and text encoder."""
        from fillup_data.models.text import encode_plain_prompt, encode_text

        prompts = [encode_plain_prompt(pipe.tokenizer, c.prompt) for c in conditions]
        return Conditioning(encode_text(pipe.text_encoder, prompts, [None] * len(prompts), pipe.unet.device))

    def seeded(self, pipe, conditioning: Conditioning, generators: list) -> Conditioning:
        """The conditioning after any draw from the samples' own generators that the pipeline makes before
        the initial latents (unCLIP noises its image embeddings so); default: none."""
        return conditioning

    @classmethod
    def load_pipeline(cls, cfg, device: str):
        """The pipeline this strategy samples with (``generator.model``; default a text-to-image one)."""
        from fillup_data.models import load_pipeline_for

        return load_pipeline_for(cfg, device=device)

    # ------------------------------------------------------------------ shared helpers
    def class_name(self, class_index: int) -> str:
        if not 0 <= class_index < len(self.class_names):
            raise FillupError(f"sample class {class_index} is outside the {len(self.class_names)} classes")
        return self.class_names[class_index]

    @staticmethod
    def evenly(items: list, ordinal: int):
        """Item ``ordinal mod len(items)``: each item used equally often (paper B.2)."""
        return items[ordinal % len(items)]


def strategy_class(name: str) -> type[Strategy]:
    if name not in REGISTRY:
        raise FillupError(f"generator.strategy: {name!r} generates no images (one of {', '.join(sorted(REGISTRY))})")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(f"fillup_data.generation.strategies.{module}"), cls)


def make_strategy(cfg, class_names: list[str], context: StrategyContext | None = None) -> Strategy:
    return strategy_class(cfg.strategy)(cfg, class_names, context)


__all__ = ["Condition", "Conditioning", "REGISTRY", "Strategy", "StrategyContext", "make_strategy", "strategy_class"]
