"""What ``fillup-data status`` shows while a build runs on any executor, read from the build folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fillup_data.executors.base import TaskSpec
from fillup_data.executors.claims import live_claims
from fillup_data.executors.records import read_failure


@dataclass
class PhaseStatus:
    done: int
    total: int
    running: list[dict] = field(default_factory=list)  # live claims: task, owner {host, pid, rank}, expires
    failed: list[dict] = field(default_factory=list)  # failure records: task, error, traceback, worker, time

    @property
    def complete(self) -> bool:
        return self.done == self.total


def read_status(state_dir: str | Path, phases: list[list[TaskSpec]],
                is_done: Callable[[str], bool]) -> list[PhaseStatus]:
    """Per phase: done/total (from ``is_done``), tasks running now (live claims: ranks executor) and
    failed tasks that are still not done, with their error."""
    state_dir = Path(state_dir)
    live = live_claims(state_dir)
    statuses = []
    for phase in phases:
        status = PhaseStatus(done=0, total=len(phase))
        for task in phase:
            if is_done(task.id):
                status.done += 1
                continue
            if task.id in live:
                status.running.append(live[task.id])
            record = read_failure(state_dir, task.id)
            if record is not None:
                status.failed.append(record)
        statuses.append(status)
    return statuses
