"""End-to-end builds with the real datasets / webdataset clients (strategy none: no model)."""

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fillup_data.build import run_build
from fillup_data.cli import main
from fillup_data.errors import FillupError
from fillup_data.recipe import load_recipe, parse_recipe
from tests.helpers import split_file_recipe, write_split_file_dataset

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"


def demo_real(**kw):
    return load_recipe(DEMO, ["generator.strategy=none", *kw.get("extra", [])])


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    summary = run_build(demo_real(), out, workers=1, progress=False, log=lambda *_: None)
    return out, summary


def test_demo_build_loads_with_datasets(demo_build):
    import datasets

    out, summary = demo_build
    manifest = json.loads((out / "manifest.json").read_text())
    for k in ("name", "version", "fingerprint", "recipe", "classes", "shards"):
        assert k in manifest
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "test"}
    feats = ds["train"].features
    assert isinstance(feats["cls"], datasets.ClassLabel)
    assert feats["cls"].names == [c["name"] for c in manifest["classes"]] and feats["cls"].names[0] == "red circle"
    assert isinstance(feats["png"], datasets.Image)
    keys = {"label", "class_name", "is_synthetic", "strategy", "prompt", "seed", "token_step", "guidance_scale",
            "num_inference_steps", "model", "source_path", "source_key"}
    assert set(feats["json"]) == keys
    rows = ds["train"].select_columns(["cls", "json", "__key__"])
    assert all(v is not None for r in rows for v in r["json"].values())
    assert all("." not in r["__key__"] for r in rows)
    # per-class counts equal the plan
    got = Counter(rows["cls"])
    assert [got[c["index"]] for c in manifest["classes"]] == [c["real"] for c in manifest["classes"]]
    plan = json.loads((out / ".fillup" / "plan.json").read_text())
    assert [c["real"] for c in plan["classes"]] == [c["real"] for c in manifest["classes"]]
    assert Counter(ds["test"]["cls"]) == {c: 20 for c in range(10)}
    real = datasets.load_dataset(str(out), "real")
    assert isinstance(real["train"].features["cls"], datasets.ClassLabel)
    assert ds["train"][0]["png"].size == (32, 32)


def test_webdataset_iterates_every_shard(demo_build):
    import webdataset as wds

    out, _ = demo_build
    manifest = json.loads((out / "manifest.json").read_text())
    for s in manifest["shards"]:
        n = 0
        for sample in wds.WebDataset(str(out / s["path"]), shardshuffle=False).decode("pil"):
            assert {"png", "cls", "json"} <= set(sample)
            assert int(sample["cls"]) == sample["json"]["label"]
            n += 1
        assert n == s["num_samples"]


def test_index_parquet_points_into_tars(demo_build):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    out, _ = demo_build
    table = pq.read_table(out / "index.parquet").to_pylist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(table) == sum(s["num_samples"] for s in manifest["shards"])
    for row in table[::37]:
        with open(out / row["shard"], "rb") as f:
            f.seek(row["image_offset"])
            img = Image.open(io.BytesIO(f.read(row["image_size"])))
        assert img.size == (32, 32)
        assert row["source_path"].startswith(f"demo/{row['split']}/{row['label']:03d}/")


def test_two_builds_identical_bytes(demo_build, tmp_path):
    out, _ = demo_build
    run_build(demo_real(), tmp_path / "again", workers=2, progress=False, log=lambda *_: None)
    a = json.loads((out / "manifest.json").read_text())["shards"]
    b = json.loads((tmp_path / "again" / "manifest.json").read_text())["shards"]
    assert [(s["path"], s["sha256"]) for s in a] == [(s["path"], s["sha256"]) for s in b]
    assert (out / "index.parquet").read_bytes() == (tmp_path / "again" / "index.parquet").read_bytes()


