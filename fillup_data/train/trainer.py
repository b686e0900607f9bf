"""Two-stage Balanced Softmax trainer (paper 3.2, appendix B.4).

Stage I trains the whole model from scratch (or from ``model.weights``) on the filled-up set;
Stage II starts from Stage I's final weights (``--init RUN1``) and fine-tunes on real data only.
Both use Balanced Softmax over the *real* class counts of the manifest.  No model selection happens
here: the last epoch's weights are the result (the paper's test sets are the only labelled
held-out data, and choosing a checkpoint on them would leak).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fillup_data.progress import progress_bar

from fillup_data import __version__
from fillup_data.errors import FillupError
from fillup_data.loader import TrainingData, make_loader
from fillup_data.train.checkpoint import (
    Checkpoint, fsync_file, last_good_checkpoint, latest_checkpoint, load_checkpoint, read_json, replace_durably,
    save_checkpoint, write_json,
)
from fillup_data.train.config import TrainConfig, parse_train_config
from fillup_data.train.distributed import DistEnv, all_reduce_sum, barrier
from fillup_data.train.losses import make_loss
from fillup_data.train.models import build_model, classifier_of, load_weights, save_weights
from fillup_data.train.presets import train_transform
from fillup_data.train.schedule import learning_rate


@dataclass
class TrainRequest:
    data: str
    config: TrainConfig
    stage: int
    out: Path
    real_data: str | None = None
    init: Path | None = None
    resume: bool = False
    num_workers: int | None = None
    cache_dir: str | None = None


def model_for(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return build_model(cfg.model.arch, num_classes, cifar_stem=cfg.model.cifar_stem, width=cfg.model.width)


def _record(req: TrainRequest, data: TrainingData, env: DistEnv) -> dict[str, Any]:
    """What identifies this run; a resume must match it."""
    selection = data.selection
    return {
        "stage": req.stage,
        "config": req.config.model_dump(mode="json"),
        "data": str(req.data),
        "real_data": str(req.real_data) if req.real_data else None,
        "builds": {
            role: {"where": b.where, "name": b.name, "version": b.manifest.version,
                   "fingerprint": b.manifest.fingerprint}
            for role, b in (("real", data.real), ("synthetic", data.synthetic))
        },
        "class_names": data.class_names,
        "real_counts": data.real_counts,
        "groups": {"many_above": data.real.many_above, "few_below": data.real.few_below},
        "init": str(req.init) if req.init else None,
        # the stage's score filter, the index it read and what it kept and dropped (None: no filter)
        "synthetic_filter": selection.record(data.groups) if selection is not None else None,
        "world_size": env.world_size,
        "package_version": __version__,
    }


def _prepare_run_dir(req: TrainRequest, record: dict[str, Any], env: DistEnv) -> Checkpoint | None:
    """Check RUN (fresh, or the same run for --resume); return the checkpoint to resume from."""
    run = req.out
    run_json = run / "run.json"
    if req.resume:
        if not run_json.is_file():
            raise FillupError(f"{run}: nothing to resume (no run.json); drop --resume to start a new run")
        old = read_json(run_json)
        # read through today's schema, so a run recorded before a field with a default was added still resumes
        old_config = parse_train_config(old.get("config"), f"{run_json}:config").model_dump(mode="json")
        for key in ("stage", "config", "class_names", "real_counts"):
            if (old_config if key == "config" else old.get(key)) != record.get(key):
                raise FillupError(
                    f"{run_json}: '{key}' differs from this command's; resume with the same --config/--set/"
                    "--data/--stage, or start a new --out"
                )
        if old.get("synthetic_filter") != record.get("synthetic_filter"):
            raise FillupError(
                f"{run_json}: the index.parquet of {req.data} is not the one this run's score filter read when "
                "it started (scored again?), so the kept samples may differ: start a new --out"
            )
        return last_good_checkpoint(run, warn=lambda msg: tqdm.write(f"warning: {msg}") if env.is_main else None)
    if run_json.is_file() or (run.exists() and latest_checkpoint(run) is not None):
        raise FillupError(f"{run}: already holds a run; pass --resume to continue it or choose a new --out")
    return None


def _claim_run_dir(req: TrainRequest, record: dict[str, Any], env: DistEnv) -> None:
    """Written by rank 0 only after every rank has checked the folder (else ranks race on run.json)."""
    if env.is_main and not req.resume:
        req.out.mkdir(parents=True, exist_ok=True)
        write_json(req.out / "run.json", record)


def _read_log(path: Path) -> list[dict[str, Any]]:
    entries = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line torn by the crash
                continue
            if isinstance(entry, dict) and isinstance(entry.get("epoch"), int):
                entries.append(entry)
    return entries


def _truncate_log(run: Path, done_epochs: int, last: dict[str, Any] | None) -> None:
    """On resume, ``log.jsonl`` keeps one line per finished epoch (1..done_epochs): lines of epochs that
    will run again go (a crash after the log line but before the checkpoint), and the checkpoint's own
    copy fills a line lost between checkpoint and log."""
    path = run / "log.jsonl"
    by_epoch = {e["epoch"]: e for e in _read_log(path) if 1 <= e["epoch"] <= done_epochs}
    if last is not None and last.get("epoch") == done_epochs:
        by_epoch[done_epochs] = last
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(by_epoch[k]) + "\n" for k in sorted(by_epoch)), encoding="utf-8")
    replace_durably(tmp, path)


def _init_from_stage1(model: nn.Module, init: Path, data: TrainingData) -> None:
    run_json = init / "run.json"
    weights = init / "model.safetensors"
    if not weights.is_file():
        hint = " (its training has not finished: resume it with --resume)" if (init / "checkpoint").is_dir() else ""
        raise FillupError(f"{init}: no model.safetensors{hint}; --init takes a finished Stage I run folder")
    if run_json.is_file() and read_json(run_json).get("class_names") != data.class_names:
        raise FillupError(f"{init}: trained on other classes than {data.real.where}; use the same build")
    missing = load_weights(model, weights, skip_mismatched=False)
    if missing:
        raise FillupError(f"{weights}: lacks {missing[:5]}; it was trained with another model.arch")


def _set_trainable(model: nn.Module, part: str, reinit: bool) -> nn.Module:
    """``classifier``: cRT-style, only the last linear layer learns. Returns the classifier."""
    head = classifier_of(model)
    if reinit:
        head.reset_parameters()
    if part == "classifier":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    return head


def _train_mode(model: nn.Module, part: str) -> None:
    # frozen features must also keep their BatchNorm statistics: eval mode for everything but the head
    model.train(part == "all")


def train(req: TrainRequest, env: DistEnv) -> Path:
    """Run one stage; returns the path of the final weights."""
    cfg = req.config
    stage = cfg.stage(req.stage)
    if req.stage == 2 and req.init is None:
        raise FillupError("--stage 2 needs --init RUN1 (the Stage I run folder)")
    if stage.batch_size % env.world_size:
        raise FillupError(
            f"stage{req.stage}.batch_size {stage.batch_size} (global) is not divisible by {env.world_size} ranks"
        )
    torch.manual_seed(cfg.seed)
    data = TrainingData.open(req.data, req.real_data, cache_dir=req.cache_dir, sample_filter=stage.filter)
    record = _record(req, data, env)
    if env.is_main and data.selection is not None:
        tqdm.write(f"stage {req.stage} {data.selection.summary(data.groups)}")
    resume_from = _prepare_run_dir(req, record, env)
    barrier(env)
    _claim_run_dir(req, record, env)
    barrier(env)

    d = cfg.data
    tf = train_transform(
        d.image_size, crop=d.crop, scale=d.crop_scale, color_jitter=d.color_jitter, randaugment=d.randaugment,
        randaugment_ops=d.randaugment_ops, randaugment_magnitude=d.randaugment_magnitude, mean=d.mean, std=d.std,
    )
    per_rank = stage.batch_size // env.world_size
    loader = make_loader(
        data, stage.data, "train", per_rank, tf, train=True, seed=cfg.seed + 1000 * req.stage,
        rank=env.rank, world_size=env.world_size,
        num_workers=d.num_workers if req.num_workers is None else req.num_workers,
        shuffle_buffer=d.shuffle_buffer, pin_memory=env.device.type == "cuda",
    )
    iters = len(loader)

    model = model_for(cfg, data.num_classes)
    if req.stage == 1 and cfg.model.weights:
        left = load_weights(model, cfg.model.weights)
        if env.is_main and left:
            tqdm.write(f"initialised from {cfg.model.weights}; left at random init: {', '.join(left[:6])}")
    if req.stage == 2:
        _init_from_stage1(model, Path(req.init), data)
    _set_trainable(model, stage.train, stage.reinit_classifier)
    cuda = env.device.type == "cuda"
    if cfg.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay, nesterov=stage.nesterov
    )
    use_amp = cuda and cfg.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = make_loss(stage.loss, data.real_counts).to(env.device)

    start_epoch, step = 0, 0
    if resume_from is not None:
        scalars = load_checkpoint(resume_from, model, optimizer)
        start_epoch, step = int(scalars["epoch"]) + 1, int(scalars["step"])
        if use_amp and scalars.get("scaler"):
            scaler.load_state_dict(scalars["scaler"])
        if env.is_main:
            tqdm.write(f"resuming {req.out} after epoch {start_epoch}/{stage.epochs}")
    if req.resume and env.is_main:
        _truncate_log(req.out, start_epoch, scalars.get("log") if resume_from is not None else None)

    net: nn.Module = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None)

    if env.is_main:
        tqdm.write(
            f"stage {req.stage}: {stage.data} data, {loader.stream.total_samples} samples, {iters} iterations/epoch "
            f"x {stage.epochs} epochs, global batch {stage.batch_size} on {env.world_size} rank(s), {env.device}"
        )
    for epoch in range(start_epoch, stage.epochs):
        loader.set_epoch(epoch)
        _train_mode(model, stage.train)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        seen = 0
        t0 = time.perf_counter()
        bar = progress_bar(iters, f"stage{req.stage} epoch {epoch + 1}/{stage.epochs}", "it", enabled=env.is_main,
                           leave=False)
        lr = stage.lr
        for it, (images, labels) in enumerate(loader):
            lr = learning_rate(stage, epoch, it, iters)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images = images.to(env.device, non_blocking=True)
            labels = labels.to(env.device, non_blocking=True)
            if cuda and cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                logits = net(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().double() * labels.numel()
            seen += labels.numel()
            step += 1
            if it % 20 == 0 or it == iters - 1:
                cur = loss.item()
                if not math.isfinite(cur) and not use_amp:
                    raise FillupError(
                        f"stage {req.stage} epoch {epoch + 1} iteration {it}: the loss is {cur}; lower stage{req.stage}.lr"
                    )
                bar.set_postfix_str(f"loss={cur:.3f}, lr={lr:.2e}, "
                                    f"img_s={seen * env.world_size / (time.perf_counter() - t0):.0f}")
            bar.update(1)
        bar.close()
        if seen == 0:
            raise FillupError(f"stage {req.stage} epoch {epoch + 1}: the loader yielded no batch")
        totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(seen), dtype=torch.float64)]), env)
        seconds = time.perf_counter() - t0
        entry = {"stage": req.stage, "epoch": epoch + 1, "loss": float(totals[0] / totals[1]), "lr": lr,
                 "images": int(totals[1]), "images_per_s": float(totals[1]) / seconds, "seconds": seconds, "step": step}
        if env.is_main:
            save_checkpoint(req.out, epoch, model, optimizer,
                            {"step": step, "scaler": scaler.state_dict(), "log": entry})
            with open(req.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            fsync_file(req.out / "log.jsonl")
            tqdm.write(f"stage {req.stage} epoch {epoch + 1}/{stage.epochs}: loss {entry['loss']:.4f}  "
                       f"lr {lr:.2e}  {entry['images_per_s']:.0f} images/s")
        barrier(env)

    final = req.out / "model.safetensors"
    if env.is_main:
        save_weights(model, final, metadata={"arch": cfg.model.arch, "stage": str(req.stage),
                                             "num_classes": str(data.num_classes)})
    barrier(env)
    return final
