"""Toy tasks for the executor tests: no torch, no model, but the same contract as the build's tasks.

Each task writes ``data/<task>.bin`` with bytes derived only from its id and, for a later phase, from
the previous phase's outputs (so running a task before its inputs exist fails: a barrier violation
shows), then its completion record ``done/<task>`` last. Every run is appended to ``runs.log`` so tests
can count how often a task ran. On demand a task sleeps, raises, or SIGKILLs its own process once.

``python -m tests.executor_toys OUT RANK WORLD [options]`` runs one rank of the toy build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fillup_data.executors import RankExecutor, TaskSpec, WorkerInfo, execute


def toy_phases(n_real: int = 3, n_invert: int = 2, n_synthetic: int = 4) -> list[list[TaskSpec]]:
    first = [TaskSpec(f"real/train-real-{i:05d}") for i in range(n_real)]
    first += [TaskSpec(f"invert/g{i:04d}", uses_model=True) for i in range(n_invert)]
    second = [TaskSpec(f"synthetic/train-synthetic-{i:05d}", uses_model=True) for i in range(n_synthetic)]
    return [first, second, [TaskSpec("assemble")]]


def _name(task_id: str) -> str:
    return task_id.replace("/", "+")


@dataclass(frozen=True)
class ToyFactory:
    out: str
    phases: tuple[tuple[str, ...], ...]  # task ids per phase: a task reads the outputs of the phase before
    sleep: float = 0.0
    sleep_model_tasks: float = 0.0
    fail: tuple[str, ...] = ()
    kill_once: tuple[str, ...] = ()

    @classmethod
    def for_phases(cls, out: Path, phases: list[list[TaskSpec]], **options) -> ToyFactory:
        return cls(str(out), tuple(tuple(t.id for t in phase) for phase in phases), **options)

    def __call__(self, worker: WorkerInfo) -> ToyRunner:
        return ToyRunner(self, worker)


class ToyRunner:
    def __init__(self, factory: ToyFactory, worker: WorkerInfo):
        self.f, self.worker, self.out = factory, worker, Path(factory.out)

    def is_done(self, task_id: str) -> bool:
        return (self.out / "done" / _name(task_id)).exists()

    def run(self, task_id: str) -> dict:
        if self.is_done(task_id):
            return {}
        with open(self.out / "runs.log", "a") as log:  # one short O_APPEND write per run
            log.write(f"{task_id} {os.getpid()}\n")
        started = self.out / "started"
        started.mkdir(exist_ok=True)
        where = {"pid": os.getpid(), "node": _ray_node_id(), "device": self.worker.device,
                 "threads": self.worker.num_threads}
        (started / _name(task_id)).write_text(json.dumps(where))
        if task_id in self.f.kill_once:
            marker = self.out / "killed" / _name(task_id)
            marker.parent.mkdir(exist_ok=True)
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        uses_model = task_id.startswith(("invert/", "synthetic/"))
        time.sleep(self.f.sleep + (self.f.sleep_model_tasks if uses_model else 0.0))
        if task_id in self.f.fail:
            raise ValueError(f"toy failure in {task_id}")
        digest = hashlib.sha256(task_id.encode())
        for input_id in self._inputs(task_id):
            digest.update((self.out / "data" / f"{_name(input_id)}.bin").read_bytes())
        data = digest.digest() * 8
        _write_atomic(self.out / "data" / f"{_name(task_id)}.bin", data)
        _write_atomic(self.out / "done" / _name(task_id), json.dumps({"bytes": len(data)}).encode())  # last
        return {"bytes": len(data)}

    def _inputs(self, task_id: str) -> tuple[str, ...]:
        for k, phase in enumerate(self.f.phases):
            if task_id in phase:
                return self.f.phases[k - 1] if k else ()
        raise KeyError(task_id)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _ray_node_id() -> str:
    """The Ray node this runs on, inside a Ray actor; "" elsewhere (without importing ray: it is slow)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("rank", type=int)
    parser.add_argument("world_size", type=int)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--poll", type=float, default=0.1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kill-once", nargs="*", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    phases = toy_phases()
    factory = ToyFactory.for_phases(out, phases, sleep=args.sleep, kill_once=tuple(args.kill_once))
    executor = RankExecutor(args.rank, args.world_size, lease_seconds=args.lease, poll_seconds=args.poll, device="cpu")
    report = execute(phases, factory, out / "state", executor)
    reports = out / "reports"
    reports.mkdir(exist_ok=True)
    (reports / f"rank-{args.rank}-{os.getpid()}.json").write_text(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
