"""Progress that suits a terminal and a cluster job's log: no carriage-return frames in a log, a line per
stage every interval, one overall line for the build, nothing but warnings and the summary with --quiet,
and a log file per rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fillup_data import progress
from tests.helpers import split_file_recipe, write_split_file_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    root = tmp_path / "data"
    write_split_file_dataset(root, [6, 4, 3], test_per_class=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(split_file_recipe(root, shards={"max_samples": 4})))
    return path


def _cli(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "FILLUP_CACHE": str(tmp_path / "cache"), **env}
    full.pop(progress.ENV_MODE, None)
    # stdout and stderr are pipes, as in a cluster job: not a terminal
    return subprocess.run([sys.executable, "-m", "fillup_data.cli", *args], capture_output=True, text=True,
                          env=full, timeout=300)


def test_a_build_into_a_log_writes_lines_not_frames(recipe_file, tmp_path):
    run = _cli(["build", str(recipe_file), "--out", str(tmp_path / "out"), "--workers", "1"], tmp_path,
               FILLUP_PROGRESS_INTERVAL="0")
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr  # tqdm's frames are what made gigabytes of log
    lines = run.stderr.splitlines()
    assert lines and all(line.startswith("[20") for line in lines), lines[:5]  # time-stamped lines only
    assert any("index train:" in line and "img/s" in line for line in lines), lines
    assert any("real shards:" in line and "done in" in line for line in lines), lines
    assert "build finished" in run.stdout and "[1/6] index" in run.stdout


def test_at_the_default_interval_a_short_build_writes_almost_nothing(recipe_file, tmp_path):
    run = _cli(["build", str(recipe_file), "--out", str(tmp_path / "out"), "--workers", "1"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(run.stderr.splitlines()) <= 2, run.stderr


def test_quiet_leaves_warnings_and_the_summary(recipe_file, tmp_path):
    out = tmp_path / "out"
    run = _cli(["build", str(recipe_file), "--out", str(out), "--workers", "1", "--quiet"], tmp_path,
               FILLUP_PROGRESS_INTERVAL="0")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.startswith("build finished"), run.stdout  # the summary, no information lines
    for command in (["status", str(out)], ["inspect", str(out)], ["plan", str(recipe_file)]):
        run = _cli([*command, "--quiet"], tmp_path, FILLUP_PROGRESS_INTERVAL="0")
        assert run.returncode == 0 and run.stderr == "", (command, run.stderr)


def test_every_command_takes_quiet():
    from fillup_data.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name, p in sub.choices.items() if "--quiet" not in p._option_string_actions]
    assert not missing


def test_rank_builds_keep_a_log_per_rank_with_the_overall_line(recipe_file, tmp_path):
    out = tmp_path / "out"
    # rank 0 of 2 alone: it does its share, then takes over the tasks nobody claimed
    run = _cli(["build", str(recipe_file), "--out", str(out), "--rank", "0", "--world-size", "2", "--quiet",
                "--lease-seconds", "5", "--poll-seconds", "0.2"],
               tmp_path, FILLUP_PROGRESS_INTERVAL="0")
    assert run.returncode == 0, run.stderr
    log = (out / ".fillup" / "logs" / "rank-00000.log").read_text()
    assert "[1/6] index" in log or "index" in log
    assert "build out: phase A" in log, log  # the overall line, read from the build folder
    assert run.stderr == ""  # --quiet: the console stays quiet, the rank's log file still has the lines


def test_lines_mode_bar_reports_rate_eta_and_end(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_MODE, "lines")
    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    with progress.progress_bar(10, "stage", "img") as bar:
        bar.set_postfix_str("classes 1/2 done")
        bar.update(4)
    err = capsys.readouterr().err.splitlines()
    assert "stage: 4/10 img (40%)" in err[0] and "ETA" in err[0] and "classes 1/2 done" in err[0]
    assert "done in" in err[-1]
    monkeypatch.setenv(progress.ENV_INTERVAL, "3600")
    with progress.progress_bar(10, "short", "img") as bar:  # a stage shorter than a tick stays silent
        bar.update(10)
    monkeypatch.setenv(progress.ENV_MODE, "off")
    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    with progress.progress_bar(10, "quiet", "img") as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_lines_mode_scales_byte_counts_as_the_bar_does(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_MODE, "lines")
    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    with progress.progress_bar(1_962_354_769, "upload", "B", unit_scale=True) as bar:
        bar.update(1_829_817_878)
    line = capsys.readouterr().err.splitlines()[0]
    assert "upload: 1.83 G/1.96 G B (93%)" in line and " B/s" in line and "1,829" not in line, line
    assert [progress._si(v) for v in (0, 999, 1000, 12_345, 2.5e9)] == ["0", "999", "1 k", "12.3 k", "2.5 G"]


def test_outside_a_terminal_the_libraries_bars_are_off(monkeypatch):
    import diffusers
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    monkeypatch.delenv(progress.ENV_MODE, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    enable_progress_bars()
    diffusers.utils.logging.enable_progress_bar()
    previous = progress.configure()
    try:
        assert progress.mode() == "lines"
        assert are_progress_bars_disabled() and not diffusers.utils.logging.is_progress_bar_enabled()
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"  # inherited by workers, read by datasets
    finally:
        progress.restore(previous)
        enable_progress_bars()
        diffusers.utils.logging.enable_progress_bar()
