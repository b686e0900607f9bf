"""One machine: in-process on CPU, or one worker process per GPU.

On CPU the single worker runs in this process (no extra process: a CPU build is as fast as it was).
With N visible GPUs there are N worker processes ("spawn": a forked CUDA context is unusable), each
pinned to one GPU through CUDA_VISIBLE_DEVICES before it loads its runner, each creating its runner
once and taking one task at a time. A worker process that dies (SIGKILL, OOM killer) is replaced and
its task handed out again, up to ``max_retries`` times.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from fillup_data.executors.base import (Executor, PhaseResult, RunnerFactory, TaskOutcome, TaskRunner, TaskSpec,
                                        WorkerInfo, run_task)
from fillup_data.executors.devices import usable_cpus, visible_cuda_devices

log = logging.getLogger("fillup_data.executors")


class LocalExecutor(Executor):
    """``devices``: one entry per worker ("cpu" or "cuda:K"); default: one per visible GPU, else one CPU worker."""

    def __init__(self, num_workers: int | None = None, devices: list[str] | None = None, max_retries: int = 3):
        if devices is None:
            gpus = visible_cuda_devices()
            count = num_workers or max(gpus, 1)
            devices = [f"cuda:{i % gpus}" for i in range(count)] if gpus else ["cpu"] * count
        elif num_workers is not None and num_workers != len(devices):
            raise ValueError(f"num_workers={num_workers} but {len(devices)} devices given: give one or the other")
        if not devices:
            raise ValueError("LocalExecutor needs at least one worker")
        self.devices = list(devices)
        self.max_retries = max_retries
        threads = max(1, usable_cpus() // len(self.devices))
        if len(self.devices) == 1:  # in-process: the device as named, every core
            self.infos = [WorkerInfo(0, 1, self.devices[0], threads)]
        else:
            self.infos = [WorkerInfo(i, len(self.devices), _device_in_worker(d), threads)
                          for i, d in enumerate(self.devices)]
        self._runner: TaskRunner | None = None  # in-process mode
        self._workers: list[_WorkerProcess | None] = [None] * len(self.devices)

    @property
    def in_process(self) -> bool:
        return len(self.devices) == 1

    def run_phase(self, tasks: list[TaskSpec], factory: RunnerFactory, state_dir: Path,
                  is_done: Callable[[str], bool] | None) -> PhaseResult:
        result = PhaseResult()
        todo = deque()
        for task in tasks:
            if is_done is not None and is_done(task.id):
                result.skipped.append(task.id)
            else:
                todo.append(task.id)
        if self.in_process:
            if todo and self._runner is None:
                self._runner = factory(self.infos[0])
            for task_id in todo:
                result.add(run_task(self._runner, task_id, self.infos[0], state_dir))
        else:
            self._run_in_processes(todo, factory, state_dir, result)
        return result

    def _run_in_processes(self, todo: deque, factory: RunnerFactory, state_dir: Path, result: PhaseResult) -> None:
        attempts: Counter[str] = Counter()
        busy: dict[int, str] = {}  # worker index -> task id
        while todo or busy:
            for index in range(len(self._workers)):
                if todo and index not in busy:
                    worker = self._worker(index, factory, state_dir)
                    task_id = todo.popleft()
                    worker.conn.send(task_id)
                    busy[index] = task_id
            ready = wait([self._workers[i].conn for i in busy] + [self._workers[i].process.sentinel for i in busy])
            for index in list(busy):
                worker = self._workers[index]
                if worker.conn in ready or worker.process.sentinel in ready:
                    outcome = worker.receive()
                    task_id = busy.pop(index)
                    if outcome is not None:
                        result.add(outcome)
                        continue
                    # The process died with the task in hand: replace it and hand the task out again.
                    worker.process.join(timeout=10)  # its pipe can close before it is reaped
                    exit_code = worker.process.exitcode
                    worker.close()
                    self._workers[index] = None
                    attempts[task_id] += 1
                    reason = f"worker {index} ({self.devices[index]}) died (exit code {exit_code})"
                    if attempts[task_id] <= self.max_retries:
                        log.warning("%s running %s: retrying on a new worker", reason, task_id)
                        result.retries.append((task_id, reason))
                        todo.appendleft(task_id)
                    else:
                        result.failures.append((task_id, f"{reason}; gave up after {self.max_retries} retries"))

    def _worker(self, index: int, factory: RunnerFactory, state_dir: Path) -> _WorkerProcess:
        if self._workers[index] is None:
            self._workers[index] = _WorkerProcess.start(self.infos[index], self.devices[index], factory, state_dir)
        return self._workers[index]

    def close(self) -> None:
        for index, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop()
                self._workers[index] = None
        self._runner = None


def _device_in_worker(device: str) -> str:
    """A worker pinned to "cuda:K" sees that GPU as its only one: cuda:0."""
    return "cuda:0" if device.startswith("cuda") else device


def _cuda_visible_devices_for(device: str) -> str:
    """"cuda:K" -> the K-th GPU this process may use (honours a CUDA_VISIBLE_DEVICES already set)."""
    if not device.startswith("cuda"):
        return ""  # a CPU worker must not grab a GPU
    k = int(device.partition(":")[2] or 0)
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        return inherited.split(",")[k].strip()
    return str(k)


@dataclass
class _WorkerProcess:
    process: multiprocessing.process.BaseProcess
    conn: Connection

    @classmethod
    def start(cls, info: WorkerInfo, device: str, factory: RunnerFactory, state_dir: Path) -> _WorkerProcess:
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        env = {"CUDA_VISIBLE_DEVICES": _cuda_visible_devices_for(device),
               "OMP_NUM_THREADS": str(info.num_threads)}
        # The factory travels pickled and is unpickled only after the environment is set: unpickling
        # imports the factory's module, which may import torch.
        process = context.Process(target=_worker_main, name=f"fillup-worker-{info.index}",
                                  args=(env, pickle.dumps(factory), info, str(state_dir), child_end), daemon=True)
        process.start()
        child_end.close()
        return cls(process, parent_end)

    def receive(self) -> TaskOutcome | None:
        """The worker's answer, or None when it died before giving one."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        self.close()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _worker_main(env: dict, factory_bytes: bytes, info: WorkerInfo, state_dir: str, conn: Connection) -> None:
    os.environ.update(env)
    try:
        runner = pickle.loads(factory_bytes)(info)
    except Exception:  # every task this worker is given fails with the reason, instead of a silent death
        runner = _BrokenRunner(traceback.format_exc())
    while True:
        try:
            task_id = conn.recv()
        except EOFError:  # the driver is gone
            return
        if task_id is None:
            return
        conn.send(run_task(runner, task_id, info, Path(state_dir)))


class _BrokenRunner:
    def __init__(self, creation_traceback: str):
        self.creation_traceback = creation_traceback

    def is_done(self, task_id: str) -> bool:
        return False

    def run(self, task_id: str) -> dict:
        raise RuntimeError(f"this worker could not create its runner:\n{self.creation_traceback}")
