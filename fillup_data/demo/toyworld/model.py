"""The toyworld text-to-image model: stock diffusers/transformers classes, sizes for 2 CPU cores.

Issue 6's measured-feasible design: a ``UNet2DConditionModel`` (~3.7M parameters, block_out_channels
(48, 96, 96), one layer per block, cross-attention dim 64) denoising a 12x16x16 space-to-depth view
of a 3x32x32 image, conditioned on a 2-layer, 64-wide ``CLIPTextModel`` trained jointly, with a
CLIP BPE tokenizer whose vocabulary makes every world word one token.

The space-to-depth step has to be a stock ``AutoencoderKL`` so the folder loads with
``StableDiffusionPipeline.from_pretrained`` and the inversion code (``vae.encode(x).latent_dist``,
``vae.config.scaling_factor``) works unchanged. A stock AutoencoderKL cannot be *exactly*
space-to-depth (its encoder and decoder end in a GroupNorm, which normalises away each image's
mean and scale), so a tiny one (one downsample, latent_channels 12) is *trained* to approximate
space-to-depth: its encoder regresses ``pixel_unshuffle(x)`` and its decoder inverts it
(``vae.py``; 26 dB round trip). The UNet is trained on exact ``pixel_unshuffle`` latents, so the two
trainings are independent.

Issue 14: ``fillup_data.models.space_to_depth.SpaceToDepthAutoencoder`` is that step *exactly*, a
parameter-free diffusers component with the same interface; ``scripts/train_toyworld.py
--autoencoder exact`` pairs the generator with it instead of the trained VAE (the default stays
``trained`` until the shipped weights are retrained).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from fillup_data.demo import world

RESOLUTION = 32
LATENT_CHANNELS = 12  # 3 colour channels x (2x2) pixels
# 1 / std of the world's pixels in [-1, 1] (measured 0.478 on 1000 images): unit-variance latents,
# the role SD's 0.18215 plays for its VAE.
SCALING_FACTOR = 2.0

UNET_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION // 2,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "block_out_channels": [48, 96, 96],
    # attention at 8x8 and 4x4 only: self-attention over 256 positions at 16x16 cost 1.5x the step
    # time on CPU; what the prompt controls (shape, colour) is decided at coarse resolution
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,  # diffusers reads this as the number of heads (legacy naming)
    "norm_num_groups": 16,  # 32 does not divide 48
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": LATENT_CHANNELS,
    "block_out_channels": [16, 32],  # two blocks = one 2x downsample (pipeline vae_scale_factor 2)
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "sample_size": RESOLUTION,
    "scaling_factor": SCALING_FACTOR,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 64,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

# DDPM epsilon-prediction with Stable Diffusion's own "scaled_linear" schedule. The first run used
# pixel-space DDPM's linear 1e-4..0.02 schedule: after 600 steps its x0 predictions above t=600 were
# pure noise (there alpha_bar < 0.03, 40% of training spent where the image is invisible) and
# samples were noise; scaled_linear keeps alpha_bar(T) = 0.0047 and spends the steps where shapes
# form. Saved as DDIM (what generation samples with). No x0 clipping: StableDiffusionPipeline
# resets ``clip_sample`` to False when it loads a scheduler, so the model must not rely on it.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

TOKENIZER_CONFIG: dict[str, Any] = {
    "model_max_length": 77,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def train_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE training on ``words`` until each is one symbol: the merges, in rank order.

    Hand-written per-word merge chains interfere (the merge of "an" fires inside "clean" and
    leaves it in pieces); merges learned by BPE itself re-segment every training word into
    exactly one token. Ties break by (count, pair) so the result is deterministic.
    """
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in itertools.pairwise(seg):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seg in enumerate(segs):
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[k] = out


def build_tokenizer():
    """CLIP BPE tokenizer built from code (``models.architectures.build_clip_tokenizer``): the 256
    byte-level symbols (with and without ``</w>``, so any text tokenizes), BPE merges trained on the world's
    words so that every one is a single token, then the CLIP specials."""
    from fillup_data.models.architectures import build_clip_tokenizer

    return build_clip_tokenizer(TOKENIZER_CONFIG, train_bpe_merges(world.world_words()))


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        **TEXT_ENCODER_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


# UNet widths ``scripts/train_toyworld.py --unet`` chooses from: "base" is UNET_CONFIG (3.7M parameters),
# "large" is 4/3 as wide (6.6M parameters, 13 MB in float16).
UNET_SIZES: dict[str, list[int]] = {"base": [48, 96, 96], "large": [64, 128, 128]}


def build_unet(latent_channels: int = LATENT_CHANNELS, size: str = "base"):
    """The UNet for an autoencoder with ``latent_channels`` (its in and out channels follow them), of
    width ``size`` (``UNET_SIZES``)."""
    from diffusers import UNet2DConditionModel

    if size not in UNET_SIZES:
        raise ValueError(f"unknown toyworld UNet size {size!r}; choose from {', '.join(UNET_SIZES)}")
    return UNet2DConditionModel.from_config({**UNET_CONFIG, "in_channels": latent_channels, "out_channels": latent_channels,
                                            "block_out_channels": UNET_SIZES[size]})


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(VAE_CONFIG)


# which autoencoder the generator is paired with: the trained AutoencoderKL approximation (vae.py) or
# the exact, parameter-free space-to-depth (fillup_data.models.space_to_depth)
AUTOENCODERS = ("trained", "exact")


def build_exact_autoencoder():
    """Exact space-to-depth at the toyworld's factor and scale: the latents the UNet is trained on."""
    from fillup_data.models.space_to_depth import SpaceToDepthAutoencoder

    return SpaceToDepthAutoencoder(in_channels=3, downsample_factor=2, scaling_factor=SCALING_FACTOR)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(SCHEDULER_CONFIG)


def build_pipeline(unet, vae, text_encoder, tokenizer):
    """The stock StableDiffusionPipeline (no safety checker: the world has nothing to hide), through the
    package's one assembler (``models.architectures.assemble_text_to_image``)."""
    from fillup_data.models.architectures import assemble_text_to_image

    return assemble_text_to_image(unet, vae, text_encoder, tokenizer, build_scheduler())


def space_to_depth(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 32, 32]`` in [-1, 1] -> ``[B, 12, 16, 16]``: the latent the VAE is trained to produce."""
    return torch.nn.functional.pixel_unshuffle(pixels, 2)


def depth_to_space(latents: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pixel_shuffle(latents, 2)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Padded to ``model_max_length`` exactly as the pipeline pads prompts."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
