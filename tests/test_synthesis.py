"""Issue 3 end to end: a demo build with Textual Inversion on the tiny pipeline, then the
datasets client, regeneration from metadata, and a build killed twice that resumes to the same bytes."""

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import fillup_data.inversion as inversion
import fillup_data.synthesis as synthesis
from fillup_data.build import run_build
from fillup_data.errors import FillupError
from fillup_data.recipe import load_recipe

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
# The demo recipe, shrunk so that a build takes seconds: same code paths, fewer images and steps.
# The tiny random pipeline stands in for toyworld: same code paths, seconds instead of minutes.
MINI = ["source.max_images=30", "fill.target=30", "inversion.min_steps=10", "inversion.max_steps=20",
        "inversion.checkpoint_every=5", "generator.num_inference_steps=4", "generator.batch_size=8",
        "shards.max_samples=60", "generator.model=builtin:tiny-sd", "generator.guidance_scale=1.0"]
QUIET = dict(workers=1, progress=False, log=lambda *_: None)


def mini(*extra):
    return load_recipe(DEMO, MINI + list(extra))


@pytest.fixture(scope="module")
def ti_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "out"
    run_build(mini(), out, **QUIET)
    return out


def manifest_of(out):
    return json.loads((out / "manifest.json").read_text())


def test_every_class_filled_and_metadata(ti_build):
    import datasets

    manifest = manifest_of(ti_build)
    ds = datasets.load_dataset(str(ti_build), split="train")
    counts = Counter(ds["cls"])
    assert all(counts[c] == 30 for c in range(10))
    syn = [j for j in ds["json"] if j["is_synthetic"]]
    assert len(syn) == manifest["splits"]["train"]["synthetic"] > 0
    for j in syn:
        assert j["strategy"] == "textual_inversion" and j["prompt"] == f"a photo of a <fillup-{j['label']:05d}>"
        assert j["seed"] >= 0 and j["guidance_scale"] == 1.0 and j["num_inference_steps"] == 4
        assert j["model"] == "builtin:tiny-sd" and j["source_path"] == ""
    for c in manifest["classes"]:
        used = Counter(j["token_step"] for j in syn if j["label"] == c["index"])
        if c["synthetic"]:
            assert set(used) <= set(c["token_steps"]) and max(used.values()) - min(used.values()) <= 1
            assert (ti_build / "tokens" / f"{c['index']:05d}.safetensors").is_file()
    assert {t["path"] for t in manifest["tokens"]} == {
        f"tokens/{sub}{c['index']:05d}.safetensors" for c in manifest["classes"] if c["synthetic"]
        for sub in ("", "diffusers/")}
    # the diffusers export is the last checkpoint, loadable by load_textual_inversion as it is
    from safetensors.torch import load_file

    from fillup_data.inversion import read_token_file

    token = read_token_file(ti_build / "tokens" / "00009.safetensors")
    exported = load_file(ti_build / "tokens" / "diffusers" / "00009.safetensors")
    assert list(exported) == ["<fillup-00009>"]
    assert exported["<fillup-00009>"].equal(token.vectors(token.checkpoint_steps[-1]))


