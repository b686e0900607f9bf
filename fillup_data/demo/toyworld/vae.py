"""A tiny stock ``AutoencoderKL`` trained to approximate space-to-depth (3x32x32 <-> 12x16x16).

Why trained and not hand-set: both halves of a stock AutoencoderKL end in GroupNorm + SiLU, which
no choice of weights turns into the identity, so exact ``pixel_unshuffle`` is out of reach. The
shipped one (0.1M parameters, 1,000 steps) reaches 26.4 dB round-trip PSNR: shapes, colours and
backgrounds survive, per-pixel noise is smoothed (the world classifier's accuracy on round-tripped
images is in benchmarks/RESULTS.md, from ``measure --parts classifier``); the numbers are written to
``quality.json`` beside it. The
encoder's log-variance channels are fixed at -30 (std 3e-7, the posterior is a point), so
``latent_dist.sample()`` equals ``latent_dist.mean`` for Textual Inversion. The decoder also sees
slightly noisy latents in training, so the imperfect latents a sampler ends at decode cleanly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fillup_data.demo import world
from fillup_data.demo.toyworld import model as tw

LOGVAR = -30.0  # DiagonalGaussianDistribution clamps log-variance to [-30, 20]


def _fix_logvar(vae) -> None:
    conv = vae.encoder.conv_out
    with torch.no_grad():
        conv.weight[tw.LATENT_CHANNELS :].zero_()
        conv.bias[tw.LATENT_CHANNELS :].fill_(LOGVAR)
    # keep them fixed: no gradient flows into them (the loss uses the mean only), and no decay
    conv.weight.register_hook(lambda g: torch.cat([g[: tw.LATENT_CHANNELS], torch.zeros_like(g[tw.LATENT_CHANNELS :])]))
    conv.bias.register_hook(lambda g: torch.cat([g[: tw.LATENT_CHANNELS], torch.zeros_like(g[tw.LATENT_CHANNELS :])]))


def _pixels(seed: int, n: int) -> torch.Tensor:
    images, _, _ = world.sample_world(seed, n, combos=[(s, c) for s in world.SHAPES for c in world.COLOURS])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def measure_vae(vae, n: int = 512, seed: int = 20_000) -> dict:
    """PSNR (dB, on [0, 255]) of decode(encode(x)) and of decode(space_to_depth(x)); latent RMSE."""
    x = _pixels(seed, n)
    lat = vae.encode(x).latent_dist.mean
    target = tw.space_to_depth(x)
    rec = vae.decode(lat).sample.clamp(-1, 1)
    rec_exact = vae.decode(target).sample.clamp(-1, 1)

    def psnr(a, b):
        mse = F.mse_loss((a + 1) * 127.5, (b + 1) * 127.5).item()
        return 10 * math.log10(255**2 / max(mse, 1e-12))

    return {
        "psnr_roundtrip_db": round(psnr(rec, x), 2),
        "psnr_decode_exact_latent_db": round(psnr(rec_exact, x), 2),
        "latent_rmse": round(F.mse_loss(lat, target).sqrt().item(), 5),
        "n": n,
    }


def train_vae(out_dir: str | Path, *, steps: int = 1000, batch_size: int = 32, seed: int = 0, progress: bool = True):
    """Train encoder to ``pixel_unshuffle`` and decoder to its inverse; save with ``save_pretrained``."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae = tw.build_vae()
    _fix_logvar(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for step in tqdm(range(steps), desc="toyworld vae", disable=not progress):
        x = _pixels(seed * 1_000_003 + step, batch_size)
        target = tw.space_to_depth(x)
        lat = vae.encode(x).latent_dist.mean
        # decoder input: exact latents, half of them slightly perturbed (a sampler's end point is not exact)
        noise = torch.randn(target.shape, generator=g) * 0.03 / tw.SCALING_FACTOR
        noise[: batch_size // 2] = 0
        rec = vae.decode(target + noise).sample
        loss = F.mse_loss(lat, target) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(str(out_dir), safe_serialization=True)
    report = measure_vae(vae)
    (out_dir / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    return vae, report
