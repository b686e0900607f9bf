"""Losses: Balanced Softmax (Ren et al., 2020) over the real class counts, and plain cross-entropy.

Paper 3.2: both stages use Balanced Softmax with only the *real* counts n_j, whatever the
synthetic fill-up added.  Balanced Softmax is softmax(logits + log n_j) during training; at test time
the plain logits are used (the prior is the training set's, not the balanced test set's), so the
loss module only ever touches training logits and the evaluator never sees it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fillup_data.errors import FillupError

LOSSES = ("balanced_softmax", "cross_entropy")


class BalancedSoftmaxLoss(nn.Module):
    """``cross_entropy(logits + log(counts), target)``.

    A class with zero real images would add log(0) = -inf to its logit: if such a class is the
    target the loss is inf and its gradient NaN.  Counts are clamped to ``min_count`` (default 1), so
    that class gets the prior of a one-image class: finite, and still the smallest prior.
    """

    def __init__(self, counts: Sequence[int | float] | torch.Tensor, *, min_count: float = 1.0, reduction: str = "mean"):
        super().__init__()
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.ndim != 1 or counts.numel() == 0:
            raise FillupError(f"class counts must be a non-empty 1-D list, got shape {tuple(counts.shape)}")
        if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
            raise FillupError("class counts must be finite and >= 0")
        if min_count <= 0:
            raise FillupError(f"min_count must be > 0, got {min_count}")
        self.reduction = reduction
        # float32 buffer: moves with .to(device) and is saved in no state (counts come from the manifest)
        self.register_buffer("log_prior", counts.clamp_min(min_count).log().float(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.log_prior.numel():
            raise FillupError(
                f"the model has {logits.shape[-1]} outputs but the class counts have {self.log_prior.numel()} entries"
            )
        # computed in float32 even under autocast: log-priors span ~10 units, fp16 logits lose them
        return F.cross_entropy(logits.float() + self.log_prior, target, reduction=self.reduction)


def make_loss(name: str, counts: Sequence[int]) -> nn.Module:
    """The training loss named in the train recipe; ``counts`` are the real training counts."""
    if name == "balanced_softmax":
        return BalancedSoftmaxLoss(counts)
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    raise FillupError(f"loss {name!r}: allowed {', '.join(LOSSES)}")