def test_regenerate_three_samples_from_metadata_alone(ti_build):
    import pyarrow.parquet as pq
    from PIL import Image

    from fillup_data.recipe import ShardsConfig
    from fillup_data.schema.sample import METADATA_KEYS
    from fillup_data.shards.writer import encode_image

    rows = [r for r in pq.read_table(ti_build / "index.parquet").to_pylist() if r["is_synthetic"]]
    picked = [rows[0], rows[len(rows) // 2], rows[-1]]
    cfg = ShardsConfig(**manifest_of(ti_build)["recipe"]["shards"])
    for row in picked:
        meta = {k: row[k] for k in METADATA_KEYS}
        image = synthesis.regenerate(ti_build, meta)
        with open(ti_build / row["shard"], "rb") as f:
            f.seek(row["image_offset"])
            stored = f.read(row["image_size"])
        assert encode_image(image, cfg) == stored  # same pixels -> same encoder bytes
        assert image.size == Image.open(io.BytesIO(stored)).size


def records_of(out):
    """The completion records a relaunch would trust (readable, tar of the recorded size)."""
    from fillup_data.build import read_progress

    plan = json.loads((out / ".fillup" / "plan.json").read_text())
    done = {p for p in plan["shards"] if (out / ".fillup" / "shards" / f"{Path(p).stem}.json").is_file()}
    assert len(done) == read_progress(out).shards_done  # nothing half-recorded
    return done


def assert_same_bytes(a, b):
    ma, mb = manifest_of(a), manifest_of(b)
    assert [(s["path"], s["sha256"]) for s in ma["shards"]] == [(s["path"], s["sha256"]) for s in mb["shards"]]
    assert [(t["path"], t["sha256"]) for t in ma["tokens"]] == [(t["path"], t["sha256"]) for t in mb["tokens"]]
    assert (a / "index.parquet").read_bytes() == (b / "index.parquet").read_bytes()


def test_killed_twice_resumes_to_identical_bytes(ti_build, tmp_path, monkeypatch, capsys):
    from fillup_data.cli import main
    from fillup_data.shards.writer import ShardWriter

    out = tmp_path / "out"
    real_invert = inversion.invert_classes

    def crash_in_class_3(pipe, jobs, **kw):
        def cb(class_index, step, loss):
            if class_index == 3 and step == 7:
                raise KeyboardInterrupt("killed mid-class")
        return real_invert(pipe, jobs, **{**kw, "step_callback": cb})

    monkeypatch.setattr(inversion, "invert_classes", crash_in_class_3)
    with pytest.raises(KeyboardInterrupt):
        run_build(mini(), out, **QUIET)
    assert (out / "tokens" / "00003.partial.safetensors").is_file()
    # 7 real shards done; the 9 classes are one task of 9 slots (demo.yaml's classes_per_pass), none finished
    assert main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"{out}: in progress; shards 7/10 done; tokens 0/9 done",
                         "phase A (real shards + inversion groups): 7/8 tasks done"]
    assert re.fullmatch(r"phase B \(synthetic shards\): 0/3 tasks done, 0/\d+ images", lines[2]) and len(lines) == 3
    monkeypatch.setattr(inversion, "invert_classes", real_invert)

    partial = []

    class KilledMidShard(ShardWriter):
        """Killed while streaming the second synthetic shard, after 5 of its samples were written."""

        def write(self, key, *a, **kw):
            super().write(key, *a, **kw)
            if self.path.name == "train-synthetic-00001.tar" and len(self.records) == 5:
                partial.append(self.tmp.stat().st_size)
                raise KeyboardInterrupt("killed mid-shard")

    monkeypatch.setattr(synthesis, "ShardWriter", KilledMidShard)
    with pytest.raises(KeyboardInterrupt):
        run_build(mini(), out, **QUIET)
    assert partial and partial[0] > 5 * 3 * 512  # a real partial temp file: 5 samples of 3 members
    assert not list((out / "data").glob("*.tmp"))  # the writer removed it on the way out
    done = records_of(out)
    assert len(done) == 8 and "data/train-synthetic-00000.tar" in done  # 7 real + the first synthetic
    assert main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"{out}: in progress; shards 8/10 done; tokens 9/9 done",
                         "phase A (real shards + inversion groups): 8/8 tasks done"]
    assert re.fullmatch(r"phase B \(synthetic shards\): 1/3 tasks done, \d+/\d+ images", lines[2])
    monkeypatch.setattr(synthesis, "ShardWriter", ShardWriter)
    summary = run_build(mini(), out, **QUIET)
    assert (summary.shards_reused, summary.shards_written, summary.tokens_trained) == (8, 2, 0)
    assert_same_bytes(ti_build, out)
    assert not list((out / "tokens").glob("*.partial.*"))


