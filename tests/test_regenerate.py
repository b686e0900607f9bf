"""Issue 12: the manifest records what decides a synthetic image's pixels, `regenerate` reuses it, is
pixel-exact on the same setup (eager and compiled, on CPU) and reports the PSNR and the differing settings
elsewhere; `auto` settings are resolved once per build (pinned)."""

import json
import math

import pytest
import torch

from fillup_data import fastpath
from fillup_data.build import run_build
from fillup_data.cli import main
from fillup_data.errors import FillupError
from fillup_data.regenerate import regenerate_sample

from .test_synthesis import QUIET, mini

pytestmark = pytest.mark.slow


def synthetic_keys(out):
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["is_synthetic"]]
    return [rows[0]["key"], rows[-1]["key"]]


def edit_setups(out, **changes):
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    for s in manifest["shards"]:
        if s["origin"] == "synthetic":
            if changes.get("drop"):
                s.pop("pixel_setup")
            else:
                s["pixel_setup"].update(changes)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def auto_build(tmp_path_factory):
    """The demo recipe shrunk, with the defaults of the fast paths (batch size and compile auto)."""
    out = tmp_path_factory.mktemp("auto") / "out"
    run_build(mini("generator.batch_size=auto", "generator.compile=auto"), out, **QUIET)
    return out


def test_manifest_records_the_pixel_setup_of_every_synthetic_shard(auto_build):
    import diffusers

    manifest = json.loads((auto_build / "manifest.json").read_text())
    synthetic = [s for s in manifest["shards"] if s["origin"] == "synthetic"]
    real = [s for s in manifest["shards"] if s["origin"] == "real"]
    assert synthetic and real and not any("pixel_setup" in s for s in real)
    for s in synthetic:
        assert s["pixel_setup"] == {
            "device": fastpath.device_description("cpu"), "dtype": "float32", "compile": False,
            "micro_batch": fastpath.CPU_GENERATION_BATCH, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cpu_threads": torch.get_num_threads()}
    # auto was resolved once for the build and pinned
    pinned = json.loads(fastpath.pinned_path(auto_build, "generator.batch_size").read_text())
    assert pinned["value"] == fastpath.CPU_GENERATION_BATCH


def test_regenerate_is_pixel_exact_on_the_recorded_setup(auto_build, tmp_path, capsys):
    for key in synthetic_keys(auto_build):
        res = regenerate_sample(auto_build, key)
        assert res.exact and res.psnr == math.inf and res.differences == [], res.summary()
    key = synthetic_keys(auto_build)[0]
    assert main(["regenerate", str(auto_build), "--key", key, "--image", str(tmp_path / "x.png"),
                 "--require-exact"]) == 0
    assert "pixel-exact" in capsys.readouterr().out


def test_regenerate_follows_the_recorded_setup_and_reports_differences(auto_build, tmp_path, capsys):
    key = synthetic_keys(auto_build)[0]
    # as if the shards had been made in bfloat16 with another torch: regeneration follows the record
    # (bfloat16 here), so the stored float32 image is not reproduced, and the report says how far and why
    edit_setups(auto_build, dtype="bfloat16", torch="0.0.0-elsewhere")
    try:
        res = regenerate_sample(auto_build, key)
        assert res.current_setup["dtype"] == "bfloat16"
        assert not res.exact and 10 < res.psnr < math.inf
        assert res.differences == [f"torch: '0.0.0-elsewhere' -> {torch.__version__!r}"]
        assert main(["regenerate", str(auto_build), "--key", key, "--image", str(tmp_path / "x.png"),
                     "--require-exact"]) == 1
        out = capsys.readouterr().out
        assert "NOT pixel-exact" in out and "PSNR" in out and "0.0.0-elsewhere" in out
    finally:
        edit_setups(auto_build, dtype="float32", torch=torch.__version__)


def test_a_build_without_a_recorded_setup_regenerates_as_before(auto_build):
    """Builds made before the record: eager, at the recipe's integer batch size."""
    manifest = (auto_build / "manifest.json").read_text()
    try:
        edit_setups(auto_build, drop=True)
        recipe = json.loads((auto_build / "manifest.json").read_text())
        recipe["recipe"]["generator"]["batch_size"] = fastpath.CPU_GENERATION_BATCH
        (auto_build / "manifest.json").write_text(json.dumps(recipe))
        res = regenerate_sample(auto_build, synthetic_keys(auto_build)[0])
        assert res.exact and res.recorded_setup is None and "no pixel setup recorded" in res.differences[0]
        # with auto in the recipe and no record, the micro-batch is unknown: a clear error
        recipe["recipe"]["generator"]["batch_size"] = "auto"
        (auto_build / "manifest.json").write_text(json.dumps(recipe))
        with pytest.raises(FillupError, match="records no pixel setup"):
            regenerate_sample(auto_build, synthetic_keys(auto_build)[0])
    finally:
        (auto_build / "manifest.json").write_text(manifest)


def test_a_build_made_before_source_key_regenerates(auto_build, tmp_path):
    """Issue 13: an index.parquet and manifest.json as builds before ``source_key`` wrote them (no such
    column, no ``sample_keys``) still regenerate, by key and from a sample's json of the first release."""
    import shutil

    import pyarrow.parquet as pq

    from fillup_data.regenerate import regenerate
    from fillup_data.schema.sample import index_schema, keys_of_version

    old = tmp_path / "old"
    shutil.copytree(auto_build, old)
    table = pq.read_table(old / "index.parquet")
    pq.write_table(table.select(index_schema(keys_of_version(1)).names), old / "index.parquet", compression="zstd")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["sample_keys"]
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert "source_key" not in pq.read_schema(old / "index.parquet").names
    key = synthetic_keys(old)[0]
    res = regenerate_sample(old, key)
    assert res.exact, res.summary()
    row = pq.read_table(old / "index.parquet", filters=[("key", "=", key)]).to_pylist()[0]
    image = regenerate(old, {k: row[k] for k in keys_of_version(1)})
    assert image.size == res.image.size


def test_a_pinned_value_is_used_by_every_later_worker(tmp_path):
    """A value pinned by the first worker (e.g. a GPU that sized the batch from its memory) is what a
    later worker or a resume uses, whatever it would resolve itself; the record says so."""
    out = tmp_path / "out"
    path = fastpath.pinned_path(out, "generator.batch_size")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"name": "generator.batch_size", "value": 3, "resolved_on": "cuda:elsewhere"}))
    run_build(mini("generator.batch_size=auto"), out, **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["pixel_setup"]["micro_batch"] for s in manifest["shards"] if s["origin"] == "synthetic"} == {3}
    assert regenerate_sample(out, synthetic_keys(out)[-1]).exact


