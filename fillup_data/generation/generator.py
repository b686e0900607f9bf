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

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fillup_data import fastpath
from fillup_data.errors import FillupError
from fillup_data.generation.sampler import BLACK_THRESHOLD, DenoisingSampler, resolve_batch_size
from fillup_data.inversion.token_file import TokenFile, read_token_file, token_name
from fillup_data.models.text import MARKER, encode_placeholder_prompt, encode_plain_prompt, encode_text

_TOKEN_CACHE_SIZE = 256  # token files kept in memory (100 checkpoints x 4 x 768 floats = 1.2 MB each)


@dataclass(frozen=True)
class SampleSpec:
    """One synthetic sample of the plan: class, seed, token checkpoint (-1 when not textual_inversion)."""

    class_index: int
    seed: int
    token_step: int = -1


@dataclass
class GeneratedSample:
    image: Image.Image  # RGB, generator.resolution square
    seed: int  # the seed actually used (spec seed + retries)
    retries: int
    prompt: str  # the exact human-readable prompt, e.g. "a photo of a <fillup-00017>"


def build_prompt(strategy: str, template: str, class_index: int, class_name: str) -> str:
    """The human-readable prompt. textual_inversion: ``{token}`` is the class's placeholder token;
    single_template: ``{token}`` and ``{class_name}`` are both the class name (paper baseline
    "a photo of a {CLS}")."""
    if strategy == "textual_inversion":
        return template.replace(MARKER, token_name(class_index)).replace("{class_name}", class_name)
    if strategy == "single_template":
        return template.replace(MARKER, class_name).replace("{class_name}", class_name)
    raise FillupError(f"generator.strategy: {strategy!r} generates no images (use textual_inversion or single_template)")


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

    def __init__(self, pipe, cfg, class_names: list[str], token_files: dict[int, Path] | None = None):
        if cfg.strategy not in ("textual_inversion", "single_template"):
            raise FillupError(f"generator.strategy: {cfg.strategy!r} generates no images")
        if cfg.strategy == "textual_inversion" and not token_files:
            raise FillupError("generator.strategy textual_inversion needs token files (run the invert stage first)")
        self.pipe = pipe
        self.cfg = cfg
        self.class_names = list(class_names)
        self.token_files = {int(k): Path(v) for k, v in (token_files or {}).items()}
        self._tokens: OrderedDict[int, TokenFile] = OrderedDict()
        self.device = pipe.unet.device
        self.dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        self._template = cfg.prompt
        if cfg.strategy == "textual_inversion" and MARKER not in cfg.prompt:
            raise FillupError(f"generator.prompt {cfg.prompt!r} must contain {MARKER} for textual_inversion")
        self.compiled = fastpath.compile_enabled(cfg.compile, self.device)
        self.sampler = DenoisingSampler(pipe, compiled=self.compiled)
        self.batch_size = resolve_batch_size(self.sampler, cfg)

    def pixel_setup(self) -> dict:
        """What decides this generator's pixels besides each sample's metadata (recorded per shard)."""
        return fastpath.pixel_setup(self.device, self.pipe.unet.dtype, self.compiled, self.batch_size)

    # ------------------------------------------------------------------ prompts
    def _token(self, class_index: int) -> TokenFile:
        if class_index in self._tokens:
            self._tokens.move_to_end(class_index)
            return self._tokens[class_index]
        path = self.token_files.get(class_index)
        if path is None:
            raise FillupError(f"class {class_index}: no token file given (expected tokens/{class_index:05d}.safetensors)")
        token = read_token_file(path)
        if token.class_index != class_index:
            raise FillupError(f"{path}: holds the token of class {token.class_index}, not {class_index}")
        some = next(iter(token.checkpoints.values()))
        if some.shape[-1] != self.dim:
            raise FillupError(
                f"{path}: token vectors have dimension {some.shape[-1]} but the text encoder of "
                f"{self.cfg.model!r} has {self.dim}; the token was learned on another model ({token.model_id!r})"
            )
        self._tokens[class_index] = token
        if len(self._tokens) > _TOKEN_CACHE_SIZE:
            self._tokens.popitem(last=False)
        return token

    def prompt_for(self, spec: SampleSpec) -> str:
        self._check_class(spec.class_index)
        return build_prompt(self.cfg.strategy, self._template, spec.class_index, self.class_names[spec.class_index])

    def _check_class(self, class_index: int) -> None:
        if not 0 <= class_index < len(self.class_names):
            raise FillupError(f"sample class {class_index} is outside the {len(self.class_names)} classes")

    @torch.no_grad()
    def encode(self, specs: list[SampleSpec]) -> torch.Tensor:
        """Text conditioning ``[B, 77, dim]`` for ``specs`` (each TI sample with its checkpoint's vectors)."""
        tokenizer = self.pipe.tokenizer
        prompts, vectors = [], []
        for spec in specs:
            self._check_class(spec.class_index)
            name = self.class_names[spec.class_index]
            if self.cfg.strategy == "textual_inversion":
                token = self._token(spec.class_index)
                text = self._template.replace("{class_name}", name)
                prompts.append(encode_placeholder_prompt(tokenizer, text, token.num_vectors))
                vectors.append(token.vectors(spec.token_step))
            else:
                prompts.append(encode_plain_prompt(tokenizer, self.prompt_for(spec)))
                vectors.append(None)
        return encode_text(self.pipe.text_encoder, prompts, vectors, self.device)

    # ------------------------------------------------------------------ sampling
    def _sample_batch(self, specs: list[SampleSpec], seeds: list[int]):
        """One denoising run on exactly ``batch_size`` rows (padded with copies of the first); the
        finished uint8 images and bad-image flags of the real rows, on the host."""
        m = self.batch_size
        pad = m - len(specs)
        specs = list(specs) + [specs[0]] * pad
        seeds = list(seeds) + [seeds[0]] * pad
        embeds = self.encode(specs).to(self.pipe.unet.dtype)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        res = self.cfg.resolution
        # guidance_scale 1.0: diffusers runs classifier-free guidance only when guidance_scale > 1,
        # so there is one UNet pass per step and no unconditional branch (paper: scale 1.0)
        batch = self.sampler.images(
            embeds, generators, guidance_scale=self.cfg.guidance_scale, num_inference_steps=self.cfg.num_inference_steps,
            eta=self.cfg.eta, height=res, width=res,
        )  # fmt: skip
        n = len(specs) - pad
        return batch.pixels[:n], batch.bad[:n]

    def generate(self, specs: list[SampleSpec], progress: bool = False) -> list[GeneratedSample]:
        """Images for ``specs`` in order; bad (black/non-finite) ones retried with seed + 1, + 2, ..."""
        from tqdm.auto import tqdm

        results: list[GeneratedSample | None] = [None] * len(specs)
        prompts = [self.prompt_for(s) for s in specs]
        todo = list(range(len(specs)))
        attempt = 0
        m = self.batch_size
        bar = tqdm(total=len(specs), desc="generate", unit="img", disable=not progress)
        try:
            while todo:
                bad: list[int] = []
                for start in range(0, len(todo), m):
                    chunk = todo[start : start + m]
                    seeds = [specs[i].seed + attempt for i in chunk]
                    pixels, is_bad = self._sample_batch([specs[i] for i in chunk], seeds)
                    for i, image, seed, flagged in zip(chunk, pixels, seeds, is_bad):
                        if flagged:
                            bad.append(i)
                            continue
                        results[i] = GeneratedSample(Image.fromarray(image, "RGB"), seed, attempt, prompts[i])
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

    def regenerate(self, spec: SampleSpec) -> GeneratedSample:
        """The sample of ``spec`` alone; with the recorded seed it equals the one made in a batch."""
        return self.generate([spec])[0]
