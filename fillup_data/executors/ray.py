"""A Ray cluster: long-lived actors that keep their runner (and its loaded pipeline) for every task.

Actors that run model tasks each hold ``gpus_per_worker`` GPUs (fractional allowed: several actors share
a GPU); there are floor(cluster GPUs / gpus_per_worker) of them, or ``num_workers``. Other tasks run on
CPU actors of ``cpus_per_worker`` CPUs. Tasks are handed out one at a time as actors free up. A task lost
with its actor or node is resubmitted on another actor (a new one replaces the dead one when the cluster
has room), up to ``max_retries`` times, and reported as a retry; an exception raised by the task itself
is recorded with its traceback and not retried. Everything a task produces is in the shared build folder,
so a driver that dies loses nothing: re-running the same command skips what is done.
"""

from __future__ import annotations

import logging
import os
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fillup_data.errors import FillupError
from fillup_data.executors.base import Executor, PhaseResult, RunnerFactory, TaskOutcome, TaskSpec, WorkerInfo, run_task

log = logging.getLogger("fillup_data.executors")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FillupError("the ray executor needs Ray: pip install fillup-data[ray]") from None
    return ray


def _lost_worker_errors(ray) -> tuple[type[BaseException], ...]:
    """Errors that mean the worker (actor process, raylet or node) went away, or Ray's memory monitor
    killed it, not that the task failed. ActorDiedError and ActorUnavailableError are RayActorErrors."""
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.ObjectLostError, e.LocalRayletDiedError,
            e.OutOfMemoryError)


class TaskActor:
    """The body of every actor: one runner, created once, for all the tasks it is given."""

    def __init__(self, factory: RunnerFactory, index: int, count: int, gpus_held: float, cpus_held: float,
                 worker_device: str | None, state_dir: str, name: str = "worker"):
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        node = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
        if gpus_held:
            # Threads in proportion to this actor's share of the node's GPUs: with logical GPUs on a CPU
            # node, actors sharing the cores split them instead of each using all of them.
            threads = node.get("CPU", 1) * gpus_held / max(node.get("GPU", 1), gpus_held)
            device = worker_device or _cuda_or_cpu()
        else:
            threads, device = cpus_held, worker_device or "cpu"
        self.info = WorkerInfo(index, count, device, max(1, int(threads)))
        self.state_dir = Path(state_dir)
        # Ray forwards an actor's stderr to the driver: the actor's progress goes to its own log file in
        # the build folder instead, and the driver prints the build's overall line
        from fillup_data import progress

        os.environ[progress.ENV_MODE] = "off"
        progress.silence_library_bars()
        progress.attach_log(self.state_dir / "logs" / f"ray-{name}-{index:03d}.log")
        self.runner = factory(self.info)

    def ready(self) -> WorkerInfo:
        return self.info

    def run(self, task_id: str) -> TaskOutcome:
        return run_task(self.runner, task_id, self.info, self.state_dir)


def _cuda_or_cpu() -> str:
    """Ray gave this actor a GPU; torch may still see none (logical GPUs on a CPU machine, in tests)."""
    from fillup_data.executors.devices import visible_cuda_devices

    return "cuda:0" if visible_cuda_devices() else "cpu"


@dataclass
class _ActorPool:
    """The actors of one kind (model or plain), grown on demand up to ``capacity``."""

    name: str
    capacity: int
    options: dict
    gpus_held: float
    cpus_held: float
    members: list = field(default_factory=list)  # every live actor: idle, busy or starting
    idle: list = field(default_factory=list)
    starting: dict = field(default_factory=dict)  # ready() ref -> actor
    live: int = 0
    created: int = 0
    creation_failures: int = 0