def test_compiled_build_regenerates_pixel_exact(tmp_path):
    """torch.compile on CPU (inductor's C++ backend): the record says compiled, regenerate compiles too."""
    out = tmp_path / "out"
    run_build(mini("generator.compile=true", "source.max_images=12", "fill.target=12"), out, **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["pixel_setup"]["compile"] for s in manifest["shards"] if s["origin"] == "synthetic"} == {True}
    for key in synthetic_keys(out):
        res = regenerate_sample(out, key)
        assert res.exact, res.summary()


def test_pin_setting_first_value_wins_and_a_damaged_pin_is_named(tmp_path):
    calls = []
    assert fastpath.pin_setting(tmp_path, "x", lambda: calls.append(1) or 12) == 12
    assert fastpath.pin_setting(tmp_path, "x", lambda: calls.append(1) or 40) == 12
    assert calls == [1]
    assert fastpath.pin_setting(None, "x", lambda: 40) == 40  # no build folder: nothing pinned
    fastpath.pinned_path(tmp_path, "x").write_text("{not json")
    with pytest.raises(FillupError, match=r"pinned.x\.json: unreadable pinned setting"):
        fastpath.pin_setting(tmp_path, "x", lambda: 1)
    fastpath.pinned_path(tmp_path, "x").write_text(json.dumps({"value": 0}))
    with pytest.raises(FillupError, match="must be a positive integer"):
        fastpath.pin_setting(tmp_path, "x", lambda: 1)


def test_largest_fitting_extrapolates_the_probe():
    # 1 row peaks at 3 GiB, 2 rows at 4 GiB: 2 GiB fixed + 1 GiB per row
    gib = 1 << 30
    peaks = {1: 3 * gib, 2: 4 * gib}
    assert fastpath.largest_fitting((64, 32, 16, 8, 4, 2, 1), peaks.__getitem__, 40 * gib, headroom=1.0) == 32
    assert fastpath.largest_fitting((64, 32, 16, 8, 4, 2, 1), peaks.__getitem__, 17 * gib, headroom=0.85) == 8
    assert fastpath.largest_fitting((8, 4, 2, 1), peaks.__getitem__, 2 * gib) == 1  # nothing fits: one row
