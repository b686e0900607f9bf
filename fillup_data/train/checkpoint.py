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

Every file is fsynced before its rename and every folder after it, so a power cut leaves either the
old record or the new one. A checkpoint that is still unreadable (an empty ``state.json`` from a
crash on a filesystem that reorders writes, a truncated tensor file) counts as "not done": resuming
warns and falls back to the previous checkpoint, or starts the stage afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fillup_data.errors import FillupError
from fillup_data.train.models import save_weights

KEEP_CHECKPOINTS = 2


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path``, fsync the folder: after a crash ``path`` is old or new, never empty."""
    fsync_file(tmp)
    tmp.replace(path)
    fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    replace_durably(tmp, path)


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
    fsync_file(tmp / "optimizer.pt")  # save_weights and write_json fsync their own files
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    for old in sorted(root.glob("epoch-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A checkpoint read completely into memory, so that a bad one changes nothing when it is skipped."""

    path: Path
    scalars: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    torch_rng: torch.Tensor


def read_checkpoint(ckpt: Path) -> Checkpoint:
    """Read and check every file of ``ckpt``; FillupError naming the file if one is missing or damaged."""
    from safetensors.torch import load_file

    scalars = read_json(ckpt / "state.json")
    if not isinstance(scalars, dict) or not isinstance(scalars.get("epoch"), int) or not isinstance(scalars.get("step"), int):
        raise FillupError(f"{ckpt / 'state.json'}: no integer 'epoch' and 'step'")
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise FillupError(f"{ckpt / 'model.safetensors'}: not readable ({err})") from None
    try:
        state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer_state, rng = state["optimizer"], state["torch_rng"]
    except Exception as err:  # truncated zip, missing key, not a torch file
        raise FillupError(f"{ckpt / 'optimizer.pt'}: not readable ({type(err).__name__}: {err})") from None
    return Checkpoint(ckpt, scalars, weights, optimizer_state, rng)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest checkpoint folder (complete or not); ``last_good_checkpoint`` checks them."""
    done = [p for p in sorted((run / "checkpoint").glob("epoch-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def last_good_checkpoint(run: Path, warn=None) -> Checkpoint | None:
    """The newest checkpoint whose every file reads; damaged newer ones are reported through ``warn``
    and skipped (their epochs count as not done). None: start the stage from epoch 0."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    candidates = [p for p in sorted((run / "checkpoint").glob("epoch-*"), reverse=True) if p.is_dir()]
    for ckpt in candidates:
        try:
            return read_checkpoint(ckpt)
        except FillupError as err:
            warn(f"skipping damaged checkpoint {ckpt.name} ({err}); its epoch will be trained again")
    if candidates:
        warn(f"{run}: no readable checkpoint; the stage starts again from epoch 1")
    return None


def load_checkpoint(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimizer state; return the scalars (epoch, step, scaler scale)."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in ckpt.weights)
    wrong = [k for k, v in ckpt.weights.items() if k in own and own[k].shape != v.shape]
    if missing or wrong:
        raise FillupError(f"{ckpt.path}: checkpoint lacks or misshapes tensors {(missing + wrong)[:5]}; it is from another model")
    model.load_state_dict(ckpt.weights, strict=False)
    optimizer.load_state_dict(ckpt.optimizer_state)
    torch.set_rng_state(ckpt.torch_rng)
    return ckpt.scalars
