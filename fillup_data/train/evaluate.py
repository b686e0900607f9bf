"""Evaluation on the balanced test split: top-1/top-5, many/medium/few, per-class CSV and plot.

Plain logits are scored: the Balanced Softmax prior belongs to training only (Ren et al., 2020).
Many/medium/few accuracies are the mean of per-class accuracies within each group, the groups coming
from the *real* training counts (paper 4.2: >100, 20-100, <20 by default; thresholds from the
build's manifest).  Accuracies are reported in percent, as in the paper's tables.
"""

from __future__ import annotations

import csv
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from fillup_data.progress import track

from fillup_data.errors import FillupError
from fillup_data.loader import TrainingData, make_loader
from fillup_data.schema.groups import GROUPS
from fillup_data.train.checkpoint import read_json, write_json
from fillup_data.train.config import parse_train_config
from fillup_data.train.distributed import DistEnv, all_reduce_sum
from fillup_data.train.models import load_weights
from fillup_data.train.presets import eval_transform
from fillup_data.train.trainer import model_for


@dataclass
class ClassTallies:
    """Per-class counts summed over ranks: test samples, top-1 hits, top-5 hits."""

    total: np.ndarray
    top1: np.ndarray
    top5: np.ndarray


@torch.no_grad()
def tally(model: nn.Module, loader, num_classes: int, env: DistEnv, *, amp: bool = True) -> ClassTallies:
    model.eval()
    k = min(5, num_classes)
    counts = torch.zeros(3, num_classes, dtype=torch.float64)
    cuda = env.device.type == "cuda"
    for images, labels in track(loader, total=len(loader), desc="eval", enabled=env.is_main, leave=False):
        images = images.to(env.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16) if (cuda and amp) else nullcontext():
            logits = model(images).float().cpu()
        topk = logits.topk(k, dim=1).indices
        hit1 = topk[:, 0] == labels
        hit5 = (topk == labels[:, None]).any(dim=1)
        counts[0].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        counts[1].index_add_(0, labels, hit1.double())
        counts[2].index_add_(0, labels, hit5.double())
    counts = all_reduce_sum(counts, env)
    total, top1, top5 = (counts[i].numpy().astype(np.int64) for i in range(3))
    return ClassTallies(total, top1, top5)


def summarize(t: ClassTallies, groups: list[str]) -> dict[str, Any]:
    """Overall top-1/top-5 over samples; groups as the mean of per-class accuracies (classes with
    no test image are left out and counted)."""
    n = int(t.total.sum())
    if n == 0:
        raise FillupError("the test split has no samples")
    present = t.total > 0
    per_class = np.where(present, t.top1 / np.maximum(t.total, 1), np.nan) * 100.0
    out: dict[str, Any] = {
        "overall": float(t.top1.sum() / n * 100.0),
        "top1": float(t.top1.sum() / n * 100.0),
        "top5": float(t.top5.sum() / n * 100.0),
        "mean_per_class": float(np.nanmean(per_class)),
        "num_test_samples": n,
        "num_classes": int(len(t.total)),
        "classes_without_test_samples": int((~present).sum()),
        "unit": "percent",
    }
    g = np.asarray(groups)
    for name in GROUPS:
        sel = (g == name) & present
        out[name] = float(np.mean(per_class[sel])) if sel.any() else None
        out[f"{name}_classes"] = int((g == name).sum())
    return out


FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """A text cell a spreadsheet will not run as a formula (OWASP "CSV injection"): class names come from
    a downloaded manifest, so one starting with = + - @ tab or CR gets a leading single quote."""
    return "'" + cell if cell.startswith(FORMULA_TRIGGERS) else cell


def write_per_class_csv(path: Path, t: ClassTallies, names: list[str], real: list[int], groups: list[str]) -> None:
    """One row per class; numbers are written as numbers, text cells through ``spreadsheet_safe``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class_index", "class_name", "group", "real_train_count", "test_count", "top1_correct",
                    "top1_accuracy", "top5_accuracy"])
        for i, name in enumerate(names):
            n = int(t.total[i])
            acc1 = f"{t.top1[i] / n * 100:.4f}" if n else ""
            acc5 = f"{t.top5[i] / n * 100:.4f}" if n else ""
            w.writerow([i, spreadsheet_safe(str(name)), groups[i], real[i], n, int(t.top1[i]), acc1, acc5])


def plot_per_class(path: Path, t: ClassTallies, real: list[int], many_above: int, few_below: int, title: str) -> None:
    """Per-class accuracy against real training count (log x), with a cubic fit as in figure A6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = t.total > 0
    x = np.asarray(real, dtype=float)[present]
    y = (t.top1[present] / t.total[present]) * 100.0
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.scatter(np.maximum(x, 0.8), y, s=12, alpha=0.6, label="class")
    lx = np.log10(np.maximum(x, 1))
    if len(np.unique(lx)) > 3:
        coef = np.polyfit(lx, y, 3)
        grid = np.linspace(lx.min(), lx.max(), 200)
        ax.plot(10**grid, np.clip(np.polyval(coef, grid), 0, 100), color="C1", label="cubic fit (log count)")
    for v in (few_below, many_above):
        ax.axvline(max(v, 1), color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("real training images of the class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_run(
    data_ref: str, run: Path, env: DistEnv, *, real_data: str | None = None, out: Path | None = None,
    batch_size: int | None = None, num_workers: int | None = None, cache_dir: str | None = None,
) -> dict[str, Any]:
    """Score ``run/model.safetensors`` on the test split of ``data_ref``; write metrics files (rank 0)."""
    run = Path(run)
    run_json, weights = run / "run.json", run / "model.safetensors"
    if not run_json.is_file() or not weights.is_file():
        raise FillupError(f"{run}: not a finished run folder (needs run.json and model.safetensors from `fillup-data train`)")
    record = read_json(run_json)
    cfg = parse_train_config(record.get("config"), f"{run_json}:config")
    data = TrainingData.open(data_ref, real_data, cache_dir=cache_dir)
    if record.get("class_names") != data.class_names:
        raise FillupError(f"{run}: trained on other classes than the test data {data.real.where}")
    model = model_for(cfg, data.num_classes)
    missing = load_weights(model, weights, skip_mismatched=False)
    if missing:
        raise FillupError(f"{weights}: lacks {missing[:5]}; run.json and the weights disagree")
    model.to(env.device)
    d = cfg.data
    loader = make_loader(
        data, "real", "test", batch_size or max(cfg.eval_batch_size // env.world_size, 1),
        eval_transform(d.image_size, d.eval_resize, mean=d.mean, std=d.std), train=False,
        rank=env.rank, world_size=env.world_size,
        num_workers=d.num_workers if num_workers is None else num_workers, pin_memory=env.device.type == "cuda",
    )
    t = tally(model, loader, data.num_classes, env, amp=cfg.amp)
    groups = data.groups
    metrics = summarize(t, groups)
    metrics.update({"run": str(run), "stage": record.get("stage"), "data": str(data_ref),
                    "real_data": str(real_data) if real_data else None,
                    "group_thresholds": {"many_above": data.real.many_above, "few_below": data.real.few_below}})
    if env.is_main:
        out = Path(out) if out else run
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", metrics)
        write_per_class_csv(out / "per_class.csv", t, data.class_names, data.real_counts, groups)
        plot_per_class(out / "per_class_accuracy.png", t, data.real_counts, data.real.many_above,
                       data.real.few_below, f"{record.get('config', {}).get('name', '')} stage {record.get('stage')}")
    return metrics
