"""Training on a build's shards: Balanced Softmax, the paper's two-stage trainer, evaluation.

``fillup-data train`` / ``fillup-data eval`` live in :mod:`fillup_data.train.cli`. The package imports
no torch until a name that needs it is used (the CLI reads train configs without it).
"""

__all__ = ["BalancedSoftmaxLoss"]


def __getattr__(name: str):
    if name == "BalancedSoftmaxLoss":
        from fillup_data.train.losses import BalancedSoftmaxLoss

        return BalancedSoftmaxLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
