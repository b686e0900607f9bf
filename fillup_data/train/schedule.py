"""Learning rate as a pure function of (epoch, iteration): nothing to checkpoint, exact on resume.

Paper B.4 says "decayed by a factor of 0.1 every ten epochs ... with five warm-up epochs" without the
warm-up shape or where the decay count starts.  Our reading (the usual one in long-tailed code such
as LDAM-DRW/BALMS): warm-up is a linear ramp per iteration from lr/iters to lr over the first
``warmup_epochs`` epochs, and step decays happen at epochs step_size, 2*step_size, ... counted from
the start of the stage (Stage II: lr 1e-3 for epochs 5-9, 1e-4 for 10-19, 1e-5 for 20-29).  Cosine
decays from lr to 0 over the epochs after the warm-up.
"""

from __future__ import annotations

import math

from fillup_data.train.config import StageConfig


def learning_rate(stage: StageConfig, epoch: int, iteration: int, iters_per_epoch: int) -> float:
    """The lr for ``iteration`` (0-based) of ``epoch`` (0-based)."""
    iters = max(iters_per_epoch, 1)
    if stage.warmup_epochs and epoch < stage.warmup_epochs:
        step = epoch * iters + iteration + 1
        return stage.lr * step / (stage.warmup_epochs * iters)
    if stage.schedule == "constant":
        return stage.lr
    if stage.schedule == "step":
        return stage.lr * stage.gamma ** (epoch // stage.step_size)
    # cosine over the post-warm-up part of the stage, per iteration
    span = max((stage.epochs - stage.warmup_epochs) * iters, 1)
    done = (epoch - stage.warmup_epochs) * iters + iteration
    return stage.lr * 0.5 * (1.0 + math.cos(math.pi * done / span))
