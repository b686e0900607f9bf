"""End-to-end builds with the real datasets / webdataset clients (strategy none: no model)."""

import json
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
            "num_inference_steps", "model", "source_path"}
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
