"""Every command at a real class count, so that work growing faster than the data fails CI.

1,000 classes of 2-4 tiny images (ImageNet-LT's class count), and the same at 500: a strategy-less build,
plan (first and again), status and inspect, each counted in Python line events inside fillup_data, which
is deterministic where a clock is not. Doubling the classes and images must about double the count:
a loop over classes that scans every image (the kind that took hours at iNaturalist's size) makes it grow
about fourfold. The full-size measurement is benchmarks/rehearsal.py (benchmarks/REHEARSAL.md).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from PIL import Image

import fillup_data
from fillup_data.cli import main
from tests.helpers import split_file_recipe

PACKAGE = str(Path(fillup_data.__file__).resolve().parent)
REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("plan", "plan-again", "build", "status", "inspect")


def write_source(root: Path, classes: int) -> int:
    """ImageNet-LT layout: 2-4 training images a class and one test image, 8-px JPEGs. Returns the image count."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    data, train, test = buf.getvalue(), [], []
    for c in range(classes):
        folder = root / "train" / f"{c:05d}"
        folder.mkdir(parents=True)
        for i in range(2 + c % 3):
            (folder / f"{i}.jpg").write_bytes(data)
            train.append(f"train/{c:05d}/{i}.jpg {c}\n")
        (folder / "test.jpg").write_bytes(data)
        test.append(f"train/{c:05d}/test.jpg {c}\n")
    (root / "train.txt").write_text("".join(train))
    (root / "test.txt").write_text("".join(test))
    (root / "classes.txt").write_text("".join(f"class {c}\n" for c in range(classes)))
    return len(train) + len(test)


class LineCounter:
    """Line events executed in fillup_data's own code (other code is not traced at all)."""

    def __init__(self):
        self.count = 0

    def _local(self, frame, event, arg):
        self.count += 1
        return self._local

    def _global(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        self.count += 1
        return self._local

    def __enter__(self):
        self.count = 0
        sys.settrace(self._global)
        threading.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        threading.settrace(None)


def run_commands(tmp_path: Path, classes: int, monkeypatch) -> tuple[dict[str, int], dict[str, int], int]:
    import fillup_data.sources.base as base

    root, out = tmp_path / f"src{classes}", tmp_path / f"out{classes}"
    images = write_source(root, classes)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(split_file_recipe(root, shards={"max_samples": 1000})))
    monkeypatch.setenv("FILLUP_CACHE", str(tmp_path / f"cache{classes}"))
    decoded = {"n": 0}
    real_decode = base.decode_image_bytes

    def counting_decode(*a, **k):
        decoded["n"] += 1
        return real_decode(*a, **k)

    monkeypatch.setattr(base, "decode_image_bytes", counting_decode)
    argv = {"plan": ["plan", str(recipe), "--workers", "1"], "plan-again": ["plan", str(recipe), "--workers", "1"],
            "build": ["build", str(recipe), "--out", str(out), "--workers", "1"], "status": ["status", str(out)],
            "inspect": ["inspect", str(out)]}
    events, decodes = {}, {}
    counter = LineCounter()
    for name in COMMANDS:
        decoded["n"] = 0
        with counter:
            assert main([*argv[name], "--quiet"]) == 0, name
        events[name], decodes[name] = counter.count, decoded["n"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["classes"]) == classes and sum(s["num_samples"] for s in manifest["shards"]) == images
    return events, decodes, images


@pytest.mark.slow
def test_every_command_grows_linearly_with_classes_and_images(tmp_path, monkeypatch):
    small, _, small_images = run_commands(tmp_path, 500, monkeypatch)
    large, decodes, images = run_commands(tmp_path, 1000, monkeypatch)
    assert abs(images - 2 * small_images) <= 2
    growth = {name: large[name] / small[name] for name in COMMANDS}
    print("line events at 500 / 1,000 classes:", {n: (small[n], large[n]) for n in COMMANDS})
    # linear work doubles (fixed costs bring it a little under 2); a loop over classes x images, ~4x
    assert all(g < 2.4 for g in growth.values()), growth
    # plan decodes every image once; the second plan and the build reuse the kept index
    assert decodes["plan"] == images and decodes["plan-again"] == 0
    assert decodes["build"] == images  # the real shards read each image once to write it; none decoded twice


def test_status_inspect_and_plan_import_no_torch(tmp_path):
    """Half a gigabyte each: status, inspect and plan stay well under 1.5 GB at iNaturalist's size without it."""
    root, out = tmp_path / "src", tmp_path / "out"
    write_source(root, 30)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(split_file_recipe(root)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "FILLUP_CACHE": str(tmp_path / "cache")}
    assert main(["build", str(recipe), "--out", str(out), "--quiet"]) == 0
    code = ("import sys; from fillup_data.cli import main; rc = main(sys.argv[1:]); "
            "sys.exit(rc if rc else (3 if 'torch' in sys.modules else 0))")
    for command in (["status", str(out)], ["inspect", str(out)], ["plan", str(recipe)]):
        run = subprocess.run([sys.executable, "-c", code, *command, "--quiet"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, (command, run.returncode, run.stderr)
