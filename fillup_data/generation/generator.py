"""Seeded, batched, class-mixed sampling of synthetic images (paper 3.2, DESIGN "generate").

Every sample has its own ``torch.Generator`` seeded from its plan entry, so it can be regenerated
from its metadata alone. Exactness: on CPU, the UNet and VAE give slightly different numbers for
a sample run alone than inside a batch (oneDNN picks other kernels for batch size 1), while at a
fixed batch size a row's result does not depend on the other rows or its position. So sampling
always runs in micro-batches of exactly ``batch_size`` rows, padding the last one with copies: a
sample generated alone (``regenerate``) is computed in the same shape as inside any mixed batch and
gives the same pixels (tested). The same holds compiled: every call has that one static shape, so
the compiled UNet and decoder are traced once and a sample alone equals it in a batch (tested).

What else decides the last bits is recorded per shard (``pixel_setup``): device kind, dtype,
compile on/off (compiled kernels differ from eager ones in rounding), the micro-batch rows, the
torch/diffusers versions and the CPU thread count. The sampling itself
(``generation.sampler``) is bit-identical to diffusers' ``StableDiffusionPipeline`` call (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fillup_data import fastpath
from fillup_data.errors import FillupError
from fillup_data.generation.sampler import BLACK_THRESHOLD, DenoisingSampler, resolve_batch_size
from fillup_data.generation.strategies import Condition, Conditioning, StrategyContext, make_strategy
from fillup_data.inversion.token_file import token_name
from fillup_data.models.text import MARKER


@dataclass(frozen=True)
class SampleSpec:
    """One synthetic sample of the plan: class, seed, token checkpoint (-1 when not textual_inversion) and
    its ordinal among the class's samples (which template, prompt or source image it uses)."""

    class_index: int
    seed: int
    token_step: int = -1
    ordinal: int = 0


@dataclass
class GeneratedSample:
    image: Image.Image  # RGB, generator.resolution square
    seed: int  # the seed actually used (spec seed + retries)
    retries: int
    prompt: str  # the exact human-readable prompt, e.g. "a photo of a <fillup-00017>"
    source_key: str = ""  # the real sample it came from (image variations, captions)


def build_prompt(strategy: str, template: str, class_index: int, class_name: str) -> str:
    """The human-readable prompt. textual_inversion: ``{token}`` is the class's placeholder token;
    single_template: ``{token}`` and ``{class_name}`` are both the class name (paper baseline
    "a photo of a {CLS}")."""
    if strategy == "textual_inversion":
        return template.replace(MARKER, token_name(class_index)).replace("{class_name}", class_name)
    if strategy == "single_template":
        return template.replace(MARKER, class_name).replace("{class_name}", class_name)
    raise FillupError(f"build_prompt: {strategy!r} has no single template")


