"""Textual Inversion on a frozen Stable Diffusion pipeline (paper 3.1, appendix B.3).

One multi-vector token per class is learned from that class's real images by minimizing the
noise-prediction error (paper eq. 2) with the text encoder, UNet and VAE frozen. The loop trains
a list of classes jointly by continuous batching: K slots (K = ``inversion.classes_per_pass``,
resolved from free memory when ``auto``); every optimizer step is one UNet pass over exactly K
classes' rows (K x ``batch_size``). Jobs wait in order; a class that finishes leaves its slot to
the next waiting class at the next step. With ``inversion.pad_passes`` (auto: when the UNet is
compiled) slots left empty at the end are filled with padding rows (copies of an active class's draws
with a detached token) whose loss is not counted and which give no gradient to any token; without it
the pass shrinks as classes finish (eager CPU runs such as the demo spend nothing on padding). Each class has its own token, AdamW state and step counter, and
the loss is a sum of per-class means, so every token's gradient is the one single-class training
gives. ``invert_class`` is the list-of-one case.

Reproducibility: every random draw of class ``c`` at step ``s`` (images, flips, templates,
timesteps, noise, latent samples) comes from a generator seeded by ``(seed, c, s)``. A run
resumed from a checkpoint therefore needs no saved RNG state. With padded passes every pass has the same
shape and rows do not interact (eval mode, per-sample norms and attention), on a fixed device,
dtype, K and compile setting a class's token bytes do not depend on which classes share its
passes, on when it entered a slot, or on a resume (tested); a compiled UNet also sees one shape
and never recompiles (without padding, a pass's width follows its neighbours' progress, so tokens
match single-class training to float rounding only). A different K changes the pass shape and so the last bits (a float
reduction of other sizes), like another device does. K, compile, device and dtype are recorded in
each token file; they are not part of the resume check, so a run resumed with another K still
resumes (its later steps then carry the other K's rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fillup_data import fastpath
from fillup_data.errors import FillupError
from fillup_data.state import write_bytes_durably
from fillup_data.inversion.token_file import (
    TokenFile,
    is_complete,
    load_safetensors,
    losses_to_curve,
    serialize_safetensors,
    token_name,
    write_token_file,
)
from fillup_data.models.text import MARKER, encode_placeholder_prompt, encode_text

from fillup_data.inversion.templates import TEMPLATES  # one list: training and the demo world's captions

assert all(MARKER in t for t in TEMPLATES)

StepCallback = Callable[[int, int, float], None]  # (class_index, step, loss)
# How the work is scheduled, not what is learned: a resume state made with other values is used
# (recorded in the token file's ``extra`` instead).
_NOT_RESUME_SETTINGS = ("classes_per_pass", "classes_per_task", "compile", "pad_passes")


@dataclass
class InversionJob:
    """One class to invert: its images (or how to load them) and where its token file goes.

    ``images`` may be a callable that loads them: a task of 64 ImageNet classes holds tens of thousands of
    decoded photos otherwise; loaded when the class enters a slot, they are dropped once encoded to latents.
    ``num_images`` (the plan's count) sizes the progress bar before they are loaded."""

    class_index: int
    class_name: str
    images: list[Image.Image] | Callable[[], list[Image.Image]]
    out_path: Path
    num_images: int | None = None

    def load_images(self) -> list[Image.Image]:
        return list(self.images()) if callable(self.images) else self.images

    @property
    def expected_images(self) -> int:
        return self.num_images if self.num_images is not None else len(self.load_images())


def partial_path(out_path: Path) -> Path:
    """Resume state beside the token file: ``00017.partial.safetensors``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name.removesuffix(".safetensors") + ".partial.safetensors")


def _derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(_derive_seed(*parts))


def preprocess_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB, short side resized to ``resolution`` (bicubic), center crop, scaled to [-1, 1] ``[3, R, R]``."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast on GPU only; CPU training runs in the pipeline's dtype (fp32 by default)."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    if mixed_precision == "bf16" or (mixed_precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@dataclass
class _ClassState:
    job: InversionJob
    total_steps: int
    checkpoint_steps: list[int]
    latent_mean: torch.Tensor  # [n_views, 4, h, w] float32 (CPU); views = images (+ flipped)
    latent_std: torch.Tensor
    token: torch.nn.Parameter
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None
    step: int = 0
    losses: list[float] = field(default_factory=list)
    checkpoints: dict[int, torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    n_images: int = 0
    _perm_cache: tuple[int, torch.Tensor] | None = None


class TextualInversionTrainer:
    """Trains tokens for a list of classes on one frozen pipeline."""

    def __init__(
        self,
        pipe,
        cfg,
        *,
        resolution: int,
        seed: int,
        model_id: str,
        model_revision: str,
        progress: bool = True,
        step_callback: StepCallback | None = None,
        classes_per_pass: int | None = None,
    ):
        """``classes_per_pass`` overrides ``cfg.classes_per_pass`` (the build passes its pinned value);
        ``auto`` is resolved here, on first use (see ``resolve_classes_per_pass``)."""
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.cfg = cfg
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.model_id = model_id
        self.model_revision = model_revision or ""
        self.progress = progress
        self.step_callback = step_callback
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.amp_dtype = _autocast_dtype(cfg.mixed_precision, self.device)
        # paper eq. 2: training noise schedule of the model itself
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.lr = cfg.learning_rate * (cfg.batch_size if cfg.scale_lr else 1)
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if self.resolution % vae_scale:
            raise FillupError(f"inversion.resolution {self.resolution} must be a multiple of {vae_scale} for this model")
        # Frozen: text encoder (its embedding matrix included), UNet, VAE. Only the per-class
        # token tensors below require grad; eval() turns off dropout.
        for module in (pipe.text_encoder, pipe.unet, pipe.vae):
            module.requires_grad_(False)
            module.eval()
        self._init_vectors = self._init_from_word(cfg.init_word)
        setting = classes_per_pass if classes_per_pass is not None else cfg.classes_per_pass
        self._classes_per_pass = None if setting == "auto" else int(setting)
        if self._classes_per_pass is not None and self._classes_per_pass < 1:
            raise FillupError(f"inversion.classes_per_pass must be auto or a positive integer, got {setting!r}")
        self.compiled = fastpath.compile_enabled(cfg.compile, self.device)
        self.unet = pipe.unet
        if self.compiled:
            fastpath.configure_compile_cache()
            # one shape per trainer (the fixed pass): dynamic=False, never a recompile
            self.unet = torch.compile(pipe.unet, dynamic=False)
        # fixed pass shape: on when compiled (auto), or as set
        self.pad_passes = self.compiled if cfg.pad_passes == "auto" else bool(cfg.pad_passes)

    @property
    def classes_per_pass(self) -> int:
        """K, the pass width; ``auto`` resolved once per trainer."""
        if self._classes_per_pass is None:
            self._classes_per_pass = classes_per_pass_for(self.device, self.probe_pass)
        return self._classes_per_pass

    # ------------------------------------------------------------------ set-up
    def _init_from_word(self, word: str) -> torch.Tensor:
        """Every vector starts at the init word's embedding (mean of its pieces if it is several tokens)."""
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise FillupError(f"inversion.init_word {word!r} tokenizes to nothing; use a word such as 'object'")
        table = self.pipe.text_encoder.get_input_embeddings().weight.detach()
        init = table[torch.tensor(ids, device=table.device)].to(torch.float32).mean(dim=0)
        return init[None].repeat(self.cfg.num_vectors, 1).cpu()

    def _settings(self, job: InversionJob, images: list[Image.Image], total_steps: int) -> dict:
        """Everything that determines the token bytes; a resume state made with other settings is discarded."""
        c = self.cfg
        return {
            "class_index": job.class_index,
            "n_images": len(images),
            "images_sha256": _images_digest(images),
            "steps": total_steps,
            "seed": self.seed,
            "resolution": self.resolution,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "inversion": {k: v for k, v in (c.model_dump(mode="json") if hasattr(c, "model_dump") else dict(vars(c))).items()
                          if k not in _NOT_RESUME_SETTINGS},
        }

    @torch.no_grad()
    def _encode_latents(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std of every image (and of its mirror image when flip is on),
        computed once; a latent is then sampled per step as mean + std * eps with the step's
        generator, like re-encoding each step (original TI) at a fraction of the cost."""
        pixels = torch.stack([preprocess_image(im, self.resolution) for im in images])
        if self.cfg.flip:
            pixels = torch.cat([pixels, torch.flip(pixels, dims=[3])])
        means, stds = [], []
        for i in range(0, len(pixels), 8):
            batch = pixels[i : i + 8].to(self.device, self.pipe.vae.dtype)
            dist = self.pipe.vae.encode(batch).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    def _new_state(self, job: InversionJob) -> _ClassState | None:
        images = job.load_images()  # held only until encoded
        if not images:
            raise FillupError(f"class {job.class_index} ({job.class_name!r}): no images to learn a token from (none readable)")
        total = self.cfg.steps_for(len(images))
        ckpts = self.cfg.checkpoint_steps(len(images))
        mean, std = self._encode_latents(images)
        token = torch.nn.Parameter(self._init_vectors.clone().to(self.device))
        # weight decay applies to the token rows only (the default 0 keeps them from being pulled to 0)
        opt = torch.optim.AdamW([token], lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=self.cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        state = _ClassState(job, total, ckpts, mean, std, token, opt, scaler,
                            settings=self._settings(job, images, total), n_images=len(images))
        self._maybe_resume(state)
        return state

    # ------------------------------------------------------------------ resume state
    def _write_partial(self, st: _ClassState) -> None:
        opt_state = st.optimizer.state[st.token]
        tensors = {
            "token": st.token.detach().float().cpu(),
            "exp_avg": opt_state["exp_avg"].float().cpu(),
            "exp_avg_sq": opt_state["exp_avg_sq"].float().cpu(),
            "losses": torch.tensor(st.losses, dtype=torch.float64),
        }
        for s, v in st.checkpoints.items():
            tensors[f"step_{s:05d}"] = v
        meta = {
            "settings": json.dumps(st.settings, sort_keys=True),
            "step": json.dumps(st.step),
            "adam_step": json.dumps(float(opt_state["step"])),
            "scaler": json.dumps(st.scaler.state_dict() if st.scaler is not None else None, sort_keys=True),
        }
        write_bytes_durably(partial_path(st.job.out_path), serialize_safetensors(tensors, meta))

    def _maybe_resume(self, st: _ClassState) -> None:
        path = partial_path(st.job.out_path)
        if not path.is_file():
            return
        try:
            tensors, meta = load_safetensors(path)
            settings = json.loads(meta["settings"])
            step = int(json.loads(meta["step"]))
            adam_step = float(json.loads(meta["adam_step"]))
            scaler_state = json.loads(meta["scaler"])
        except (FillupError, KeyError, ValueError) as err:
            warnings.warn(f"{path}: unreadable resume state ({err}); class {st.job.class_index} starts over")
            return
        if settings != st.settings:
            warnings.warn(f"{path}: made with other settings or images; class {st.job.class_index} starts over")
            return
        with torch.no_grad():
            st.token.copy_(tensors["token"].to(st.token.device))
        st.optimizer.state[st.token] = {
            "step": torch.tensor(adam_step, dtype=torch.float32),
            "exp_avg": tensors["exp_avg"].to(st.token.device),
            "exp_avg_sq": tensors["exp_avg_sq"].to(st.token.device),
        }
        if st.scaler is not None and scaler_state is not None:
            st.scaler.load_state_dict(scaler_state)
        st.step = step
        st.losses = [float(x) for x in tensors["losses"].tolist()]
        st.checkpoints = {int(k[5:]): v for k, v in tensors.items() if k.startswith("step_")}

    # ------------------------------------------------------------------ training
    def _image_index(self, st: _ClassState, position: int) -> int:
        """Sample ``position`` of the class's stream: epochs of seeded permutations (every image
        used once per epoch, as a shuffled data loader would)."""
        n = st.n_images
        epoch, offset = divmod(position, n)
        if st._perm_cache is None or st._perm_cache[0] != epoch:
            perm = torch.randperm(n, generator=_generator(self.seed, st.job.class_index, "epoch", epoch))
            st._perm_cache = (epoch, perm)
        return int(st._perm_cache[1][offset])

    def _draw(self, st: _ClassState, step: int):
        """All randomness of one class step, from its own generator."""
        bsz = self.cfg.batch_size
        g = _generator(self.seed, st.job.class_index, "step", step)
        idx = [self._image_index(st, (step - 1) * bsz + b) for b in range(bsz)]
        flips = torch.rand(bsz, generator=g) < 0.5
        views = torch.tensor([i + (st.n_images if (self.cfg.flip and f) else 0) for i, f in zip(idx, flips.tolist())])
        templates = torch.randint(len(TEMPLATES), (bsz,), generator=g).tolist()
        timesteps = torch.randint(self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=g)
        shape = (bsz, *st.latent_mean.shape[1:])
        eps_latent = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        scaling = self.pipe.vae.config.scaling_factor
        latents = (st.latent_mean[views] + st.latent_std[views] * eps_latent) * scaling
        return latents, noise, timesteps, [TEMPLATES[t] for t in templates]

    def _pass_losses(self, latents, noise, timesteps, prompts, vectors, owners, n_owners: int, unet) -> list:
        """One UNet pass over all rows; the mean loss of each owner's rows (owner -1: padding, not counted)."""
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
        owners_t = torch.tensor(owners, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            cond = encode_text(self.pipe.text_encoder, prompts, vectors, self.device)
            pred = unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=cond.to(self.dtype)).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return [per_sample[owners_t == k].mean() for k in range(n_owners)]

    def _train_step(self, slots: list[_ClassState | None]) -> list[float | None]:
        """One optimizer step for each class in ``slots``, sharing one UNet pass of exactly
        ``len(slots)`` classes' rows: an empty slot (None) gets padding rows, a copy of the first
        active class's draws with a detached token, so the pass shape never changes."""
        latents, noise, timesteps, prompts, vectors, owners = [], [], [], [], [], []
        tokenizer = self.pipe.tokenizer
        draws = {}
        for k, st in enumerate(slots):
            if st is not None:
                draws[k] = self._draw(st, st.step + 1)
        first = min(draws)
        for k, st in enumerate(slots):
            if st is None and not self.pad_passes:
                continue  # eager without padding: the pass shrinks as classes finish
            lat, nz, ts, texts = draws[k] if st is not None else draws[first]
            latents.append(lat)
            noise.append(nz)
            timesteps.append(ts)
            # padding: no gradient reaches any token, and its loss is not counted
            vec = st.token if st is not None else slots[first].token.detach()
            for text in texts:
                prompts.append(encode_placeholder_prompt(tokenizer, text, self.cfg.num_vectors))
                vectors.append(vec)
            owners.extend([k if st is not None else -1] * len(texts))
        class_losses = self._pass_losses(torch.cat(latents), torch.cat(noise), torch.cat(timesteps), prompts,
                                         vectors, owners, len(slots), self.unet)
        active = [(st, class_losses[k]) for k, st in enumerate(slots) if st is not None]
        total = sum((st.scaler.scale(loss) if st.scaler is not None else loss) for st, loss in active)
        for st, _ in active:
            st.optimizer.zero_grad(set_to_none=True)
        total.backward()
        for st, _ in active:
            if st.scaler is not None:
                st.scaler.step(st.optimizer)
                st.scaler.update()
            else:
                st.optimizer.step()
        # one host sync per pass (an empty slot's loss is NaN without padding rows and never read)
        values = torch.stack([loss.detach() for loss in class_losses]).tolist()
        return [values[k] if st is not None else None for k, st in enumerate(slots)]

    def probe_pass(self, n_classes: int) -> None:
        """One training pass (forward and backward) of ``n_classes`` classes on dummy data, on the
        eager UNet, to measure its peak memory; no token or optimizer is touched."""
        bsz = self.cfg.batch_size
        scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        side = self.resolution // scale
        rows = n_classes * bsz
        shape = (rows, self.unet_in_channels, side, side)
        tokens = [self._init_vectors.clone().to(self.device).requires_grad_(True) for _ in range(n_classes)]
        prompt = encode_placeholder_prompt(self.pipe.tokenizer, TEMPLATES[0], self.cfg.num_vectors)
        losses = self._pass_losses(torch.zeros(shape), torch.zeros(shape), torch.zeros(rows, dtype=torch.long),
                                   [prompt] * rows, [tokens[r // bsz] for r in range(rows)],
                                   [r // bsz for r in range(rows)], n_classes, self.pipe.unet)
        sum(losses).backward()

    @property
    def unet_in_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    def _finish_step(self, st: _ClassState, loss: float) -> None:
        st.step += 1
        st.losses.append(loss)
        if st.step in st.checkpoint_steps:
            st.checkpoints[st.step] = st.token.detach().float().cpu().clone()
            if st.step < st.total_steps:
                self._write_partial(st)
        if self.step_callback is not None:
            self.step_callback(st.job.class_index, st.step, loss)

    def _finalize(self, st: _ClassState) -> Path:
        c = self.cfg
        token = TokenFile(
            class_index=st.job.class_index,
            class_name=st.job.class_name,
            checkpoints=dict(st.checkpoints),
            n_images=st.n_images,
            steps=st.total_steps,
            learning_rate=self.lr,
            weight_decay=c.weight_decay,
            batch_size=c.batch_size,
            model_id=self.model_id,
            model_revision=self.model_revision,
            init_word=c.init_word,
            num_vectors=c.num_vectors,
            seed=self.seed,
            resolution=self.resolution,
            loss_curve=losses_to_curve(st.losses, st.checkpoint_steps),
            extra={
                "base_learning_rate": c.learning_rate,
                "scale_lr": c.scale_lr,
                "flip": c.flip,
                "templates": "textual_inversion_imagenet_small",
                "latents": "posterior_sample_per_step",
                "mixed_precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "no",
                # how it was computed (decides the last bits; not part of the resume check)
                "classes_per_pass": self.classes_per_pass,
                "compile": self.compiled,
                "pad_passes": self.pad_passes,
                "device": fastpath.device_description(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "first_loss": st.losses[0] if st.losses else None,
                "final_loss": st.losses[-1] if st.losses else None,
            },
        )
        path = write_token_file(st.job.out_path, token)
        partial_path(st.job.out_path).unlink(missing_ok=True)
        return path

    def train(self, jobs: list[InversionJob]) -> list[Path]:
        """Train every job not already complete; returns the token file paths in job order.

        Continuous batching: ``classes_per_pass`` slots; a waiting class enters a free slot (its
        latents encoded and its resume state read then) before the next pass. One progress bar for the
        whole call, in class-steps (thousands of classes make thousands of bars otherwise)."""
        from fillup_data.progress import progress_bar

        waiting = [job for job in jobs if not is_complete(job.out_path)]
        waiting.reverse()  # pop() takes them in order
        n_slots = self.classes_per_pass if waiting else 1
        slots: list[_ClassState | None] = [None] * n_slots
        total = sum(self.cfg.steps_for(job.expected_images) for job in waiting)
        finished, count = 0, len(waiting)
        with progress_bar(total, "invert", "class-step", enabled=self.progress, leave=False) as bar:
            while True:
                for k in range(n_slots):
                    while slots[k] is None and waiting:
                        st = self._new_state(waiting.pop())
                        bar.update(st.step)  # resumed from a checkpoint
                        if st.step >= st.total_steps:  # finished before, only its token file was missing
                            self._finalize(st)
                            finished += 1
                            continue
                        slots[k] = st
                if all(st is None for st in slots):
                    break
                losses = self._train_step(slots)
                stepped = [loss for loss in losses if loss is not None]
                for k, (st, loss) in enumerate(zip(list(slots), losses)):
                    if st is None:
                        continue
                    if not math.isfinite(loss):
                        raise FillupError(
                            f"class {st.job.class_index} ({st.job.class_name!r}): Textual Inversion loss became "
                            f"{loss} at step {st.step + 1}; lower inversion.learning_rate or set "
                            "inversion.mixed_precision: no"
                        )
                    self._finish_step(st, loss)
                    if st.step >= st.total_steps:
                        self._finalize(st)
                        finished += 1
                        slots[k] = None
                bar.update(len(stepped))
                bar.set_postfix_str(f"classes {finished}/{count} done, mean loss {sum(stepped) / len(stepped):.4f}")
        return [Path(job.out_path) for job in jobs]


def classes_per_pass_for(device, probe: Callable[[int], None]) -> int:
    """``auto`` classes per pass: ``fastpath.CPU_CLASSES_PER_PASS`` off CUDA; on CUDA the largest
    candidate whose measured peak (``probe(n)``: one training pass of n classes) fits free memory."""
    if torch.device(device).type != "cuda":
        return fastpath.CPU_CLASSES_PER_PASS
    return fastpath.largest_fitting(
        fastpath.CLASSES_PER_PASS_CANDIDATES,
        fastpath.cuda_peak_of(device, probe),
        fastpath.cuda_free_bytes(device),
    )


def resolve_classes_per_pass(pipe, cfg, *, resolution: int) -> int:
    """``cfg.classes_per_pass`` as an int for this pipeline's device (``auto`` measured)."""
    if cfg.classes_per_pass != "auto":
        return int(cfg.classes_per_pass)
    trainer = TextualInversionTrainer(pipe, cfg.model_copy(update={"compile": False}), resolution=resolution, seed=0,
                                      model_id="", model_revision="", progress=False)
    return trainer.classes_per_pass


@torch.no_grad()
def evaluate_token_loss(
    pipe,
    images: list[Image.Image],
    vectors: torch.Tensor,
    *,
    resolution: int,
    seed: int = 0,
    n_draws: int = 32,
    prompt: str = "a photo of a {token}",
) -> float:
    """Noise-prediction loss of ``vectors`` on ``images`` at fixed draws (same images, timesteps
    and noise for every token compared), so two tokens can be compared without training noise."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    device = pipe.unet.device
    pixels = torch.stack([preprocess_image(im, resolution) for im in images]).to(device, pipe.vae.dtype)
    means = pipe.vae.encode(pixels).latent_dist.mean.float().cpu()
    g = _generator(seed, "evaluate")
    idx = torch.randint(len(means), (n_draws,), generator=g)
    timesteps = torch.randint(sched.config.num_train_timesteps, (n_draws,), generator=g)
    noise = torch.randn((n_draws, *means.shape[1:]), generator=g)
    latents = means[idx] * pipe.vae.config.scaling_factor
    noisy = sched.add_noise(latents, noise, timesteps).to(device, pipe.unet.dtype)
    target = sched.get_velocity(latents, noise, timesteps) if sched.config.prediction_type == "v_prediction" else noise
    prompts = [encode_placeholder_prompt(pipe.tokenizer, prompt, vectors.shape[0])] * n_draws
    cond = encode_text(pipe.text_encoder, prompts, [vectors] * n_draws, device)
    pred = pipe.unet(noisy, timesteps.to(device), encoder_hidden_states=cond.to(pipe.unet.dtype)).sample
    return float(F.mse_loss(pred.float().cpu(), target.float()))


def _images_digest(images: list[Image.Image]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def invert_classes(
    pipe,
    jobs: list[InversionJob],
    *,
    cfg,
    resolution: int,
    seed: int,
    model_id: str,
    model_revision: str,
    progress: bool = True,
    step_callback: StepCallback | None = None,
    classes_per_pass: int | None = None,
) -> list[Path]:
    """Learn one token per job, ``classes_per_pass`` classes per UNet pass (continuous batching;
    default ``cfg.classes_per_pass``).

    Complete token files are skipped; interrupted classes resume from their last checkpoint.
    """
    trainer = TextualInversionTrainer(
        pipe,
        cfg,
        resolution=resolution,
        seed=seed,
        model_id=model_id,
        model_revision=model_revision,
        progress=progress,
        step_callback=step_callback,
        classes_per_pass=classes_per_pass,
    )
    return trainer.train(jobs)


def invert_class(
    pipe,
    images: list[Image.Image],
    *,
    class_index: int,
    class_name: str,
    cfg,
    resolution: int,
    seed: int,
    out_path: Path,
    model_id: str,
    model_revision: str,
    progress: bool = True,
    step_callback: StepCallback | None = None,
) -> Path:
    """Learn one class's token and write ``out_path`` (see ``invert_classes``)."""
    job = InversionJob(class_index, class_name, list(images), Path(out_path))
    return invert_classes(
        pipe,
        [job],
        cfg=cfg,
        resolution=resolution,
        seed=seed,
        model_id=model_id,
        model_revision=model_revision,
        progress=progress,
        step_callback=step_callback,
    )[0]


__all__ = [
    "InversionJob",
    "evaluate_token_loss",
    "TEMPLATES",
    "TextualInversionTrainer",
    "invert_class",
    "invert_classes",
    "classes_per_pass_for",
    "partial_path",
    "resolve_classes_per_pass",
    "preprocess_image",
    "token_name",
]
