"""Pretraining the toyworld generator (UNet + text encoder jointly) and its space-to-depth VAE.

Issue 6's recipe: DDPM epsilon-prediction, AdamW 1e-3, EMA; since issue 14 5,000 steps of batch 128 (4,000 x 64
before), 15% of the images with the harder backgrounds; captions with ~10% empty for classifier-free guidance;
held-out (shape, colour) pairs never drawn. Data is drawn
fresh every step (``world.sample_world``), so there is no dataset to store and no epoch.

Every draw of step ``s`` comes from seeds derived from ``(seed, s)``, and a resume checkpoint
is written every ``checkpoint_every`` steps, so a crash loses at most that many steps and a
resumed run continues the same data stream.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fillup_data.demo import world
from fillup_data.errors import FillupError
from fillup_data.demo.toyworld import model as tw


@dataclass
class GeneratorTrainConfig:
    steps: int = 5000
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2  # UNet only; the text encoder's rows of unused tokens are not pulled to 0
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # cosine decay after warm-up down to this fraction
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    # the autoencoder the generator is trained and exported with (tw.AUTOENCODERS): "trained" (the
    # AutoencoderKL approximation of vae.py) or "exact" (parameter-free space-to-depth). Part of the
    # resume check: a resumed run cannot switch.
    autoencoder: str = "exact"
    # the UNet's width (tw.UNET_SIZES) and the share of pretraining images with the harder backgrounds
    # (world.draw(hard=True)); both part of the resume check
    unet: str = "large"
    hard_fraction: float = 0.15


class ThreadTuner:
    """Picks 1 or 2 intra-op threads by measured step time, re-checked periodically.

    On 2 shared cores, 2 threads run a step 2.5x faster than 1 when the machine is idle but 5-10x
    slower while another process computes (OpenMP threads wait on each other); the load changes
    during a 30-minute run, so the choice is re-measured instead of fixed.
    """

    def __init__(self, options=(2, 1), trial_steps: int = 3, period: int = 200):
        self.options = [o for o in options if o <= (os.cpu_count() or 1)] or [1]
        self.trial_steps, self.period = trial_steps, period
        self.current = self.options[0]
        self.times: dict[int, list[float]] = {}
        self._trial: int | None = None
        torch.set_num_threads(self.current)

    def before_step(self, step: int) -> None:
        phase = step % self.period
        n = len(self.options)
        if len(self.options) > 1 and phase < self.trial_steps * n:
            self._trial = self.options[phase // self.trial_steps]
            if phase == 0:
                self.times = {}
        else:
            if self._trial is not None and self.times:  # trials just finished: keep the fastest
                self.current = min(self.times, key=lambda k: float(np.median(self.times[k])))
            self._trial = None
        torch.set_num_threads(self._trial if self._trial is not None else self.current)
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        if self._trial is not None:
            self.times.setdefault(self._trial, []).append(time.perf_counter() - self._t0)


@contextmanager
def restored_num_threads():
    """Give the caller back its torch thread count (a library call must not change it for good)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lr_at(cfg: GeneratorTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.final_lr_fraction
    return cfg.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_for_step(seed: int, step: int, batch_size: int, tokenizer, combos=None, autoencoder=None, hard_fraction: float = 0.0):
    """Pixels-as-latents ``[B, 12, 16, 16]`` (scaled), token ids, and (shape, colour) labels of one step.

    Latents: ``autoencoder``'s (scaled by its ``scaling_factor``) when given, the exact one's; without
    it, exact space-to-depth at ``tw.SCALING_FACTOR``, the target the trained VAE approximates (so
    with the toyworld's exact autoencoder both give the same numbers).
    """
    images, captions, labels = world.sample_world(seed * 1_000_003 + step, batch_size, size=tw.RESOLUTION, combos=combos,
                                                  hard_fraction=hard_fraction)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if autoencoder is None:
        latents = tw.space_to_depth(pixels) * tw.SCALING_FACTOR
    else:
        with torch.no_grad():
            latents = autoencoder.encode(pixels).latent_dist.mean * autoencoder.config.scaling_factor
    return latents, tw.tokenize(tokenizer, captions), torch.from_numpy(labels)


def latent_channels_for(autoencoder: str) -> int:
    """The UNet's in/out channels for the autoencoder named in a ``GeneratorTrainConfig``."""
    if autoencoder == "exact":
        return int(tw.build_exact_autoencoder().config.latent_channels)
    return int(tw.VAE_CONFIG["latent_channels"])


def check_autoencoder(cfg: GeneratorTrainConfig) -> None:
    if cfg.autoencoder not in tw.AUTOENCODERS:
        raise FillupError(f"autoencoder {cfg.autoencoder!r} is not one of {', '.join(tw.AUTOENCODERS)}")


def recorded_config(state: dict) -> dict:
    """A resume state's training config, with the defaults of fields added since it was written (a
    state from before ``autoencoder`` existed was trained for the trained VAE)."""
    return {"autoencoder": "trained", "unet": "base", "hard_fraction": 0.0, **state["config"]}


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is step ``s``'s batch (``batch_for_step``): a pure function of the step, so DataLoader
    workers can draw ahead (the world's drawing, ~2 ms an image, is what limits a GPU run) and the
    stream is the same for any number of workers."""

    def __init__(self, cfg: GeneratorTrainConfig, tokenizer, autoencoder=None):
        self.cfg, self.tokenizer, self.autoencoder = cfg, tokenizer, autoencoder

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int):
        return batch_for_step(self.cfg.seed, step, self.cfg.batch_size, self.tokenizer, autoencoder=self.autoencoder,
                              hard_fraction=self.cfg.hard_fraction)


def _ema_update(ema: dict[str, torch.Tensor], module_params: dict[str, torch.Tensor], decay: float) -> None:
    keys = list(module_params)
    with torch.no_grad():
        targets = [ema[k] for k in keys]
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, [module_params[k].detach() for k in keys], alpha=1 - decay)


def _save_state(path: Path, unet, text_encoder, ema: dict, optimizer, step: int, cfg, log: list) -> None:
    """Resume checkpoint: weights and EMA as safetensors, optimizer state via torch.save (local file,
    never published; loaded with weights_only=True)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / ".tmp"
    tmp.mkdir(exist_ok=True)
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()})
    tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in ema.items()})
    save_file(tensors, str(tmp / "weights.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(cfg), "log": log}, indent=1))
    for name in ("weights.safetensors", "optimizer.pt", "state.json"):
        os.replace(tmp / name, path / name)


def _named_trainables(unet, text_encoder) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": p for k, p in unet.named_parameters()}
    out.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()})
    return out


