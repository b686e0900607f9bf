"""Image-to-image strategies (paper 3.1 "Image-to-image based methods", appendix B.2): a synthetic image is a
variation of one real training image of its class.

* ``image_variation``: Stable Diffusion image variations (``lambdalabs/sd-image-variations-diffusers``,
  SD 1.3/1.4 fine-tuned to attend to one CLIP image embedding instead of text; paper: guidance 3.0).
  The UNet's ``encoder_hidden_states`` is the source's CLIP image embedding ``[1, dim]``; the unconditional
  half is zeros, as ``StableDiffusionImageVariationPipeline`` makes it; no prompt (recorded as "").
* ``reimagine``: SD 2.1 unCLIP image variation (``stabilityai/stable-diffusion-2-1-unclip``, paper:
  guidance 10, noise level 0).  The source's CLIP image embedding, noised to ``generator.noise_level`` and
  joined with the noise level's timestep embedding, enters the UNet as ``class_labels``; the text path takes
  ``generator.prompt`` (paper: none, i.e. ""), recorded as the sample's prompt.  As
  ``StableUnCLIPImg2ImgPipeline`` does it, the embedding noise is drawn from each sample's own generator
  *before* its initial latents (so it is part of the sample's seed), and the unconditional half is zeros.

Source images are the class's real training samples, used evenly: the sample with ordinal k of a class
varies the class's real sample ``k mod n_c`` (in key order), and records that sample's key as its
``source_key`` (paper B.2: 1,300 images from 5 real samples use each source 260 times).

The CLIP image embedding of a source is computed exactly as the pipeline computes it (the pipeline's own
``feature_extractor`` and ``image_encoder``), one source image at a time -- so a sample's conditioning does
not depend on which other sources share its micro-batch (a sample regenerated alone gets the same bits) --
and kept per key within a worker: many samples share one source.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fillup_data.errors import FillupError
from fillup_data.generation.strategies import Condition, Conditioning, Strategy
from fillup_data.generation.strategies.templates import fill_class_name

# source embeddings kept per worker (768 floats each for the real models: 4096 are 12 MB)
_EMBEDDING_CACHE_SIZE = 4096


class _FromRealImages(Strategy):
    """Shared by both: the even choice of source image, and its cached CLIP image embedding."""

    uses_real_images = True
    pipeline_class: str

    def __init__(self, cfg, class_names, context=None):
        super().__init__(cfg, class_names, context)
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()

    def source_key(self, spec) -> str:
        return self.evenly(self.context.real_keys_of(spec.class_index, self.name), spec.ordinal)

    @classmethod
    def load_pipeline(cls, cfg, device: str):
        from fillup_data.models import load_pipeline_for

        return load_pipeline_for(cfg, device=device, pipeline_class=cls.pipeline_class)

    @torch.no_grad()
    def image_embedding(self, pipe, key: str) -> torch.Tensor:
        """``[1, dim]`` CLIP image embedding of the real sample ``key`` (the pipelines' ``_encode_image``
        before any repeat or noise: ``feature_extractor`` pixel values in the image encoder's dtype)."""
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        if not key:
            raise FillupError(f"generator.strategy {self.name}: a sample records no source_key (the real image it "
                              "varies); it cannot be made again")
        if self.context.load_real is None:
            raise FillupError(f"generator.strategy {self.name}: needs the real images of each class, and none were given")
        image = self.context.load_real(key)
        encoder = pipe.image_encoder
        dtype = next(encoder.parameters()).dtype
        pixels = pipe.feature_extractor(images=image, return_tensors="pt").pixel_values
        embedding = encoder(pixels.to(device=pipe.unet.device, dtype=dtype)).image_embeds
        self._embeddings[key] = embedding
        if len(self._embeddings) > _EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

    def image_embeddings(self, pipe, conditions: list[Condition]) -> torch.Tensor:
        return torch.cat([self.image_embedding(pipe, c.source_key) for c in conditions])


class ImageVariation(_FromRealImages):
    name = "image_variation"
    pipeline_class = "StableDiffusionImageVariationPipeline"

    def condition(self, spec) -> Condition:
        return Condition("", self.source_key(spec))

    def encode(self, pipe, specs, conditions) -> Conditioning:
        embeds = self.image_embeddings(pipe, conditions).unsqueeze(1)  # [B, 1, dim]: one "token"
        return Conditioning(embeds, negative=torch.zeros_like(embeds))


class Reimagine(_FromRealImages):
    name = "reimagine"
    pipeline_class = "StableUnCLIPImg2ImgPipeline"

    def condition(self, spec) -> Condition:
        return Condition(fill_class_name(self.cfg.prompt, self.class_name(spec.class_index)), self.source_key(spec))

    def encode(self, pipe, specs, conditions) -> Conditioning:
        text = super().encode(pipe, specs, conditions)  # the recorded prompt through the text encoder
        # un-noised here: the noise comes from the samples' generators (``seeded``)
        return Conditioning(text.embeds, class_labels=self.image_embeddings(pipe, conditions))

    @torch.no_grad()
    def seeded(self, pipe, conditioning: Conditioning, generators: list[torch.Generator]) -> Conditioning:
        """unCLIP's ``noise_image_embeddings`` with the samples' generators (one row each, drawn before the
        latents, as ``StableUnCLIPImg2ImgPipeline.__call__`` draws it); unconditional half: zeros."""
        noise_level = torch.tensor([self.cfg.noise_level], device=pipe.unet.device)
        labels = pipe.noise_image_embeddings(image_embeds=conditioning.class_labels, noise_level=noise_level,
                                             generator=generators)
        return Conditioning(conditioning.embeds, conditioning.negative, labels, torch.zeros_like(labels))
