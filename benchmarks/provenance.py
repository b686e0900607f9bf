"""What every benchmark records next to its numbers: the commit it ran (shared by the benchmark scripts)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(where: Path | None = None) -> str:
    """Short HEAD of the checkout holding ``where`` (default: this folder), marked when the tracked files
    differ from it; ``unknown`` outside a git checkout."""
    here = str(where or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (uncommitted changes)" if dirty else "")
