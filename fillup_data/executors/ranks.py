"""Independent ranks (Slurm job arrays, torchrun, any scheduler) sharing one build folder.

Every rank is started with the same command and its own ``rank``. In each phase a rank first runs its
share (task i goes to rank i % world_size), then takes over tasks nobody claimed (a rank that never
started) or whose claim expired (a rank that was killed), and moves on when every task of the phase is
done. No rank waits on another that is not running; a rank that is running renews its claims.

A task that failed during this rank's lifetime is not run again by it (an application error does not go
away by retrying); a rank started later (a re-run) tries it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.executors.base import Executor, PhaseResult, RunnerFactory, TaskRunner, TaskSpec, WorkerInfo, run_task
from fillup_data.executors.claims import ClaimStore
from fillup_data.executors.devices import usable_cpus, visible_cuda_devices
from fillup_data.executors.records import read_failure

log = logging.getLogger("fillup_data.executors")


def rank_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, world size) from a Slurm job array or torchrun; None when neither set them."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task_id = _int_var(env, "SLURM_ARRAY_TASK_ID")
        first = _int_var(env, "SLURM_ARRAY_TASK_MIN", default=0)
        step = _int_var(env, "SLURM_ARRAY_TASK_STEP", default=1) or 1
        count = _int_var(env, "SLURM_ARRAY_TASK_COUNT")
        rank = (task_id - first) // step
        if (task_id - first) % step or not 0 <= rank < count:
            raise FillupError(f"SLURM_ARRAY_TASK_ID={task_id} does not map to a rank of the array "
                              f"(min {first}, step {step}, count {count}): use a contiguous range such as "
                              f"--array=0-{count - 1}, or pass --rank and --world-size")
        return rank, count
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        if not 0 <= rank < world_size:
            raise FillupError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
        return rank, world_size
    return None


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise FillupError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise FillupError(f"environment variable {name}={value!r} is not an integer") from None


class RankExecutor(Executor):
    """``device``/``num_threads`` default to the local GPU (``LOCAL_RANK`` under torchrun) and this
    process's CPUs split among ``LOCAL_WORLD_SIZE`` ranks."""

    def __init__(self, rank: int, world_size: int, *, lease_seconds: float = 120.0, poll_seconds: float = 5.0,
                 device: str | None = None, num_threads: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise FillupError(f"--rank {rank} --world-size {world_size}: need 0 <= rank < world size")
        if lease_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("lease_seconds and poll_seconds must be positive")
        self.rank, self.world_size = rank, world_size
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self.device, self.num_threads = device, num_threads
        self.started_at = time.time()
        self._runner: TaskRunner | None = None
        self._info: WorkerInfo | None = None

    def run_phase(self, tasks: list[TaskSpec], factory: RunnerFactory, state_dir: Path,
                  is_done: Callable[[str], bool] | None) -> PhaseResult:
        claims = ClaimStore(state_dir, self.rank, self.lease_seconds)
        result = PhaseResult()
        done = is_done or (lambda task_id: self._runner_for(factory).is_done(task_id))
        # Own share first, then the others' shares starting with the next rank's, so ranks that take
        # over work start at different places.
        order = [task.id for offset in range(self.world_size) for i, task in enumerate(tasks)
                 if i % self.world_size == (self.rank + offset) % self.world_size]
        my_share = {task.id for i, task in enumerate(tasks) if i % self.world_size == self.rank}
        handled: set[str] = set()
        first_pass = True
        while True:
            progressed = False
            for task_id in order:
                if task_id in handled or self._failed_during_this_run(state_dir, task_id):
                    continue
                if done(task_id):
                    handled.add(task_id)
                    if first_pass and task_id in my_share:
                        result.skipped.append(task_id)
                    continue
                held, stale = claims.try_claim(task_id)
                if held is None:
                    continue
                if stale is not None:
                    owner = stale.get("owner", {})
                    reason = (f"claim of rank {owner.get('rank', '?')} (host {owner.get('host', '?')}, "
                              f"pid {owner.get('pid', '?')}) expired; taken over by rank {self.rank}")
                    log.warning("%s: %s", task_id, reason)
                    result.retries.append((task_id, reason))
                try:
                    with claims.heartbeat(held):
                        outcome = run_task(self._runner_for(factory), task_id, self._info, state_dir)
                finally:
                    claims.release(held)
                result.add(outcome)
                handled.add(task_id)
                progressed = True
            first_pass = False
            remaining = [task_id for task_id in order if task_id not in handled and not done(task_id)]
            failed = [task_id for task_id in remaining if self._failed_during_this_run(state_dir, task_id)]
            if len(failed) == len(remaining):  # the phase is over: everything done or failed
                reported = {task_id for task_id, _ in result.failures}
                for task_id in failed:
                    if task_id not in reported:
                        record = read_failure(state_dir, task_id) or {}
                        result.failures.append((task_id, record.get("traceback") or record.get("error", "")))
                return result
            if not progressed:
                time.sleep(self.poll_seconds)  # others hold live claims: wait for them or their expiry

    def _failed_during_this_run(self, state_dir: Path, task_id: str) -> bool:
        record = read_failure(state_dir, task_id)
        return record is not None and record.get("time", 0) >= self.started_at

    def _runner_for(self, factory: RunnerFactory) -> TaskRunner:
        if self._runner is None:
            self._info = self._worker_info()
            self._runner = factory(self._info)
        return self._runner

    def _worker_info(self) -> WorkerInfo:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        device = self.device
        if device is None:
            gpus = visible_cuda_devices()
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % gpus}" if gpus else "cpu"
        threads = self.num_threads or max(1, usable_cpus() // max(1, local_ranks))
        return WorkerInfo(self.rank, self.world_size, device, threads)
