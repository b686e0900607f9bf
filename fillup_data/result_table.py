"""What the result tables of the experiment drivers and ``fillup-data compare`` share: top-1 columns as
mean ± std over seeds, their Markdown cells, JSON without NaN, and the date/commit/command line."""

from __future__ import annotations

import statistics
from pathlib import Path

from fillup_data.schema.groups import GROUPS

# the tables' columns: overall accuracy, then the paper's groups
COLUMNS = ("overall", *GROUPS)


def top1(metrics: dict, column: str) -> float:
    """A column of a run's ``metrics.json``; NaN where a group has no class (JSON stores None)."""
    v = metrics.get(column)
    return float("nan") if v is None else float(v)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation of the finite values (a group with no classes is NaN in every
    run: its cell stays empty, never NaN)."""
    ok = [v for v in values if v == v]
    return {"mean": statistics.fmean(ok) if ok else None,
            "std": statistics.stdev(ok) if len(ok) > 1 else (0.0 if ok else None), "values": values}


def seed_row(runs_metrics: list[dict]) -> dict:
    """One table row: every column's mean ± std over the runs (seeds)."""
    return {c: mean_std([top1(m, c) for m in runs_metrics]) for c in COLUMNS}


def format_cell(cell: dict) -> str:
    return "–" if cell["mean"] is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def json_safe(obj):
    """``obj`` with every NaN replaced by None (JSON has no NaN)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def provenance(command: str) -> dict:
    """Date, commit and command of a result, so a table says where it came from."""
    import datetime
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        commit = head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "command": command}


def provenance_line(prov: dict) -> str:
    return f"{prov['date']}, commit {prov['commit']}, `{prov['command']}`."