def test_resume_redoes_only_missing_and_refuses_other_recipe(tmp_path):
    out = tmp_path / "out"
    recipe = demo_real(extra=["shards.max_samples=100"])
    first = run_build(recipe, out, workers=1, progress=False, log=lambda *_: None)
    shas = {s["path"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    # simulate a crash: one shard's completion record gone, another shard half-written
    records = sorted((out / ".fillup" / "shards").glob("*.json"))
    records[0].unlink()
    victim = out / json.loads(records[1].read_text())["path"]
    victim.write_bytes(victim.read_bytes()[:1000])
    again = run_build(recipe, out, workers=1, progress=False, log=lambda *_: None)
    assert again.shards_written == 2 and again.shards_reused == first.shards - 2
    assert {s["path"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]} == shas
    with pytest.raises(FillupError, match="different recipe"):
        run_build(demo_real(extra=["seed=5"]), out, workers=1, progress=False, log=lambda *_: None)


def test_imagenet_lt_format_with_broken_files(tmp_path):
    import datasets

    root = tmp_path / "data"
    write_split_file_dataset(root, [12, 6, 3], test_per_class=2)
    (root / "train" / "n00000000" / "img_0.jpg").unlink()                                  # missing
    (root / "train" / "n00000000" / "img_1.jpg").write_bytes(b"")                          # empty
    p = root / "train" / "n00000001" / "img_0.jpg"
    p.write_bytes(p.read_bytes()[:200])                                                    # truncated
    (root / "train" / "n00000002" / "img_2.jpg").write_bytes(b"GIF89a garbage")           # undecodable
    out = tmp_path / "out"
    summary = run_build(parse_recipe(split_file_recipe(root)), out, workers=2, progress=False, log=lambda *_: None)
    assert summary.skipped == {"empty": 1, "missing": 1, "truncated": 1, "undecodable": 1}
    report = json.loads((out / "report.json").read_text())
    assert {(s["source_path"], s["reason"]) for s in report["skipped"]} == {
        ("train/n00000000/img_0.jpg", "missing"), ("train/n00000000/img_1.jpg", "empty"),
        ("train/n00000001/img_0.jpg", "truncated"), ("train/n00000002/img_2.jpg", "undecodable")}
    assert all(s["where"].endswith(("train.txt:1", "train.txt:2", "train.txt:13", "train.txt:21")) for s in report["skipped"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["real"] for c in manifest["classes"]] == [10, 5, 2]
    ds = datasets.load_dataset(str(out), "real")
    assert len(ds["train"]) == 17 and len(ds["test"]) == 6
    assert max(s["num_samples"] for s in manifest["shards"]) <= 7
    paths = set(ds["train"]["json"][i]["source_path"] for i in range(17))
    assert "train/n00000002/img_0.jpg" in paths and "train/n00000002/img_2.jpg" not in paths


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fillup_data.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_bad_line_stops_with_file_line_no_traceback(tmp_path):
    root = tmp_path / "data"
    write_split_file_dataset(root, [3, 2])
    with open(root / "train.txt", "a") as f:
        f.write("train/n00000000/img_0.jpg one\n")
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(split_file_recipe(root)))
    res = run_cli("build", tmp_path / "r.yaml", "--out", tmp_path / "out")
    assert res.returncode == 2
    assert "train.txt:6: label 'one' is not an integer" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "data").exists()  # stopped before any work


def test_cli_validate_plan_build_inspect(tmp_path, capsys):
    assert main(["validate", str(DEMO)]) == 0
    assert "fingerprint" in capsys.readouterr().out
    assert main(["plan", str(DEMO)]) == 0
    text = capsys.readouterr().out
    assert "many" in text and "few" in text and "images to generate: 1,038" in text
    out = tmp_path / "o"
    assert main(["build", str(DEMO), "--set", "generator.strategy=none", "--out", str(out), "--quiet"]) == 0
    assert "build finished" in capsys.readouterr().out
    assert main(["status", str(out)]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "all sha256 and sample counts match" in capsys.readouterr().out
    tar = out / "data" / "train-real-00000.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["inspect", str(out)]) == 1
    assert "SHA256   data/train-real-00000.tar" in capsys.readouterr().out
    assert main(["validate", str(DEMO), "--set", "fill.policy=sometimes"]) == 2
    assert "fill.policy" in capsys.readouterr().err


def test_card_parses_and_links_figures(demo_build):
    from huggingface_hub import DatasetCard
    from PIL import Image

    out, _ = demo_build
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["task_categories"] == ["image-classification"]
    assert {c["config_name"] for c in data["configs"]} == {"default", "real"}
    assert {c["config_name"] for c in data["dataset_info"]} == {"default", "real"}
    for rel in ("assets/class_distribution.png", "assets/samples.png"):
        assert f"]({rel})" in card.text
        assert Image.open(out / rel).format == "PNG"


# --------------------------------------------------------------------------- --force, lock, records (issue 10)
QUIET = dict(workers=1, progress=False, log=lambda *_: None)


def mini_lt(tmp_path, **over):
    """A three-class ImageNet-LT-style source (21 train images: 3 shards of 7, 1 test shard) and its
    recipe, as a YAML file a user would pass to the CLI."""
    import yaml

    root = tmp_path / "data"
    if not root.is_dir():
        write_split_file_dataset(root, [12, 6, 3], test_per_class=2)
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(split_file_recipe(root, **over)))
    return path


def shas(out):
    return {s["path"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]}


def test_force_deletes_only_the_build_files_and_says_what_it_left(tmp_path, capsys):
    out = tmp_path / "out"
    first, other = mini_lt(tmp_path), mini_lt(tmp_path, seed=3)
    assert main(["build", str(first), "--out", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")  # a user's file beside the build
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine too")
    (out / "quality").mkdir()  # a quality report of the old build (fillup-data quality) goes with it
    (out / "quality" / "README.md").write_text("report of the old build")
    (out / "prompts").mkdir()  # prompts a language model or captioner made for the old build go too
    (out / "prompts" / "00000.json").write_text("{}")
    assert main(["build", str(other), "--out", str(out), "--quiet"]) == 2
    assert "different recipe" in capsys.readouterr().err and (out / "notes.txt").is_file()
    assert main(["build", str(other), "--out", str(out), "--quiet", "--force"]) == 0
    text = capsys.readouterr().err  # a warning: shown even with --quiet
    assert "left 2 other entries" in text and "notes.txt" in text and "runs" in text
    assert (out / "notes.txt").read_text() == "mine" and (out / "runs" / "log.txt").read_text() == "mine too"
    assert not (out / "quality").exists() and not (out / "prompts").exists()
    record = json.loads((out / ".fillup" / "build.json").read_text())
    assert record["recipe"]["seed"] == 3 and main(["inspect", str(out)]) == 0


def test_force_refuses_a_folder_that_is_not_a_build(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    assert main(["build", str(mini_lt(tmp_path)), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: exists" in err and "not a fillup-data build" in err and "Traceback" not in err
    assert (out / "holiday.jpg").read_bytes() == b"precious" and not (out / ".fillup").exists()


@pytest.mark.parametrize("where", ["home", "cwd", "recipe", "source.root"])
def test_force_refuses_to_clear_a_folder_it_must_not(tmp_path, monkeypatch, capsys, where):
    """Each folder holds an earlier build of another recipe, so only the guard stops the deletion."""
    target = tmp_path / "target"
    assert main(["build", str(mini_lt(tmp_path)), "--out", str(target), "--quiet"]) == 0
    (target / "precious.txt").write_text("keep")
    recipe = mini_lt(tmp_path, seed=7)
    if where == "home":
        monkeypatch.setenv("HOME", str(target))
        reason = "it is your home folder"
    elif where == "cwd":
        monkeypatch.chdir(target)
        reason = "it is the current folder"
    elif where == "recipe":
        recipe = recipe.rename(target / "recipe.yaml")
        reason = "it contains the recipe"
    else:
        import shutil

        shutil.copytree(tmp_path / "data", target / "images")
        recipe = mini_lt(tmp_path, seed=7, source={**split_file_recipe(target / "images")["source"]})
        reason = "it contains the source.root"
    assert main(["build", str(recipe), "--out", str(target), "--quiet", "--force"]) == 2
    err = capsys.readouterr().err
    assert f"--out {target}: refusing --force, {reason}" in err and "Traceback" not in err
    assert (target / "precious.txt").is_file() and (target / "manifest.json").is_file() and main(["inspect", str(target)]) == 0


def test_force_refuses_the_filesystem_root(tmp_path, capsys):
    assert main(["build", str(mini_lt(tmp_path)), "--out", "/", "--force"]) == 2
    assert "--out /: refusing --force, it is the filesystem root" in capsys.readouterr().err


def _start(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)


def _wait_for_lock(out, pid, deadline_s=60.0):
    import time

    lock = out / ".fillup" / "lock"
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if lock.is_file() and f'"pid": {pid},' in lock.read_text():
            return
        time.sleep(0.002)
    raise AssertionError(f"pid {pid} never took {lock}")


def test_second_build_is_refused_while_one_runs_and_a_sigkill_frees_the_folder(tmp_path):
    import signal
    import socket

    # a real CLI build with synthetic images to make (seconds of work after it takes the lock), frozen
    # with SIGSTOP as soon as it holds the folder: a build hung on a slow filesystem, deterministically
    recipe = mini_lt(tmp_path, generator={"strategy": "single_template", "model": "builtin:tiny-sd",
                                          "prompt": "a photo of a {class_name}", "guidance_scale": 1.0,
                                          "num_inference_steps": 2, "resolution": 32})
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "fillup_data.cli", "build", str(recipe), "--out", str(out),
                              "--quiet", "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_lock(out, first.pid)
        first.send_signal(signal.SIGSTOP)
        assert not (out / "manifest.json").exists()  # frozen mid-build, holding the lock
        second = subprocess.run([sys.executable, "-m", "fillup_data.cli", "build", str(recipe), "--out", str(out),
                                 "--quiet"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"another build (pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert first.poll() is None  # the first build was not disturbed
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    again = run_cli("build", recipe, "--out", out, "--quiet")  # the kernel dropped the dead build's lock
    assert again.returncode == 0, again.stderr


def test_workers_forked_by_a_build_do_not_keep_its_lock(tmp_path):
    """A real-shard worker orphaned by a SIGKILLed build lingers; it must not hold the folder."""
    import signal

    from fillup_data.state import BuildLock

    code = (
        "import sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from pathlib import Path\n"
        "from fillup_data.state import BuildLock\n"
        "lock = BuildLock.acquire(Path(sys.argv[1]))\n"
        "pool = ProcessPoolExecutor(1)\n"
        "pool.submit(time.sleep, 0).result()\n"
        "print(list(pool._processes)[0], flush=True)\n"
        "time.sleep(60)\n"
    )
    builder = _start(code, tmp_path / ".fillup")
    worker = None
    try:
        worker = int(builder.stdout.readline())
        builder.send_signal(signal.SIGKILL)
        builder.wait(timeout=30)
        os.kill(worker, 0)  # the orphaned worker still lives...
        BuildLock.acquire(tmp_path / ".fillup").release()  # ...and the folder is free
    finally:
        if builder.poll() is None:
            builder.kill()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_concurrent_shard_writers_never_share_a_temporary_file(tmp_path):
    import tarfile

    from fillup_data.schema.sample import real_metadata
    from fillup_data.shards.writer import ShardWriter

    path = tmp_path / "data" / "train-real-00000.tar"
    a, b = ShardWriter(path, "png"), ShardWriter(path, "png")  # two builds writing one shard
    assert a.tmp != b.tmp and f".{os.getpid()}-" in a.tmp.name
    a.write("a-0", 0, b"png-a", real_metadata(0, "x", "a.png"))
    b.write("b-0", 0, b"png-b0", real_metadata(0, "x", "b0.png"))
    b.write("b-1", 0, b"png-b1", real_metadata(0, "x", "b1.png"))
    a.close()
    _, sha = b.close()
    from fillup_data.shards.writer import sha256_file

    with tarfile.open(path) as tar:  # whole, and wholly b's
        assert [m.name for m in tar.getmembers()] == [f"b-{i}.{e}" for i in (0, 1) for e in ("cls", "json", "png")]
    assert sha256_file(path) == sha and not list(path.parent.glob("*.tmp"))


def test_shard_changed_after_its_record_is_detected_and_rewritten(tmp_path):
    import pyarrow.parquet as pq

    recipe = parse_recipe(split_file_recipe(write_split_file_dataset(tmp_path / "data", [12, 6, 3])["train"].parent))
    out = tmp_path / "out"
    first = run_build(recipe, out, **QUIET)
    before = shas(out)
    row = pq.read_table(out / "index.parquet").to_pylist()[3]
    tar = out / row["shard"]
    data = bytearray(tar.read_bytes())
    data[row["image_offset"] + 20] ^= 0xFF  # same size: the size check alone passes it as done
    tar.write_bytes(bytes(data))
    again = run_build(recipe, out, **QUIET)
    assert (again.shards_rewritten, again.shards_written, again.shards_reused) == (1, 1, first.shards - 1)
    assert shas(out) == before and main(["inspect", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rewritten_shards"] == [{"path": row["shard"], "reason": "sha256 on disk differed from its completion record"}]


@pytest.mark.parametrize("damage", ["", "{\"path\": \"data/tr", "[]", "\xff\xfe not utf-8"])
def test_empty_or_garbage_completion_record_means_not_done(tmp_path, damage):
    recipe = parse_recipe(split_file_recipe(write_split_file_dataset(tmp_path / "data", [12, 6, 3])["train"].parent))
    out = tmp_path / "out"
    first = run_build(recipe, out, **QUIET)
    before = shas(out)
    records = sorted((out / ".fillup" / "shards").glob("*.json"))
    records[1].write_bytes(damage.encode("latin-1"))
    again = run_build(recipe, out, **QUIET)
    assert (again.shards_written, again.shards_reused) == (1, first.shards - 1)
    assert shas(out) == before and json.loads(records[1].read_text())["sha256"] == before[json.loads(records[1].read_text())["path"]]


def test_unreadable_build_record_is_a_clear_error_and_force_recovers(tmp_path, capsys):
    recipe = mini_lt(tmp_path)
    out = tmp_path / "out"
    assert main(["build", str(recipe), "--out", str(out), "--quiet"]) == 0
    (out / ".fillup" / "build.json").write_text("")
    assert main(["build", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "build.json is unreadable" in err and "--force" in err and "Traceback" not in err
    assert main(["build", str(recipe), "--out", str(out), "--quiet", "--force"]) == 0


def test_every_record_and_shard_is_fsynced_with_its_folder(tmp_path, monkeypatch):
    import fillup_data.state as state

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(state.os, "fsync", recording_fsync)
    recipe = parse_recipe(split_file_recipe(write_split_file_dataset(tmp_path / "data", [12, 6, 3])["train"].parent))
    out = tmp_path / "out"
    run_build(recipe, out, **QUIET)
    written = [*(out / ".fillup" / "shards").glob("*.json"), out / ".fillup" / "build.json",
               out / ".fillup" / "plan.json", out / "manifest.json", out / "report.json", out / "index.parquet",
               *(out / "data").glob("*.tar")]
    for path in written:  # the file's temporary name (before its rename), then its folder
        assert any(Path(p).parent == path.parent and Path(p).name.startswith((f".{path.name}.", f"{path.name}."))
                   for p in synced), path
        assert str(path.parent) in synced, path.parent


def test_file_names_that_are_not_utf8_are_a_clear_error(tmp_path):
    from fillup_data.shards.index_parquet import write_index
    from fillup_data.schema.sample import real_metadata
    from fillup_data.shards.writer import ShardWriter
    from fillup_data.state import write_json_atomic

    os.makedirs(os.fsencode(tmp_path / "src"))
    with open(os.fsencode(tmp_path / "src") + b"/caf\xe9.jpg", "wb") as f:  # Latin-1, as old cameras/zips write
        f.write(b"x")
    name = os.listdir(tmp_path / "src")[0]  # 'caf\udce9.jpg': Python keeps the byte as a surrogate
    writer = ShardWriter(tmp_path / "s.tar", "jpg")
    with pytest.raises(FillupError, match=r"sample train-real-00000-000000: metadata 'source_path' .*caf\\xe9.*not valid UTF-8"):
        writer.write("train-real-00000-000000", 0, b"jpg", real_metadata(0, "cat", f"src/{name}"))
    writer.abort()
    with pytest.raises(FillupError, match=r"r\.json: cannot write .caf\\xe9\.jpg.: it is not valid UTF-8"):
        write_json_atomic(tmp_path / "r.json", {"skipped": [{"source_path": name}]})
    row = {"key": "k-0", "shard": "s", "split": "train", "offset": 0, "size": 1, "image_offset": 0, "image_size": 1,
           **real_metadata(0, "cat", name)}
    with pytest.raises(FillupError, match=r"sample k-0: source_path .caf\\xe9\.jpg. is not valid UTF-8"):
        write_index(tmp_path / "index.parquet", [row])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_status_counts_what_a_relaunch_would_skip(tmp_path, monkeypatch, capsys):
    import fillup_data.stages.real as real_stage

    recipe = parse_recipe(split_file_recipe(write_split_file_dataset(tmp_path / "data", [12, 6, 3])["train"].parent))
    out = tmp_path / "out"
    real_write, calls = real_stage.write_real_shard, []

    def killed_on_third_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_write(*a, **kw)

    monkeypatch.setattr(real_stage, "write_real_shard", killed_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_build(recipe, out, **QUIET)
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{out}: in progress; shards 2/4 done",
                                                    "phase A (real shards): 2/4 tasks done"]
    done = sorted((out / "data").glob("*.tar"))
    done[0].write_bytes(done[0].read_bytes()[:512])  # a shard damaged since: a relaunch rewrites it
    (out / ".fillup" / "shards" / "train-real-00002.json").write_text("")  # an empty record: not done
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{out}: in progress; shards 1/4 done",
                                                    "phase A (real shards): 1/4 tasks done"]
    monkeypatch.setattr(real_stage, "write_real_shard", real_write)
    summary = run_build(recipe, out, **QUIET)
    assert (summary.shards_written, summary.shards_reused) == (3, 1)
    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{out}: finished; shards 4/4 done",
                                                    "phase A (real shards): 4/4 tasks done"]


def test_generation_rate_and_eta_from_record_times():
    from fillup_data.build import rate_and_eta

    assert rate_and_eta([], 100) == ", 0/100 images"
    assert rate_and_eta([(50.0, 10)], 100) == ", 10/100 images"  # one shard: no clock yet
    # 3 shards of 10 recorded at t=0, 10, 20: 20 images in 20 s -> 1 image/s; 70 left -> 70 s
    assert rate_and_eta([(20.0, 10), (0.0, 10), (10.0, 10)], 100) == ", 30/100 images, 1.00 images/s, ETA 1m10s"
    assert rate_and_eta([(0.0, 10), (2.0, 40)], 50) == ", 50/50 images, 20.00 images/s"  # finished: no ETA


def test_shard_counts_that_divide_among_ranks_are_recorded_and_explained(tmp_path):
    """auto: 21 real images at most 4 a shard make 8 shards (a multiple of 8: each stays at least half full);
    the manifest records the multiple and the card tells a user of `split_dataset_by_node` what it means."""
    out = tmp_path / "out"
    assert main(["build", str(mini_lt(tmp_path, shards={"max_samples": 4})), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sharding"] == {"train-real": {"shards": 8, "multiple_of": 8},
                                    "test-real": {"shards": 2, "multiple_of": 1}}
    assert sum(s["split"] == "train" for s in manifest["shards"]) == 8
    card = (out / "README.md").read_text()
    assert "train-real 8 (a multiple of 8), test-real 2." in card and "split_dataset_by_node" in card


def test_the_index_is_written_a_shard_at_a_time_and_never_half(tmp_path, monkeypatch):
    """Row groups of bounded size; an error while writing leaves the previous index.parquet as it was."""
    import pyarrow.parquet as pq

    from fillup_data.schema import sample as sample_schema
    from fillup_data.shards.index_parquet import IndexWriter, read_index

    out = tmp_path / "out"
    run_build(parse_recipe(split_file_recipe(_mini_root(tmp_path))), out, workers=1, progress=False,
              log=lambda *_: None)
    rows = read_index(out / "index.parquet")
    before = (out / "index.parquet").read_bytes()
    monkeypatch.setattr(IndexWriter, "ROW_GROUP", 4)
    again = tmp_path / "again.parquet"
    with IndexWriter(again) as writer:
        for k in range(0, len(rows), 3):
            writer.write(rows[k:k + 3])
    assert pq.ParquetFile(again).metadata.num_row_groups == -(-len(rows) // 4)
    assert read_index(again) == rows and pq.read_schema(again).names == sample_schema.index_schema().names
    with pytest.raises(RuntimeError), IndexWriter(out / "index.parquet") as writer:
        writer.write(rows[:5])
        raise RuntimeError("a shard record went missing")
    assert (out / "index.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("index.parquet")) == ["index.parquet"]


def _mini_root(tmp_path):
    root = tmp_path / "data"
    write_split_file_dataset(root, [12, 6, 3], test_per_class=2)
    return root
