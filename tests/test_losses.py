"""Balanced Softmax: the formula, the zero-count guard, gradients, and no prior at test time."""

import math

import pytest
import torch
import torch.nn.functional as F

from fillup_data.errors import FillupError
from fillup_data.train.losses import BalancedSoftmaxLoss, make_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_cross_entropy_of_logits_plus_log_counts(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 1000, (13,), generator=g)
    logits = torch.randn(64, 13, generator=g) * 3
    target = torch.randint(0, 13, (64,), generator=g)
    got = BalancedSoftmaxLoss(counts.tolist())(logits, target)
    want = F.cross_entropy(logits + counts.float().log(), target)
    assert torch.allclose(got, want, atol=1e-6)


def test_by_hand_two_classes():
    # counts 1 and e^2: p(target=0) = e^0 * 1 / (e^0 * 1 + e^0 * e^2)
    loss = BalancedSoftmaxLoss([1.0, math.exp(2.0)])(torch.zeros(1, 2), torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(2.0))), rel=1e-6)


def test_not_plain_cross_entropy_when_imbalanced():
    logits = torch.randn(8, 3)
    target = torch.arange(8) % 3
    assert not torch.allclose(BalancedSoftmaxLoss([100, 10, 1])(logits, target), F.cross_entropy(logits, target))
    # with equal counts the prior is a constant shift and Balanced Softmax is plain cross-entropy
    assert torch.allclose(BalancedSoftmaxLoss([7, 7, 7])(logits, target), F.cross_entropy(logits, target), atol=1e-6)


def test_zero_count_class_is_finite_loss_and_gradient():
    counts = [500, 20, 0, 3]
    logits = torch.randn(16, 4, requires_grad=True)
    target = torch.full((16,), 2)  # every sample of the zero-count class
    loss = BalancedSoftmaxLoss(counts)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # the zero-count class gets the smallest prior (that of one image)
    assert BalancedSoftmaxLoss(counts).log_prior[2] == 0.0


def test_gradients_match_autograd_of_formula():
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(1, 300, (7,), generator=g).float()
    base = torch.randn(32, 7, generator=g, dtype=torch.float64)
    target = torch.randint(0, 7, (32,), generator=g)
    a = base.clone().float().requires_grad_(True)
    BalancedSoftmaxLoss(counts)(a, target).backward()
    b = base.clone().float().requires_grad_(True)
    F.cross_entropy(b + counts.log(), target).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
    # and the closed form: softmax(logits + log n) - onehot, over the batch
    p = torch.softmax(base.float() + counts.log(), dim=1)
    closed = (p - F.one_hot(target, 7).float()) / 32
    assert torch.allclose(a.grad, closed, atol=1e-6)


def test_reduction_none_and_wrong_width():
    loss = BalancedSoftmaxLoss([3, 4], reduction="none")(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))
    assert loss.shape == (5,)
    with pytest.raises(FillupError, match="3 outputs"):
        BalancedSoftmaxLoss([3, 4])(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("bad", [[], [1, -1], [float("inf")]])
def test_bad_counts(bad):
    with pytest.raises(FillupError):
        BalancedSoftmaxLoss(bad)


def test_make_loss():
    assert isinstance(make_loss("balanced_softmax", [1, 2]), BalancedSoftmaxLoss)
    assert isinstance(make_loss("cross_entropy", [1, 2]), torch.nn.CrossEntropyLoss)
    with pytest.raises(FillupError, match="allowed"):
        make_loss("focal", [1, 2])


def test_prior_is_not_saved_with_the_model():
    # the prior comes from the manifest at training time only; eval never applies it
    assert "log_prior" not in BalancedSoftmaxLoss([1, 2]).state_dict()
