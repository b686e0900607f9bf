"""Training on a build's shards: Balanced Softmax, the paper's two-stage trainer, evaluation.

``fillup-data train`` / ``fillup-data eval`` live in :mod:`fillup_data.train.cli`.
"""

from fillup_data.train.losses import BalancedSoftmaxLoss

__all__ = ["BalancedSoftmaxLoss"]
