"""Failure records in the build folder: ``state_dir/failed/<task>.json``.

A worker writes one when its task raises, so ``fillup-data status`` can show the error while the build
runs on any executor and after the driver is gone; the task's next successful run removes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from fillup_data.state import write_json_atomic


def task_file_name(task_id: str) -> str:
    """``real/train-real-00003`` -> ``real+train-real-00003`` ('+' is not allowed in task ids)."""
    return task_id.replace("/", "+")


def failure_path(state_dir: Path, task_id: str) -> Path:
    return Path(state_dir) / "failed" / f"{task_file_name(task_id)}.json"


def write_failure(state_dir: Path, task_id: str, *, error: str, traceback_text: str, worker: str) -> None:
    path = failure_path(state_dir, task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"task": task_id, "error": error, "traceback": traceback_text,
                             "worker": f"{worker} (host {socket.gethostname()}, pid {os.getpid()})",
                             "time": time.time()})


def clear_failure(state_dir: Path, task_id: str) -> None:
    failure_path(state_dir, task_id).unlink(missing_ok=True)


def read_failure(state_dir: Path, task_id: str) -> dict | None:
    """The task's failure record, or None; a record cut short by a crash reads as None."""
    try:
        return json.loads(failure_path(state_dir, task_id).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