class RayExecutor(Executor):
    def __init__(self, address: str | None = None, *, gpus_per_worker: float = 1.0, num_workers: int | None = None,
                 cpus_per_worker: float = 1, max_retries: int = 3, worker_device: str | None = None,
                 init_kwargs: dict | None = None):
        """``address``: None (the Ray this process already joined, else a new local one), "auto" or host:port.
        ``worker_device``: force the device runners get (default: "cuda:0" when the actor's GPU is real)."""
        if gpus_per_worker <= 0 or cpus_per_worker <= 0:
            raise FillupError("--gpus-per-worker and cpus per worker must be positive")
        self.ray = ray = _import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, **(init_kwargs or {}))
        self.max_retries = max_retries
        self.worker_device = worker_device
        self._notes: list[str] = []
        self._actor_class = ray.remote(TaskActor)
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
        cpu_actors = max(1, int(cpus // cpus_per_worker))
        plain = _ActorPool("plain", cpu_actors, {"num_cpus": cpus_per_worker}, 0, cpus_per_worker)
        if gpus:
            if gpus_per_worker > gpus:
                raise FillupError(f"--gpus-per-worker {gpus_per_worker} is more than the cluster's {gpus:g} GPUs")
            # num_cpus=0: a GPU actor holds no CPU slot, so it never keeps a CPU actor from starting
            model = _ActorPool("model", num_workers or math.floor(gpus / gpus_per_worker),
                               {"num_gpus": gpus_per_worker, "num_cpus": 0}, gpus_per_worker, 0)
            if model.capacity < 1:
                raise FillupError(f"num_workers={num_workers}: need at least one worker")
        else:
            # One pool for both kinds: two CPU pools could each hold the CPUs the other waits for.
            model = plain
            if num_workers:
                plain.capacity = num_workers
            self._note(f"the Ray cluster has no GPUs: model tasks run on up to {plain.capacity} CPU actors "
                       f"of {cpus_per_worker:g} CPUs each")
        self._pools = {True: model, False: plain}

    def notes(self) -> list[str]:
        return list(self._notes)

    def _note(self, text: str) -> None:
        log.warning(text)
        self._notes.append(text)

    def run_phase(self, tasks: list[TaskSpec], factory: RunnerFactory, state_dir: Path,
                  is_done: Callable[[str], bool] | None) -> PhaseResult:
        ray, lost_worker = self.ray, _lost_worker_errors(self.ray)
        result = PhaseResult()
        queues: dict[bool, deque[str]] = {True: deque(), False: deque()}
        for task in tasks:
            if is_done is not None and is_done(task.id):
                result.skipped.append(task.id)
            else:
                queues[task.uses_model].append(task.id)
        attempts: Counter[str] = Counter()
        running: dict[Any, tuple[bool, Any, str]] = {}  # run() ref -> (uses_model, actor, task id)
        while queues[True] or queues[False] or running:
            for uses_model, queue in queues.items():
                pool = self._pools[uses_model]
                self._grow(pool, len(queue) - len(pool.idle) - len(pool.starting), factory, state_dir)
                while queue and pool.idle:
                    actor, task_id = pool.idle.pop(), queue.popleft()
                    running[actor.run.remote(task_id)] = (uses_model, actor, task_id)
            starting = {ref: pool for pool in self._distinct_pools() for ref in pool.starting}
            if not running and not starting:  # no worker left that could take the queued tasks
                for queue in queues.values():
                    result.failures += [(task_id, "no Ray actor could be started to run it") for task_id in queue]
                break
            # Wait for a task, or for a new actor to be ready; with no task running, only a new actor helps.
            ready, _ = ray.wait(list(running) + list(starting), num_returns=1)
            ref = ready[0]
            if ref in starting:
                self._started(starting[ref], ref, queues, result)
                continue
            uses_model, actor, task_id = running.pop(ref)
            pool = self._pools[uses_model]
            try:
                outcome = ray.get(ref)
            except lost_worker as exc:
                self._forget(pool, actor)
                attempts[task_id] += 1
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
                if attempts[task_id] <= self.max_retries:
                    log.warning("%s lost its worker (%s): resubmitting", task_id, reason)
                    result.retries.append((task_id, reason))
                    queues[uses_model].appendleft(task_id)
                else:
                    result.failures.append((task_id, f"lost its worker {attempts[task_id]} times; last: {exc}"))
                continue
            except ray.exceptions.RayTaskError as exc:  # raised outside run_task: still the task's own error
                pool.idle.append(actor)
                result.failures.append((task_id, str(exc)))
                continue
            except ray.exceptions.RayError as exc:  # anything else Ray reports: recorded, the actor replaced
                self._forget(pool, actor)
                result.failures.append((task_id, f"{type(exc).__name__}: {exc}"))
                continue
            pool.idle.append(actor)
            result.add(outcome)
        return result

    def _grow(self, pool: _ActorPool, wanted: int, factory: RunnerFactory, state_dir: Path) -> None:
        for _ in range(max(0, min(wanted, pool.capacity - pool.live))):
            actor = self._actor_class.options(**pool.options).remote(
                factory, pool.created, pool.capacity, pool.gpus_held, pool.cpus_held, self.worker_device,
                str(state_dir), pool.name)
            pool.starting[actor.ready.remote()] = actor
            pool.members.append(actor)
            pool.live += 1
            pool.created += 1

    def _started(self, pool: _ActorPool, ref, queues: dict[bool, deque[str]], result: PhaseResult) -> None:
        actor = pool.starting.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the runner could not be created, or the node went away
            self._forget(pool, actor)
            pool.creation_failures += 1
            log.warning("a %s actor did not start: %s", pool.name, _first_line(exc))
            if pool.creation_failures > self.max_retries:  # a broken factory: fail its tasks, do not loop
                error = f"{pool.creation_failures} {pool.name} actors in a row failed to start; last error:\n{exc}"
                for uses_model, queue in queues.items():
                    if self._pools[uses_model] is pool:
                        result.failures += [(task_id, error) for task_id in queue]
                        queue.clear()
            return
        pool.creation_failures = 0
        pool.idle.append(actor)

    def _forget(self, pool: _ActorPool, actor) -> None:
        pool.live -= 1
        pool.members.remove(actor)
        if actor in pool.idle:
            pool.idle.remove(actor)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone with its node
            pass

    def _distinct_pools(self) -> list[_ActorPool]:
        return [self._pools[True]] + ([self._pools[False]] if self._pools[False] is not self._pools[True] else [])

    def close(self) -> None:
        for pool in self._distinct_pools():
            for actor in pool.members:
                try:
                    self.ray.kill(actor, no_restart=True)
                except Exception:
                    pass
            pool.members.clear()
            pool.idle.clear()
            pool.starting.clear()
            pool.live = 0
        if self._owns_ray:
            self.ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