def train_generator(
    work_dir: str | os.PathLike, cfg: GeneratorTrainConfig, log_every: int = 20, progress: bool = True, threads: int | None = None,
    device: str = "cpu", data_workers: int = 0,
):
    """Train (or resume) UNet + text encoder into ``work_dir``; returns (unet, text_encoder, tokenizer)
    carrying the EMA weights (on ``device``).

    ``device`` runs the model (``cuda`` on a GPU machine); the data (the world's images, the noise and
    timesteps) is drawn on the CPU from the same seeds for any device and any ``data_workers``, so a GPU
    run trains on the same stream as a CPU one (its float sums differ). The weights are saved on the CPU.
    """
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    check_autoencoder(cfg)
    work = Path(work_dir)
    ckpt = work / "generator"
    tokenizer = tw.build_tokenizer()
    exact = tw.build_exact_autoencoder() if cfg.autoencoder == "exact" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = tw.build_unet(latent_channels_for(cfg.autoencoder), cfg.unet)
        text_encoder = tw.build_text_encoder(tokenizer)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = _named_trainables(unet, text_encoder)
    groups = [
        {"params": [p for k, p in params.items() if k.startswith("unet.")], "weight_decay": cfg.weight_decay},
        {"params": [p for k, p in params.items() if k.startswith("text_encoder.")], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999))
    ema = {k: p.detach().clone() for k, p in params.items()}
    step, log = 0, []
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        # ``steps`` may change on resume (lengthen or cut a run: only the cosine tail moves); nothing else may
        mine = {k: v for k, v in asdict(cfg).items() if k != "steps"}
        theirs = {k: v for k, v in recorded_config(state).items() if k != "steps"}
        if mine != theirs:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} in the state, {mine.get(k)!r} now"
                             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
            raise FillupError(f"{ckpt}: resume state was made with another config ({diff}); "
                              "relaunch with the state's settings or use another --work dir")
        tensors = load_file(str(ckpt / "weights.safetensors"))
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})
        ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        step, log = state["step"], state["log"]

    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(tw.SCHEDULER_CONFIG)
    on_cpu = torch.device(device).type == "cpu"
    batches = torch.utils.data.DataLoader(
        StepBatches(cfg, tokenizer, exact), batch_size=None, sampler=range(step, cfg.steps), num_workers=data_workers,
        prefetch_factor=8 if data_workers else None,
    )
    with restored_num_threads():  # the tuner changes the process-wide thread count
        # on a GPU the main thread only launches kernels: no tuning, few threads beside the data workers
        tuner = ThreadTuner(options=(threads,) if threads else ((2, 1) if on_cpu else (1,)))
        bar = tqdm(total=cfg.steps, initial=step, desc="toyworld generator", unit="step", disable=not progress)
        running, t_start = [], time.time()
        for latents, ids, _ in batches:
            tuner.before_step(step)
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g)
            noisy = sched.add_noise(latents, noise, t)
            noisy, noise, t, ids = (x.to(device, non_blocking=True) for x in (noisy, noise, t, ids))
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, noise)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            optimizer.step()
            step += 1
            # EMA warm-up (as diffusers' EMAModel): early weights are not averaged in with full weight
            _ema_update(ema, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
            tuner.after_step()
            running.append(loss.detach())
            bar.update(1)
            if step % log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                # one device sync per log entry, not per step
                losses = torch.stack(running).float().cpu().numpy()
                if not np.isfinite(losses).all():
                    raise FillupError(f"toyworld training diverged by step {step} (loss {losses[-1]}); lower the learning rate")
            if step % log_every == 0:
                entry = {"step": step, "loss": float(np.mean(losses)), "lr": _lr_at(cfg, step - 1),
                         "threads": tuner.current, "elapsed_s": round(time.time() - t_start, 1)}
                log.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", threads=tuner.current)
                running = []
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(ckpt, unet, text_encoder, ema, optimizer, step, cfg, log)
        bar.close()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ema[k])
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, tokenizer