def test_status_after_some_classes_are_inverted(tmp_path, monkeypatch, capsys):
    from fillup_data.cli import main

    real_invert = inversion.invert_classes

    def crash_in_class_3(pipe, jobs, **kw):
        def cb(class_index, step, loss):
            if class_index == 3 and step == 7:  # after its checkpoint at step 5: a partial token file
                raise KeyboardInterrupt("killed in class 3")
        return real_invert(pipe, jobs, **{**kw, "step_callback": cb})

    monkeypatch.setattr(inversion, "invert_classes", crash_in_class_3)
    out = tmp_path / "out"
    # one class per task (and per pass): classes 1 and 2 finish before class 3 is killed (class 0 needs no token)
    recipe = mini("inversion.classes_per_task=1", "inversion.classes_per_pass=1", "inversion.min_steps=10", "inversion.max_steps=10")
    with pytest.raises(KeyboardInterrupt):
        run_build(recipe, out, **QUIET)
    assert sorted(p.name for p in (out / "tokens").glob("*.safetensors")) == [
        "00001.safetensors", "00002.safetensors", "00003.partial.safetensors"]
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [f"{out}: in progress; shards 7/10 done; tokens 2/9 done",
                                                        "phase A (real shards + inversion groups): 9/16 tasks done"]

    def broken(pipe, jobs, **kw):  # an application error: recorded with its traceback, the build stops
        raise RuntimeError(f"boom in class {jobs[0].class_index}")

    monkeypatch.setattr(inversion, "invert_classes", broken)
    # every task of the phase is tried (each group fails on its own), then the build stops before phase B
    with pytest.raises(FillupError, match=r"7 task\(s\) failed .*\n  invert/g00002: RuntimeError: boom in class 3\n"):
        run_build(recipe, out, **QUIET)
    record = json.loads((out / ".fillup" / "failed" / "invert+g00002.json").read_text())
    assert record["task"] == "invert/g00002" and "Traceback" in record["traceback"]
    assert main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "phase A (real shards + inversion groups): 9/16 tasks done"
    assert lines[2].startswith("  FAILED invert/g00002: RuntimeError: boom in class 3 (traceback in ")
    assert len([x for x in lines if x.startswith("  FAILED invert/")]) == 7
    assert not list((out / "data").glob("train-synthetic-*.tar"))  # phase B never started


def test_sigkill_mid_shard_then_relaunch_gives_identical_bytes(ti_build, tmp_path):
    """A real SIGKILL of a real CLI build while it streams a synthetic shard, then a relaunch."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import torch

    out = tmp_path / "out"
    shutil.copytree(ti_build, out)  # tokens learned: the relaunched build goes straight to generation
    for p in [*(out / "data").glob("train-synthetic-*"), *(out / ".fillup" / "shards").glob("train-synthetic-*"),
              out / "manifest.json"]:
        p.unlink()
    args = [sys.executable, "-m", "fillup_data.cli", "build", str(DEMO), "--out", str(out), "--quiet", "--workers", "1"]
    for o in MINI:
        args += ["--set", o]
    # the same thread count as this process: float sums, hence pixels, depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    data, records = out / "data", out / ".fillup" / "shards"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            # at least one synthetic shard recorded and the next one half written
            if list(records.glob("train-synthetic-*.json")) and list(data.glob("train-synthetic-*.tar.*.tmp")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert list(data.glob("train-synthetic-*.tar.*.tmp"))  # SIGKILL: nothing cleaned up behind it
    done = records_of(out)
    synthetic_done = {p for p in done if "synthetic" in p}
    assert 1 <= len(synthetic_done) <= 2
    summary = run_build(mini(), out, **QUIET)
    assert summary.shards_reused == len(done) and summary.shards_written == 10 - len(done)
    assert not list(data.glob("*.tmp"))  # the relaunch removed the dead build's partial shard
    assert_same_bytes(ti_build, out)


def test_single_template_strategy(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "st"
    run_build(mini("generator.strategy=single_template", "generator.prompt=a photo of a {class_name}"), out, **QUIET)
    rows = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["is_synthetic"]]
    assert rows and all(r["strategy"] == "single_template" and r["token_step"] == -1 for r in rows)
    assert all(r["prompt"] == f"a photo of a {r['class_name']}" for r in rows)
    assert not (out / "tokens").exists()


def stored_image(build, key):
    """The image a build stored for ``key``, read through index.parquet's byte offsets."""
    import pyarrow.parquet as pq
    from PIL import Image

    row = pq.read_table(build / "index.parquet", filters=[("key", "=", key)]).to_pylist()[0]
    with open(build / row["shard"], "rb") as f:
        f.seek(row["image_offset"])
        return Image.open(io.BytesIO(f.read(row["image_size"]))).convert("RGB"), row


