"""Run folder: per-epoch full-state checkpoints, the final weights, and the run's record.

Layout of ``RUN/``::

    run.json                       what was trained: stage, resolved train recipe, data, classes
    log.jsonl                      one line per epoch: loss, lr, images/s, seconds
    checkpoint/epoch-0007/         the last completed epochs (written to a temp folder, then renamed)
        model.safetensors          weights
        state.json                 epoch, global step, GradScaler scale
        optimizer.pt               SGD momentum buffers + CPU RNG (torch.save; weights_only-loadable)
    model.safetensors              the final weights (after the last epoch): what eval and
                                   ``--init`` read, and the only file meant to be shared

Optimizer state stays a local, torch.save file (it is never published); it is loaded with
``weights_only=True``, so no code can run from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fillup_data.errors import FillupError
from fillup_data.train.models import load_weights, save_weights

KEEP_CHECKPOINTS = 2


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FillupError(f"{path}: cannot read ({err})") from None


def save_checkpoint(
    run: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scalars: dict[str, Any]
) -> Path:
    """Write epoch ``epoch`` (0-based, completed) atomically and drop older checkpoints."""
    root = run / "checkpoint"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".epoch-{epoch:04d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors")
    # the CPU RNG drives the augmentations when the loader runs in the main process: restoring it
    # makes a resumed run repeat exactly what an uninterrupted one would have done
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    write_json(tmp / "state.json", {"epoch": epoch, **scalars})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("epoch-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    done = [p for p in sorted((run / "checkpoint").glob("epoch-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer state; return the scalars (epoch, step, scaler scale)."""
    missing = load_weights(model, ckpt / "model.safetensors", skip_mismatched=False)
    if missing:
        raise FillupError(f"{ckpt}: checkpoint lacks tensors {missing[:5]}; it is from another model")
    state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return read_json(ckpt / "state.json")
