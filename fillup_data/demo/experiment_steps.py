"""The steps the experiment drivers (``make experiment``, ``make compare``) share: one ``fillup-data``
command in this process, a training run that is skipped when finished and continued when a previous
launch was killed, and an evaluation.  Relaunching a driver therefore resumes it (builds resume by
themselves)."""

from __future__ import annotations

import json
from pathlib import Path


def run_cli(args: list) -> None:
    """``fillup-data ARGS`` in this process (one torch job at a time on a small machine)."""
    from fillup_data.cli import main

    rc = main([str(a) for a in args])
    if rc:
        raise SystemExit(f"fillup-data {' '.join(map(str, args[:2]))} failed with status {rc}")


def train_once(build: Path, train_config: Path, run_dir: Path, stage: str, overrides: list[str],
               init: Path | None = None) -> None:
    """Train ``run_dir`` unless it is finished; a folder with a run record is a killed run: continue it."""
    if (run_dir / "model.safetensors").is_file():
        return
    args = ["train", "--data", build, "--config", train_config, "--stage", stage, "--out", run_dir, "--device", "cpu"]
    for o in overrides:
        args += ["--set", o]
    if init is not None:
        args += ["--init", init]
    if (run_dir / "run.json").is_file():
        args.append("--resume")
    run_cli(args)


def evaluate(build: Path, run_dir: Path) -> dict:
    """``run_dir``'s metrics on the build's test split (evaluated again on every launch: it takes seconds,
    and metrics never outlive the weights or the code that scored them)."""
    run_cli(["eval", "--data", build, "--run", run_dir, "--device", "cpu"])
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
