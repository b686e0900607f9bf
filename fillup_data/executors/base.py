"""The task contract every executor runs, and the phase loop with its barriers.

A build is a list of phases; a phase is a list of tasks that may run in any order and on any worker.
A task is identified by a string id and done by a ``TaskRunner`` that lives inside a worker (created
once per worker, so it can keep a loaded pipeline). The runner owns its work: it skips a task that is
already done and writes the task's completion record last (datatrove's contract), so an executor never
has to know what a task produces, and relaunching the same command runs only what is missing.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fillup_data.executors.records import clear_failure, write_failure

log = logging.getLogger("fillup_data.executors")

_TASK_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True)
class TaskSpec:
    """One unit of work. ``uses_model``: the task needs the text-to-image model (GPU work)."""

    id: str
    uses_model: bool = False

    def __post_init__(self) -> None:
        # Ids become file names (claims, failure records): no spaces, no "..", no absolute paths.
        if not _TASK_ID.match(self.id) or ".." in self.id.split("/"):
            raise ValueError(f"task id {self.id!r}: use letters, digits and _ . - separated by single '/'")


@dataclass(frozen=True)
class WorkerInfo:
    """Where a runner lives: its index among ``count`` workers, its torch device and thread budget."""

    index: int
    count: int
    device: str = "cpu"
    num_threads: int = 1


class TaskRunner(Protocol):
    def run(self, task_id: str) -> dict:
        """Do the task (quickly return if already done); write its completion record last."""

    def is_done(self, task_id: str) -> bool: ...


class RunnerFactory(Protocol):
    """Picklable (a top-level class with plain-data fields): it crosses processes and Ray."""

    def __call__(self, worker: WorkerInfo) -> TaskRunner: ...


@dataclass
class TaskOutcome:
    """What a worker sends back for one task: ``status`` is "ran", "skipped" or "failed"."""

    task_id: str
    status: str
    summary: dict | None = None
    error: str = ""


@dataclass
class PhaseResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    retries: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    summaries: dict[str, dict] = field(default_factory=dict)

    def add(self, outcome: TaskOutcome) -> None:
        if outcome.status == "ran":
            self.ran.append(outcome.task_id)
            self.summaries[outcome.task_id] = outcome.summary or {}
        elif outcome.status == "skipped":
            self.skipped.append(outcome.task_id)
        else:
            self.failures.append((outcome.task_id, outcome.error))


@dataclass
class ExecutionReport:
    """What one ``execute`` call did. ``failures`` carry the task's traceback text."""

    tasks_run: int = 0
    tasks_skipped: int = 0
    retries: list[tuple[str, str]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    phase_seconds: list[float] = field(default_factory=list)
    summaries: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stopped_after_phase: int | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = [f"tasks: {self.tasks_run} run, {self.tasks_skipped} already done, "
                 f"{len(self.retries)} retried, {len(self.failures)} failed"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  retried {task}: {reason}" for task, reason in self.retries]
        lines += [f"  FAILED {task}: {error.strip().splitlines()[-1] if error.strip() else ''}"
                  for task, error in self.failures]
        if self.stopped_after_phase is not None:
            lines.append(f"  stopped after phase {self.stopped_after_phase}; fix the error and re-run to resume")
        return "\n".join(lines)


class Executor(ABC):
    """Runs the tasks of one phase to completion (or failure); keeps its workers between phases.

    Workers keep the runner their factory made, so an executor serves one factory for its life:
    ``execute`` binds it, and a different factory is refused rather than silently run by the old runners.
    """

    _factory: RunnerFactory | None = None

    def bind(self, factory: RunnerFactory) -> None:
        if self._factory is None:
            self._factory = factory
        elif factory != self._factory:
            raise ValueError(f"{type(self).__name__} already runs tasks for {self._factory!r}; use another "
                             f"executor for {factory!r} (its workers hold runners of the first factory)")

    @abstractmethod
    def run_phase(self, tasks: list[TaskSpec], factory: RunnerFactory, state_dir: Path,
                  is_done: Callable[[str], bool] | None) -> PhaseResult: ...

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        """Stop the workers (called once, after the last phase)."""


def execute(phases: list[list[TaskSpec]], factory: RunnerFactory, state_dir: str | Path, executor: Executor,
            is_done: Callable[[str], bool] | None = None) -> ExecutionReport:
    """Run ``phases`` in order with a barrier between them; stop after the first phase with a failure.

    ``is_done`` (optional, cheap, on the driver) lets done tasks be skipped without waking a worker;
    workers check ``runner.is_done`` themselves in any case.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    _check_unique_ids(phases)
    executor.bind(factory)
    report = ExecutionReport()
    try:
        for k, phase in enumerate(phases):
            start = time.monotonic()
            result = executor.run_phase(list(phase), factory, state_dir, is_done)
            report.phase_seconds.append(time.monotonic() - start)
            report.tasks_run += len(result.ran)
            report.tasks_skipped += len(result.skipped)
            report.retries += result.retries
            report.failures += result.failures
            report.summaries.update(result.summaries)
            log.info("phase %d: %d run, %d already done, %d failed (%.1fs)", k, len(result.ran),
                     len(result.skipped), len(result.failures), report.phase_seconds[-1])
            if result.failures:
                report.stopped_after_phase = k
                break
    finally:
        report.notes += executor.notes()
        executor.close()
    return report


def _check_unique_ids(phases: list[list[TaskSpec]]) -> None:
    seen: set[str] = set()
    for phase in phases:
        for task in phase:
            if task.id in seen:
                raise ValueError(f"task id {task.id!r} appears twice in the phases")
            seen.add(task.id)


def run_task(runner: TaskRunner, task_id: str, worker: WorkerInfo, state_dir: Path) -> TaskOutcome:
    """Worker side, shared by every executor: skip if done, run, and keep the failure record in step."""
    if runner.is_done(task_id):
        clear_failure(state_dir, task_id)
        return TaskOutcome(task_id, "skipped")
    try:
        summary = runner.run(task_id)
    except Exception as exc:  # an application error: recorded with its traceback, never retried blindly
        text = traceback.format_exc()
        write_failure(state_dir, task_id, error=f"{type(exc).__name__}: {exc}", traceback_text=text,
                      worker=f"worker {worker.index}/{worker.count} on {worker.device}")
        return TaskOutcome(task_id, "failed", error=text)
    clear_failure(state_dir, task_id)
    return TaskOutcome(task_id, "ran", summary=summary if isinstance(summary, dict) else {})
