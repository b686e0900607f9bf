"""An exact, parameter-free autoencoder: ``pixel_unshuffle`` in, ``pixel_shuffle`` out.

Why: a stock ``AutoencoderKL`` cannot be the identity (both halves end in GroupNorm + SiLU), so the
toyworld's trained one is an approximation (26.4 dB round trip) that blurs what the UNet draws. A
pixel-space model at 32 px needs no compression at all, only the 2x2 space-to-depth that makes its
UNet cheap: this class is that, exactly, with the ``AutoencoderKL`` interface the pipelines and the
inversion trainer use (``encode(x).latent_dist`` with ``.mean``/``.std``/``.sample()``/``.mode()``,
``decode(z).sample``, ``config.scaling_factor``, ``config.block_out_channels``,
``config.latent_channels``), so neither needs a branch for it.

Loading without ``trust_remote_code``: ``save_pretrained`` of a pipeline records this component in
``model_index.json`` as ``["fillup_data.models.space_to_depth", "SpaceToDepthAutoencoder"]``. diffusers
(0.42) resolves a library outside diffusers/transformers from ``sys.modules`` only (it does not import
a module a repository names, because importing runs code), so the caller imports this module first:
``fillup_data.models.load_pipeline`` does; a plain ``StableDiffusionPipeline.from_pretrained`` needs
``import fillup_data.models.space_to_depth`` before it. diffusers then finds the loading method by
looking ``ModelMixin`` up *on this module* (``getattr(module, "ModelMixin")``), hence that import
below. The module path is written into every pipeline folder that uses the class: it must not move.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin  # ModelMixin is looked up on this module by diffusers' loader
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

__all__ = ["ConfigMixin", "ModelMixin", "SpaceToDepthAutoencoder", "measure_latent_std"]


class SpaceToDepthAutoencoder(ModelMixin, ConfigMixin):
    """``encode``: ``[B, C, H, W]`` -> ``[B, C*f*f, H/f, W/f]`` by ``pixel_unshuffle(x, f)``, a point
    posterior (``DiagonalGaussianDistribution(deterministic=True)``: std 0, so ``sample()`` equals
    ``mean`` and Textual Inversion's latents are the exact ones); ``decode``: ``pixel_shuffle``.

    ``latent_channels`` and ``block_out_channels`` follow from ``in_channels`` and
    ``downsample_factor`` (given only so a saved config reads like an AutoencoderKL's; a
    contradicting value is refused). ``block_out_channels`` lists the channels at each 2x level
    (``[3, 12]`` for f = 2), so ``pipe.vae_scale_factor = 2 ** (len - 1)`` is ``f``.

    ``scaling_factor`` 2.0 for the toyworld: latents are pixels in [-1, 1] rearranged, so their std
    is the pixels' std, 0.478-0.484 over three draws of 1,000 ``world.sample_world`` images
    (``measure_latent_std``; 1 / std = 2.07-2.09). 2.0 (latent std 0.96) is also the factor the
    toyworld UNet has always been trained with on exact space-to-depth latents, so the shipped UNet's
    inputs are unchanged by swapping its trained VAE for this class.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        downsample_factor: int = 2,
        scaling_factor: float = 2.0,
        latent_channels: int | None = None,
        block_out_channels: tuple[int, ...] | list[int] | None = None,
    ):
        super().__init__()
        f = int(downsample_factor)
        if f < 1 or f & (f - 1):
            raise ValueError(f"downsample_factor must be a power of 2, got {downsample_factor!r}")
        levels = int(math.log2(f))
        derived_latent = in_channels * f * f
        derived_blocks = [in_channels * 4**i for i in range(levels + 1)]
        if latent_channels is not None and int(latent_channels) != derived_latent:
            raise ValueError(
                f"latent_channels {latent_channels} contradicts in_channels {in_channels} x downsample_factor "
                f"{f} squared = {derived_latent}"
            )
        if block_out_channels is not None and len(block_out_channels) != levels + 1:
            raise ValueError(
                f"block_out_channels {list(block_out_channels)} must have {levels + 1} entries for "
                f"downsample_factor {f} (pipelines read the scale factor as 2 ** (len - 1))"
            )
        self.register_to_config(latent_channels=derived_latent, block_out_channels=derived_blocks)
        # No weights. This empty buffer carries the module's dtype and device (ModelMixin reads them
        # from the first parameter or buffer; the inversion trainer casts pixels to vae.dtype), and it
        # is saved: with an empty state dict save_pretrained writes no weights file, and
        # from_pretrained then looks for one, falling back to a pickled .bin.
        self.register_buffer("dtype_anchor", torch.zeros(0))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean = F.pixel_unshuffle(x, self.config.downsample_factor)
        # (mean, log-variance) as AutoencoderKL's encoder emits them; deterministic: std and var are 0
        posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """``generator`` is accepted (the pipelines pass it) and unused: decoding draws nothing."""
        sample = F.pixel_shuffle(z, self.config.downsample_factor)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """As ``AutoencoderKL.forward``: decode(encode(x)), which here is ``sample`` itself."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


def measure_latent_std(autoencoder: SpaceToDepthAutoencoder, pixels: torch.Tensor) -> float:
    """Std of the scaled latents of ``pixels`` (``[B, C, H, W]`` in [-1, 1]): ~1 is what a scaling factor aims at."""
    with torch.no_grad():
        latents = autoencoder.encode(pixels).latent_dist.mean * autoencoder.config.scaling_factor
    return float(latents.float().std())