def test_cli_preview_draws_the_chosen_classes(ti_build, tmp_path):
    import numpy as np
    from PIL import Image

    from fillup_data.cli import main
    from fillup_data.generation import SampleSpec, SyntheticGenerator
    from fillup_data.generation.preview import _thumb, grid_size, tile_box
    from fillup_data.models import load_pipeline_for
    from fillup_data.plan import sample_seed

    grid = tmp_path / "grid.png"
    args = ["preview", str(DEMO), "--classes", "purple square,1", "--n", "3", "--out", str(grid)]
    for o in MINI:
        args += ["--set", o]
    assert main(args) == 0
    tokens = tmp_path / "grid-tokens" / "tokens"
    assert sorted(p.name for p in tokens.glob("*.safetensors")) == ["00001.safetensors", "00009.safetensors"]
    assert main(["preview", str(DEMO), "--classes", "nonsense", "--n", "1", "--out", str(grid)]) == 2

    recipe, manifest = mini(), manifest_of(ti_build)
    pipe = load_pipeline_for(recipe.generator)
    names = [c["name"] for c in manifest["classes"]]
    generator = SyntheticGenerator(pipe, recipe.generator, names, {c: tokens / f"{c:05d}.safetensors" for c in (1, 9)})
    image = Image.open(grid).convert("RGB")
    assert image.size == grid_size(2, 3, 3)  # two rows of 3 real + 3 synthetic tiles, nothing more
    tiles = {}
    for row, c in enumerate([1, 9]):  # rows in class order
        steps = manifest["classes"][c]["token_steps"]
        for k in range(3):
            # real: the class's k-th image, as the build stored it (PNG: the very pixels)
            real, meta = stored_image(ti_build, f"train-real-{c:05d}-{k:06d}")
            assert meta["class_name"] == names[c]
            # synthetic: the class's k-th sample seed and checkpoint, with the preview's tokens
            (made,) = generator.generate([SampleSpec(c, sample_seed(recipe.seed, c, k), steps[k % len(steps)])])
            for synthetic, expected in ((False, real), (True, made.image)):
                tile = np.asarray(image.crop(tile_box(row, k, synthetic, 3)))
                assert np.array_equal(tile, np.asarray(_thumb(expected, 96))), (c, k, synthetic)
                tiles[c, k, synthetic] = tile.tobytes()
    assert len(set(tiles.values())) == len(tiles) == 12  # twelve different images, none drawn twice


def test_cli_regenerate_and_export_token(ti_build, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image
    from safetensors.torch import load_file

    from fillup_data.cli import main
    from fillup_data.inversion import read_token_file

    rows = [r for r in pq.read_table(ti_build / "index.parquet").to_pylist() if r["is_synthetic"]]
    for row in (rows[0], rows[-1]):
        out = tmp_path / f"{row['key']}.png"
        assert main(["regenerate", str(ti_build), "--key", row["key"], "--image", str(out)]) == 0
        stored, _ = stored_image(ti_build, row["key"])  # the demo stores PNG: lossless, so pixel for pixel
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(stored))
    assert main(["regenerate", str(ti_build), "--key", "no-such-key", "--image", str(tmp_path / "x.png")]) == 2

    token = read_token_file(ti_build / "tokens" / "00009.safetensors")
    assert main(["export-token", str(ti_build / "tokens" / "00009.safetensors"), "--out", str(tmp_path / "t.safetensors")]) == 0
    exported = load_file(tmp_path / "t.safetensors")
    (name, vec), = exported.items()
    assert name == "<fillup-00009>" and vec.equal(token.vectors(token.checkpoint_steps[-1]))
