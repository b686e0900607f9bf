"""Run a build's tasks on one process, one process per GPU, independent ranks, or a Ray cluster.

The contract (``base.py``): a build is phases of ``TaskSpec``s; a ``RunnerFactory`` makes one
``TaskRunner`` per worker; ``execute`` runs the phases in order with a barrier between them.
"""

from fillup_data.executors.base import (ExecutionReport, Executor, RunnerFactory, TaskRunner, TaskSpec, WorkerInfo,
                                        execute)
from fillup_data.executors.local import LocalExecutor
from fillup_data.executors.ranks import RankExecutor, rank_from_env
from fillup_data.executors.ray import RayExecutor  # imports ray only when a RayExecutor is made
from fillup_data.executors.status import PhaseStatus, read_status


__all__ = ["ExecutionReport", "Executor", "LocalExecutor", "PhaseStatus", "RankExecutor", "RayExecutor",
           "RunnerFactory", "TaskRunner", "TaskSpec", "WorkerInfo", "execute", "rank_from_env", "read_status"]
