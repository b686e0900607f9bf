"""Our denoising loop: what ``StableDiffusionPipeline.__call__`` (diffusers 0.42) computes for the
generator's arguments, minus what costs time on a GPU.  The same loop is what
``StableDiffusionImageVariationPipeline`` (image embeddings as ``encoder_hidden_states``, zeros as the
unconditional half) and ``StableUnCLIPImg2ImgPipeline`` (noised image embeddings as ``class_labels``, no
safety checker) compute: tested bit-identical to both calls as well.

Mirrored from the pipeline, step for step, so the pixels are bit-identical to
``pipe(prompt_embeds=..., generator=[...], output_type="np")`` on the same device (tested on CPU for
ddim, dpmpp_2m and euler, with and without guidance and DDIM eta): embeddings in the text encoder's
dtype; with guidance_scale > 1 the empty prompt's embeddings as the unconditional half; initial
latents from the per-row CPU generators, times ``init_noise_sigma``; ``scale_model_input``; the
scheduler's ``step``; decode of ``latents / scaling_factor``; the safety checker when the pipeline
has one; ``(x * 0.5 + 0.5).clamp(0, 1)`` in the decoder's dtype.

What differs is where things run:

* no host synchronisation inside the loop: the scheduler gets CPU timesteps (its tables are CPU
  tensors, and a CUDA timestep used as their index is a device sync each step), the UNet gets its
  timestep from a device copy made once before the loop; DDIM's eta noise is drawn from the per-row
  generators before the loop in the order the pipeline draws it, and moved to the device once;
* the image is finished on the device (bad-image flags and uint8 conversion in float32, the same
  math as ``is_bad_image`` and ``to_uint8``), and each micro-batch comes to the host in one copy;
* optionally, the UNet and the VAE decode are compiled (inductor, static shapes).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from fillup_data import fastpath

BLACK_THRESHOLD = 2 / 255  # an image whose every pixel is below this is "black" (safety checker, NaN VAE)


@dataclass
class FinishedBatch:
    """One micro-batch on the host: ``pixels`` uint8 ``[B, H, W, 3]``, ``bad`` bool ``[B]``."""

    pixels: np.ndarray
    bad: np.ndarray


def finish_images(image: torch.Tensor, denormalize: list[bool] | None = None) -> FinishedBatch:
    """Decoder output ``[B, 3, H, W]`` in [-1, 1] -> uint8 HWC rows and bad-image flags, with one
    copy to the host. ``denormalize`` as diffusers' ``do_denormalize`` (rows the safety checker
    replaced are left as they are, i.e. black)."""
    if denormalize is None:
        image = (image * 0.5 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize, in the decoder's dtype
    else:
        image = torch.stack([(image[i] * 0.5 + 0.5).clamp(0, 1) if d else image[i] for i, d in enumerate(denormalize)])
    image = image.permute(0, 2, 3, 1).float()
    rows = image.shape[0]
    flat = image.reshape(rows, -1)
    # is_bad_image: non-finite anywhere, or every value below the black threshold
    bad = ~torch.isfinite(flat).all(dim=1) | (flat < BLACK_THRESHOLD).all(dim=1)
    # to_uint8: clip, * 255 + 0.5, truncate (two float32 ops, as numpy does them)
    pixels = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    packed = torch.cat([pixels.reshape(rows, -1), bad.to(torch.uint8)[:, None]], dim=1).cpu().numpy()
    return FinishedBatch(packed[:, :-1].reshape(image.shape), packed[:, -1].astype(bool))


class DenoisingSampler:
    """Runs the pipeline's computation on ``pipe``'s modules; ``compiled`` compiles the UNet and the VAE
    decode once, here (their shapes must then stay the same from call to call)."""

    def __init__(self, pipe, compiled: bool = False):
        self.pipe = pipe
        self.device = pipe.unet.device
        self.compiled = bool(compiled)
        self._unet = pipe.unet
        self._decode = self._eager_decode
        if self.compiled:
            fastpath.configure_compile_cache()
            vae = pipe.vae

            def decode(latents):
                return vae.decode(latents, return_dict=False)[0]

            # dynamic=False: a second shape recompiles for that shape instead of switching to
            # dynamic-shape kernels, which would change the pixels of the shape already in use
            self._unet = torch.compile(pipe.unet, dynamic=False)
            self._decode = torch.compile(decode, dynamic=False)
        self._empty_prompt: dict[int, torch.Tensor] = {}
        step = inspect.signature(pipe.scheduler.step).parameters
        self._step_takes = {name for name in ("eta", "generator") if name in step}

    # ------------------------------------------------------------------ pieces of __call__
    def _eager_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latents, return_dict=False)[0]  # looked up per call: tests patch it

    def _embeds_dtype(self) -> torch.dtype:
        """The conditioning's (and so the latents') dtype, as the pipeline picks it: the text encoder's; for the
        image-variation pipeline, which has none, the image encoder's."""
        pipe = self.pipe
        if getattr(pipe, "text_encoder", None) is not None:
            return pipe.text_encoder.dtype
        if getattr(pipe, "image_encoder", None) is not None:
            return next(pipe.image_encoder.parameters()).dtype
        return pipe.unet.dtype

    def uses_guidance(self, guidance_scale: float) -> bool:
        return guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    @torch.no_grad()
    def empty_prompt_embeds(self, rows: int) -> torch.Tensor:
        """The unconditional embeddings as ``encode_prompt`` makes them: ``[""] * rows`` through the
        tokenizer and text encoder in one batch of ``rows`` (kept: they never change)."""
        if rows not in self._empty_prompt:
            pipe = self.pipe
            ids = pipe.tokenizer([""] * rows, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            mask = None
            if getattr(pipe.text_encoder.config, "use_attention_mask", False):
                mask = ids.attention_mask.to(self.device)
            embeds = pipe.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0]
            self._empty_prompt[rows] = embeds.to(dtype=self._embeds_dtype(), device=self.device)
        return self._empty_prompt[rows]

    def _latent_shape(self, rows: int, height: int, width: int) -> tuple[int, int, int, int]:
        factor = self.pipe.vae_scale_factor
        return (rows, self.pipe.unet.config.in_channels, int(height) // factor, int(width) // factor)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def denoise(self, prompt_embeds: torch.Tensor, generators: list[torch.Generator], *, guidance_scale: float,
                num_inference_steps: int, eta: float, height: int, width: int,
                negative_embeds: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                negative_class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Final latents of ``prompt_embeds`` (one row per generator). Under guidance the unconditional
        half is ``negative_embeds`` (default: the empty prompt's embeddings, as the text-to-image
        pipeline makes them); ``class_labels`` is extra UNet conditioning (unCLIP's noised image
        embeddings), with ``negative_class_labels`` as its unconditional half."""
        from diffusers.utils.torch_utils import randn_tensor

        if self.pipe.unet.config.time_cond_proj_dim is not None:
            raise NotImplementedError("UNets with a guidance embedding (time_cond_proj_dim) are not mirrored here")
        scheduler = self.pipe.scheduler
        device = self.device
        rows = prompt_embeds.shape[0]
        embeds = prompt_embeds.to(dtype=self._embeds_dtype(), device=device)
        guided = self.uses_guidance(guidance_scale)
        labels = class_labels
        if guided:
            negative = self.empty_prompt_embeds(rows) if negative_embeds is None else negative_embeds
            embeds = torch.cat([negative.to(dtype=embeds.dtype, device=device), embeds])
            if labels is not None:
                if negative_class_labels is None:
                    raise ValueError("class_labels under guidance need negative_class_labels")
                labels = torch.cat([negative_class_labels, labels])
        unet_kwargs = {} if labels is None else {"class_labels": labels.to(device)}
        # CPU timesteps for the scheduler (it indexes CPU tables with them); one device copy for the UNet
        scheduler.set_timesteps(num_inference_steps, device="cpu")
        timesteps = scheduler.timesteps
        unet_timesteps = timesteps.to(device)
        shape = self._latent_shape(rows, height, width)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype)
        latents = latents * scheduler.init_noise_sigma

        kwargs: dict = {}
        if "eta" in self._step_takes:
            kwargs["eta"] = eta
        variance_noise = None
        if "eta" in self._step_takes and eta > 0:
            # DDIM draws [rows] noise from the generators in every step; drawn here in the same
            # per-generator order (latents, step 0, step 1, ...) and moved to the device once
            noise_dtype = self.pipe.unet.dtype
            variance_noise = torch.stack([randn_tensor(shape, generator=generators, device=torch.device("cpu"),
                                                       dtype=noise_dtype) for _ in range(len(timesteps))]).to(device)
        elif "generator" in self._step_takes:
            kwargs["generator"] = generators  # unused by these schedulers' defaults, passed as diffusers does

        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self._unet(model_input, unet_timesteps[i], encoder_hidden_states=embeds, **unet_kwargs,
                                    return_dict=False)[0]
            if guided:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            if variance_noise is not None:
                kwargs["variance_noise"] = variance_noise[i]
            latents = scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> FinishedBatch:
        """Decode, safety checker (when the pipeline has one), denormalize, finish on the device."""
        pipe = self.pipe
        image = self._decode(latents / pipe.vae.config.scaling_factor)
        # as the pipeline: a no-op without a checker; with one, flagged rows come back black and
        # are not denormalized (so they stay black and count as bad images)
        # (the unCLIP img2img pipeline has no checker at all)
        checker = getattr(pipe, "run_safety_checker", None)
        image, nsfw = checker(image, self.device, self._embeds_dtype()) if checker else (image, None)
        return finish_images(image, None if nsfw is None else [not flagged for flagged in nsfw])

    def images(self, prompt_embeds: torch.Tensor, generators: list[torch.Generator], **kwargs) -> FinishedBatch:
        return self.decode(self.denoise(prompt_embeds, generators, **kwargs))

    # ------------------------------------------------------------------ memory probe
    @torch.no_grad()
    def probe(self, rows: int, *, guidance_scale: float, height: int, width: int) -> None:
        """One denoising step and one VAE decode of ``rows`` rows, eager (for sizing micro-batches:
        compiled kernels need no more memory than eager ones, and probing them would compile
        every probed shape)."""
        pipe = self.pipe
        dtype = self._embeds_dtype()
        config = pipe.unet.config
        # text: [rows, 77, dim]; image variation: one CLIP image embedding [rows, 1, dim]
        tokenizer = getattr(pipe, "tokenizer", None)
        seq = tokenizer.model_max_length if tokenizer is not None else 1
        passes = 2 if self.uses_guidance(guidance_scale) else 1
        embeds = torch.zeros(passes * rows, seq, config.cross_attention_dim, dtype=dtype, device=self.device)
        kwargs = {}
        if config.class_embed_type is not None and config.projection_class_embeddings_input_dim:  # unCLIP
            kwargs["class_labels"] = torch.zeros(passes * rows, config.projection_class_embeddings_input_dim,
                                                 dtype=dtype, device=self.device)
        latents = torch.randn(self._latent_shape(embeds.shape[0], height, width), dtype=dtype, device=self.device)
        t = torch.tensor(pipe.scheduler.config.num_train_timesteps - 1, device=self.device)
        noise = pipe.unet(latents, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
        self._eager_decode(noise[:rows] / pipe.vae.config.scaling_factor)


def resolve_batch_size(sampler: DenoisingSampler, cfg) -> int:
    """``cfg.batch_size`` (a ``GeneratorConfig``'s), with ``auto`` resolved for ``sampler``'s device."""
    if cfg.batch_size != "auto":
        return int(cfg.batch_size)
    res = cfg.resolution

    def run_rows(rows: int) -> None:
        sampler.probe(rows, guidance_scale=cfg.guidance_scale, height=res, width=res)

    return auto_batch_size(sampler.device, run_rows)


def auto_batch_size(device, run_rows) -> int:
    """``generator.batch_size: auto``: ``fastpath.CPU_GENERATION_BATCH`` off CUDA; on CUDA the largest
    candidate whose peak memory (``run_rows(n)``: one step + decode of n rows, measured for 1 and 2
    rows, extrapolated) fits the free memory."""
    if not str(device).startswith("cuda"):
        return fastpath.CPU_GENERATION_BATCH
    return fastpath.largest_fitting(fastpath.GENERATION_BATCH_CANDIDATES, fastpath.cuda_peak_of(device, run_rows),
                                    fastpath.cuda_free_bytes(device))
