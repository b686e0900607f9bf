"""Issue 3 end to end: a demo build with Textual Inversion on the tiny pipeline, then the
datasets client, regeneration from metadata, and a build killed twice that resumes to the same bytes."""

import io
import json
from collections import Counter
from pathlib import Path

import pytest

import fillup_data.inversion as inversion
import fillup_data.synthesis as synthesis
from fillup_data.build import run_build
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
    from fillup_data.shards.writer import METADATA_KEYS, encode_image

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


def test_killed_twice_resumes_to_identical_bytes(ti_build, tmp_path, monkeypatch):
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
    monkeypatch.setattr(inversion, "invert_classes", real_invert)

    real_write = synthesis.write_synthetic_shard
    calls = []

    def crash_on_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-generation")
        return real_write(*a, **kw)

    monkeypatch.setattr(synthesis, "write_synthetic_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_build(mini(), out, **QUIET)
    assert not list((out / "data").glob("*.tmp"))
    monkeypatch.setattr(synthesis, "write_synthetic_shard", real_write)
    summary = run_build(mini(), out, **QUIET)
    assert summary.shards_reused >= 1

    a, b = manifest_of(ti_build), manifest_of(out)
    assert [(s["path"], s["sha256"]) for s in a["shards"]] == [(s["path"], s["sha256"]) for s in b["shards"]]
    assert [(t["path"], t["sha256"]) for t in a["tokens"]] == [(t["path"], t["sha256"]) for t in b["tokens"]]
    assert not list((out / "tokens").glob("*.partial.*"))


def test_single_template_strategy(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "st"
    run_build(mini("generator.strategy=single_template", "generator.prompt=a photo of a {class_name}"), out, **QUIET)
    rows = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["is_synthetic"]]
    assert rows and all(r["strategy"] == "single_template" and r["token_step"] == -1 for r in rows)
    assert all(r["prompt"] == f"a photo of a {r['class_name']}" for r in rows)
    assert not (out / "tokens").exists()


def test_cli_preview_regenerate_export(ti_build, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from fillup_data.cli import main
    from fillup_data.inversion import read_token_file

    grid = tmp_path / "grid.png"
    args = ["preview", str(DEMO), "--classes", "1,purple square", "--n", "3", "--out", str(grid)]
    for o in MINI:
        args += ["--set", o]
    assert main(args) == 0
    assert Image.open(grid).size[0] > 6 * 32 and (tmp_path / "grid-tokens" / "tokens" / "00009.safetensors").is_file()
    assert main(["preview", str(DEMO), "--classes", "nonsense", "--n", "1", "--out", str(grid)]) == 2

    import pyarrow.parquet as pq

    key = next(r["key"] for r in pq.read_table(ti_build / "index.parquet").to_pylist() if r["is_synthetic"])
    assert main(["regenerate", str(ti_build), "--key", key, "--image", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (32, 32)

    token = read_token_file(ti_build / "tokens" / "00009.safetensors")
    assert main(["export-token", str(ti_build / "tokens" / "00009.safetensors"), "--out", str(tmp_path / "t.safetensors")]) == 0
    exported = load_file(tmp_path / "t.safetensors")
    (name, vec), = exported.items()
    assert name == "<fillup-00009>" and vec.equal(token.vectors(token.checkpoint_steps[-1]))