def is_bad_image(image: np.ndarray) -> bool:
    """Non-finite, or black everywhere (what a triggered safety checker or an fp16 overflow returns).
    The reference for ``sampler.finish_images``, which computes the same flags on the device."""
    return bool(not np.isfinite(image).all() or (image < BLACK_THRESHOLD).all())


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float HWC -> uint8 HWC, rounded (deterministic); ``sampler.finish_images`` does the same
    float32 math on the device."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class SyntheticGenerator:
    """Generates images for a list of ``SampleSpec`` in class-mixed micro-batches.

    ``cfg.batch_size`` and ``cfg.compile`` may be ``auto``: the micro-batch is then sized here (from
    free memory on CUDA, ``fastpath.CPU_GENERATION_BATCH`` elsewhere; a build pins it once through
    ``synthesis.make_generator``) and compile is on for CUDA. ``.batch_size`` and ``.compiled`` are
    the resolved values."""

    def __init__(self, pipe, cfg, class_names: list[str], token_files: dict[int, Path] | None = None,
                 context: StrategyContext | None = None):
        context = context or StrategyContext()
        if token_files:
            context = StrategyContext(context.out, {int(k): Path(v) for k, v in token_files.items()},
                                      context.real_keys, context.load_real)
        self.pipe = pipe
        self.cfg = cfg
        self.class_names = list(class_names)
        self.strategy = make_strategy(cfg, self.class_names, context)
        self.device = pipe.unet.device
        self.compiled = fastpath.compile_enabled(cfg.compile, self.device)
        self.sampler = DenoisingSampler(pipe, compiled=self.compiled)
        self.batch_size = resolve_batch_size(self.sampler, cfg)

    def pixel_setup(self) -> dict:
        """What decides this generator's pixels besides each sample's metadata (recorded per shard)."""
        return fastpath.pixel_setup(self.device, self.pipe.unet.dtype, self.compiled, self.batch_size)

    # ------------------------------------------------------------------ conditioning
    def condition(self, spec: SampleSpec) -> Condition:
        """The sample's prompt and source, as its metadata records them."""
        return self.strategy.condition(spec)

    def prompt_for(self, spec: SampleSpec) -> str:
        return self.condition(spec).prompt

    @torch.no_grad()
    def conditioning(self, specs: list[SampleSpec], conditions: list[Condition] | None = None) -> Conditioning:
        if conditions is None:
            conditions = [self.condition(s) for s in specs]
        return self.strategy.encode(self.pipe, specs, conditions)

    @torch.no_grad()
    def encode(self, specs: list[SampleSpec]) -> torch.Tensor:
        """Text conditioning ``[B, 77, dim]`` for ``specs`` (each TI sample with its checkpoint's vectors)."""
        return self.conditioning(specs).embeds

    # ------------------------------------------------------------------ sampling
    def _sample_batch(self, specs: list[SampleSpec], conditions: list[Condition], seeds: list[int]):
        """One denoising run on exactly ``batch_size`` rows (padded with copies of the first); the
        finished uint8 images and bad-image flags of the real rows, on the host."""
        m = self.batch_size
        pad = m - len(specs)
        specs = list(specs) + [specs[0]] * pad
        conditions = list(conditions) + [conditions[0]] * pad
        seeds = list(seeds) + [seeds[0]] * pad
        cond = self.conditioning(specs, conditions)
        dtype = self.pipe.unet.dtype
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        cond = self.strategy.seeded(self.pipe, cond, generators)  # e.g. unCLIP's embedding noise, before latents
        res = self.cfg.resolution
        # guidance_scale 1.0: diffusers runs classifier-free guidance only when guidance_scale > 1,
        # so there is one UNet pass per step and no unconditional branch (paper: scale 1.0)
        batch = self.sampler.images(
            cond.embeds.to(dtype), generators, guidance_scale=self.cfg.guidance_scale,
            num_inference_steps=self.cfg.num_inference_steps, eta=self.cfg.eta, height=res, width=res,
            negative_embeds=cond.negative, class_labels=cond.class_labels,
            negative_class_labels=cond.negative_class_labels,
        )  # fmt: skip
        n = len(specs) - pad
        return batch.pixels[:n], batch.bad[:n]

    def generate(self, specs: list[SampleSpec], progress: bool = False,
                 conditions: list[Condition] | None = None) -> list[GeneratedSample]:
        """Images for ``specs`` in order; bad (black/non-finite) ones retried with seed + 1, + 2, ...
        ``conditions`` (default: the strategy's) pins what each sample is conditioned on, e.g. the
        prompt recorded in a sample's metadata when regenerating it."""
        from fillup_data.progress import progress_bar

        results: list[GeneratedSample | None] = [None] * len(specs)
        if conditions is None:
            conditions = [self.condition(s) for s in specs]
        todo = list(range(len(specs)))
        attempt = 0
        m = self.batch_size
        bar = progress_bar(len(specs), "generate", "img", enabled=progress)
        try:
            while todo:
                bad: list[int] = []
                for start in range(0, len(todo), m):
                    chunk = todo[start : start + m]
                    seeds = [specs[i].seed + attempt for i in chunk]
                    pixels, is_bad = self._sample_batch([specs[i] for i in chunk], [conditions[i] for i in chunk],
                                                        seeds)
                    for i, image, seed, flagged in zip(chunk, pixels, seeds, is_bad):
                        if flagged:
                            bad.append(i)
                            continue
                        results[i] = GeneratedSample(Image.fromarray(image, "RGB"), seed, attempt, conditions[i].prompt,
                                                     conditions[i].source_key)
                        bar.update(1)
                if bad and attempt >= self.cfg.max_retries:
                    i = bad[0]
                    raise FillupError(
                        f"class {specs[i].class_index} seed {specs[i].seed}: {attempt + 1} black or non-finite images "
                        f"in a row (seeds {specs[i].seed}..{specs[i].seed + attempt}); with generator.dtype float16 "
                        "try float32 or bfloat16, with generator.safety_checker true try false, or raise "
                        "generator.max_retries"
                    )
                todo = bad
                attempt += 1
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def regenerate(self, spec: SampleSpec, condition: Condition | None = None) -> GeneratedSample:
        """The sample of ``spec`` alone; with the recorded seed it equals the one made in a batch."""
        return self.generate([spec], conditions=None if condition is None else [condition])[0]
