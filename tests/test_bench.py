"""``fillup-data bench --quick`` on CPU with the tiny model: rates written, then used by ``plan``."""

from __future__ import annotations

import json
import math

import yaml

from fillup_data.cli import main
from fillup_data.cost import bench_rates_path, this_device_kind
from fillup_data.recipe import parse_recipe

TINY = {
    "name": "bench-tiny",
    "source": {"kind": "demo", "num_classes": 10, "max_images": 20, "min_images": 5, "test_per_class": 0,
               "image_size": 16},
    "fill": {"policy": "fill_to", "target": 20},
    "generator": {"model": "builtin:tiny-sd", "resolution": 32, "num_inference_steps": 4, "batch_size": 2,
                  "guidance_scale": 2.0},
    "inversion": {"steps_per_image": 1, "min_steps": 10, "max_steps": 20, "checkpoint_every": 5,
                  "classes_per_pass": 2, "resolution": 32},
}


def test_bench_writes_rates_that_plan_then_uses(tmp_path, capsys, tiny_model_cache):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    recipe = parse_recipe(TINY)
    rates_path = bench_rates_path(recipe, this_device_kind())
    rates_path.unlink(missing_ok=True)

    assert main(["plan", str(path)]) == 0
    assert "do not apply" in capsys.readouterr().out  # tiny-sd: no shipped rates

    try:
        assert main(["bench", "--quick", str(path), "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "generation (eager, batch 2)" in out and "inversion (eager, 2 classes per pass" in out
        assert str(rates_path) in out
        rates = json.loads(rates_path.read_text())
        assert rates["model"] == "builtin:tiny-sd@main" and rates["device"] == this_device_kind()
        assert rates["settings"]["generator"]["guidance_scale"] == 2.0 and rates["fillup_version"]
        gen = rates["generation"]["eager"]
        assert gen["unet_row_step_s"] > 0 and math.isfinite(gen["decode_image_s"]) and gen["decode_image_s"] >= 0
        assert rates["generation"]["reference_batch_size"] == 2 and rates["generation"]["resolution"] == 32
        (width, rate), = rates["inversion"]["eager"]["class_steps_per_s"].items()
        assert width == "2" and rate > 0 and math.isfinite(rate)

        assert main(["plan", str(path), "--gpus", "2"]) == 0
        out = capsys.readouterr().out
        assert "rates: measured here by `fillup-data bench`" in out and "do not apply" not in out
        assert "on 2 workers like this machine: about" in out
    finally:
        rates_path.unlink(missing_ok=True)


# a subprocess running every row: ~10 s on the 2-core box (under 60 s, so not marked slow)
def test_gpu_benchmark_cpu_mode_writes_every_row(tmp_path, tiny_model_cache):
    """``benchmarks/gpu.py --cpu`` runs every row's code path on the tiny model (no timing asserted)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "results.md"
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu.py"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "## GPU benchmark (CPU smoke run)" in text and "- device: CPU" in text and "- commit: " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| row ")]
    names = ["plain diffusers", "ours, eager", "inversion, 1 class per pass", "inversion, auto (",
             "ours, defaults", "inversion, auto + compile auto", "shard writing alone", "build end to end"]
    assert [next(n for n in names if row[2:].startswith(n)) for row in rows] == names
    for row in rows:
        rate = float(row.split("|")[2].split()[0])
        assert math.isfinite(rate) and rate > 0, row


def test_bench_of_a_recipe_without_a_model_is_refused(tmp_path, capsys):
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump({**TINY, "generator": {**TINY["generator"], "strategy": "none"}}))
    assert main(["bench", "--quick", str(path)]) == 2
    assert "generator.strategy is none" in capsys.readouterr().err
