"""Issue 13: quality scores as index.parquet columns (`score`: resumable after a SIGKILL, a changed model
recomputes, bad input is a clear error) and the per-class quality report (`quality`), on a tiny build."""

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from fillup_data.cli import main
from fillup_data.quality.metrics import frechet_distance, precision_recall
from fillup_data.schema.scores import SCORE_COLUMNS, SCORE_NAMES

from .helpers import split_file_recipe, write_split_file_dataset

REPO = Path(__file__).resolve().parent.parent
CLIP = ["--clip-model", "builtin:tiny-clip", "--device", "cpu", "--batch-size", "4", "--quiet"]


# --------------------------------------------------------------------------- metrics against hand-computed values
def test_fid_of_identical_sets_is_zero_and_of_shifted_sets_the_squared_shift():
    a = np.random.default_rng(0).normal(size=(40, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(a, a + [3, 0, 4]) == pytest.approx(25.0)


def test_fid_by_hand_in_one_dimension():
    # means 1 and 2, unbiased variances 2 and 8: (1-2)^2 + 2 + 8 - 2*sqrt(2*8) = 3
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[0.0], [4.0]])) == pytest.approx(3.0)
    assert math.isnan(frechet_distance(np.zeros((1, 2)), np.zeros((5, 2))))  # one image: no covariance


def test_precision_recall_identical_disjoint_and_by_hand():
    a = np.random.default_rng(1).normal(size=(30, 4))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100) == (0.0, 0.0)
    # real 0,1,2,3: 3rd-neighbour radii 3,2,2,3.  fake 1.5 and 5.5 fall inside (|5.5-3| <= 3; with k=2 the
    # radius of 3 would be 2 and 5.5 outside), 6.5 and 100 do not; every real point is within the fake
    # set's radii (1.5's 3rd neighbour is 100)
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[1.5], [5.5], [6.5], [100.0]])
    assert precision_recall(real, fake) == (0.5, 1.0)
    assert all(math.isnan(v) for v in precision_recall(real[:3], fake))  # k=3 needs more than 3 images


# --------------------------------------------------------------------------- a tiny build, scored
def _make_build(root: Path) -> Path:
    from fillup_data.build import run_build
    from fillup_data.recipe import load_recipe

    write_split_file_dataset(root / "data", [8, 4, 2], test_per_class=2)
    rec = split_file_recipe(root / "data", fill={"policy": "fill_to", "target": 8}, shards={"max_samples": 6},
                            generator={"strategy": "single_template", "model": "builtin:tiny-sd",
                                       "prompt": "a photo of a {class_name}", "guidance_scale": 1.0,
                                       "num_inference_steps": 2, "resolution": 16})
    (root / "recipe.yaml").write_text(yaml.safe_dump(rec))
    out = root / "out"
    run_build(load_recipe(root / "recipe.yaml"), out, workers=1, progress=False, log=lambda *_: None)
    return out


def shard_shas(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.tar"))}


# The CLIP features' last bits depend on torch's thread count, which other test modules set at import
# (test_loader: 1): the scored build and the subprocesses compared with it byte for byte use this one.
SCORE_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """An unscored build (kept pristine: copy it before changing it) and a scored copy of it."""
    root = tmp_path_factory.mktemp("quality")
    pristine = _make_build(root)
    scored = root / "scored"
    shutil.copytree(pristine, scored)
    with torch_threads(SCORE_THREADS):
        assert main(["score", str(scored), *CLIP]) == 0
    return pristine, scored


def copy_of(build: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "build"
    shutil.copytree(build, dest)
    return dest


def test_scores_are_new_index_columns_and_shards_stay_byte_identical(builds):
    pristine, scored = builds
    before, after = pq.read_table(pristine / "index.parquet"), pq.read_table(scored / "index.parquet")
    assert after.column_names == before.column_names + list(SCORE_NAMES)
    assert after.select(before.column_names).equals(before)  # every existing column and the row order kept
    for col in SCORE_COLUMNS:
        assert after.schema.field(col.name).type == col.arrow_type
    assert shard_shas(scored) == shard_shas(pristine)
    rows = after.to_pylist()
    by_key = {r["key"]: r for r in rows}
    synthetic = [r for r in rows if r["is_synthetic"]]
    assert synthetic and all(-1 <= r["clip_score"] <= 1 for r in rows)
    assert all(math.isnan(r["class_confidence"]) for r in rows)  # no classifier given
    for r in rows:
        if not r["is_synthetic"]:
            assert math.isnan(r["real_similarity"]) and r["nearest_real_key"] == ""
    for r in synthetic:  # the nearest real image is a real training image of the same class
        near = by_key[r["nearest_real_key"]]
        assert (near["label"], near["is_synthetic"], near["split"]) == (r["label"], False, "train")
        assert -1 <= r["real_similarity"] <= 1 + 1e-6


def test_real_similarity_is_the_max_cosine_to_the_class_real_images(builds):
    """Recompute from the CLIP model itself: the stored column is the maximum, the key is its argmax."""
    from fillup_data.quality.clip_model import load_clip
    from fillup_data.shards.index_parquet import read_stored_image

    _, scored = builds
    rows = pq.read_table(scored / "index.parquet").to_pylist()
    clip = load_clip("builtin:tiny-clip", "cpu")
    syn = next(r for r in rows if r["is_synthetic"])
    real = [r for r in rows if r["label"] == syn["label"] and not r["is_synthetic"] and r["split"] == "train"]
    feats = clip.image_features([read_stored_image(scored, r) for r in [syn, *real]]).numpy().astype(np.float64)
    sims = feats[1:] @ feats[0]
    assert syn["real_similarity"] == pytest.approx(sims.max(), abs=1e-5)
    assert syn["nearest_real_key"] == real[int(sims.argmax())]["key"]
    text = clip.text_features([f"a photo of a {syn['class_name']}"]).numpy()[0]
    assert syn["clip_score"] == pytest.approx(float(feats[0] @ text), abs=1e-5)


def test_manifest_records_the_scores_and_inspect_still_passes(builds, capsys):
    from fillup_data.schema.manifest import Manifest

    _, scored = builds
    manifest = Manifest.read(scored / "manifest.json")
    assert manifest.scores["clip_model"] == "builtin:tiny-clip" and manifest.scores["classifier"] is None
    assert manifest.scores["columns"] == list(SCORE_NAMES)
    assert main(["inspect", str(scored)]) == 0
    assert "all sha256 and sample counts match" in capsys.readouterr().out


KILLED_RUN = """
import os, sys, time
import fillup_data.quality.scoring as scoring
real_write = scoring.write_shard_scores
done = []
def write_then_hang(*args, **kw):
    real_write(*args, **kw)
    done.append(1)
    if len(done) == 2:  # two shards stored: stop here and wait for the parent's SIGKILL
        print("two shards stored", flush=True)
        time.sleep(600)
scoring.write_shard_scores = write_then_hang
from fillup_data.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(builds, tmp_path):
    pristine, scored = builds
    out = copy_of(pristine, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(SCORE_THREADS)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, "score", str(out), *CLIP], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # the hook's line (after the plan line, which --quiet leaves out)
        lines = [proc.stdout.readline().strip()]
        while lines[-1] != "two shards stored" and len(lines) < 3:
            lines.append(proc.stdout.readline().strip())
        assert lines[-1] == "two shards stored", lines
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "clip_score" not in pq.read_schema(out / "index.parquet").names  # killed before the index rewrite
    resumed = subprocess.run([sys.executable, "-m", "fillup_data.cli", "score", str(out), *CLIP], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "(4 scored now, 2 reused from .fillup/scores)" in resumed.stdout
    # the same values (NaN included: pandas compares NaN as equal, arrow does not) and the same bytes
    assert pq.read_table(out / "index.parquet").to_pandas().equals(pq.read_table(scored / "index.parquet").to_pandas())
    assert (out / "index.parquet").read_bytes() == (scored / "index.parquet").read_bytes()


def _tiny_cnn_weights(path: Path, num_classes: int) -> Path:
    import torch

    from fillup_data.train.models import build_model, save_weights

    torch.manual_seed(0)
    save_weights(build_model("tiny_cnn", num_classes), path)
    return path


def test_a_classifier_fills_class_confidence_and_a_changed_model_recomputes(builds, tmp_path, capsys):
    _, scored = builds
    out = copy_of(scored, tmp_path)
    weights = _tiny_cnn_weights(tmp_path / "cnn.safetensors", 3)
    assert main(["score", str(out), *CLIP, "--classifier-arch", "tiny_cnn", "--classifier-weights", str(weights),
                 "--classifier-image-size", "16", "--classifier-resize", "16"]) == 0
    assert "(6 scored now, 0 reused from .fillup/scores)" in capsys.readouterr().out
    conf = pq.read_table(out / "index.parquet", columns=["class_confidence"]).column(0).to_pylist()
    assert all(0 < c <= 1 for c in conf)
    assert json.loads((out / "manifest.json").read_text())["scores"]["classifier"].startswith("tiny_cnn ")
    # the same command again reuses every shard
    assert main(["score", str(out), *CLIP, "--classifier-arch", "tiny_cnn", "--classifier-weights", str(weights),
                 "--classifier-image-size", "16", "--classifier-resize", "16"]) == 0
    assert "(0 scored now, 6 reused from .fillup/scores)" in capsys.readouterr().out
    # another batch size (it decides the last bits) scores every shard again, never mixing the two setups
    assert main(["score", str(out), *CLIP, "--classifier-arch", "tiny_cnn", "--classifier-weights", str(weights),
                 "--classifier-image-size", "16", "--classifier-resize", "16", "--batch-size", "3"]) == 0
    assert "(6 scored now, 0 reused from .fillup/scores)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["scores"]["batch_size"] == 3


def test_classifier_from_a_training_run_folder(builds, tmp_path, capsys):
    """A real Stage I run of our trainer (one epoch): its run.json builds the model and eval transform."""
    _, scored = builds
    out = copy_of(scored, tmp_path)
    run = tmp_path / "run1"
    assert main(["train", "--data", str(out), "--config", str(REPO / "recipes/train/demo.yaml"), "--stage", "1",
                 "--out", str(run), "--device", "cpu", "--set", "stage1.epochs=1", "--set", "stage1.warmup_epochs=0",
                 "--set", "stage1.batch_size=8", "--set", "model.width=4", "--set", "data.image_size=16", "--set", "data.eval_resize=16"]) == 0
    capsys.readouterr()
    assert main(["score", str(out), *CLIP, "--classifier", str(run)]) == 0
    conf = pq.read_table(out / "index.parquet", columns=["class_confidence"]).column(0).to_pylist()
    assert all(0 < c <= 1 for c in conf)
    assert json.loads((out / "manifest.json").read_text())["scores"]["classifier"] == str(run)


# --------------------------------------------------------------------------- bad input: exit 2, file named
def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_is_a_clear_error(builds, tmp_path, capsys):
    pristine, _ = builds
    no_index = tmp_path / "no-index"
    no_index.mkdir()
    shutil.copy(pristine / "manifest.json", no_index / "manifest.json")
    _fails(["score", str(no_index), *CLIP], capsys, str(no_index / "index.parquet"), "finished build")

    out = copy_of(pristine, tmp_path)
    _fails(["score", str(out), "--clip-model", "org/no-such-clip", "--device", "cpu"], capsys,
           "--clip-model", "'org/no-such-clip'")
    wrong = _tiny_cnn_weights(tmp_path / "five.safetensors", 5)
    _fails(["score", str(out), *CLIP, "--classifier-arch", "tiny_cnn", "--classifier-weights", str(wrong)], capsys,
           str(wrong), "5 classes", "the build has 3")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"class_names": ["a", "b"], "config": {}}))
    (run / "model.safetensors").write_bytes(b"")
    _fails(["score", str(out), *CLIP, "--classifier", str(run)], capsys, "run.json", "2 classes", "the build has 3")
    _fails(["quality", str(out)], capsys, "no scores", "fillup-data score")

    shard = sorted((out / "data").glob("train-synthetic-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated: differs from the manifest's sha256
    _fails(["score", str(out), *CLIP], capsys, str(shard), "sha256")
    shard.unlink()
    _fails(["score", str(out), *CLIP], capsys, str(shard), "cannot read")


# --------------------------------------------------------------------------- the quality report
@pytest.fixture(scope="module")
def reported(builds, tmp_path_factory):
    _, scored = builds
    out = tmp_path_factory.mktemp("report") / "build"
    shutil.copytree(scored, out)
    assert main(["quality", str(out), "--quiet", "--per-class", "3"]) == 0
    return out


def quality_bytes(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "quality").rglob("*")) if p.is_file()}


def test_report_numbers_files_and_same_bytes_on_rerun(reported):
    summary = json.loads((reported / "quality" / "summary.json").read_text())
    by_index = {c["index"]: c for c in summary["classes"]}
    # class 0 has 8 real images and no synthetic one: nothing to compare; class 2 has 2 real images:
    # an FID (flagged unreliable) but too few for k=3 precision/recall
    assert by_index[0]["synthetic"] == 0 and by_index[0]["fid"] is None and by_index[0]["precision"] is None
    assert by_index[2]["real"] == 2 and by_index[2]["fid"] is not None and not by_index[2]["fid_reliable"]
    assert by_index[2]["precision"] is None
    rows = pq.read_table(reported / "index.parquet").to_pylist()
    assert summary["overall"]["near_copies"] == sum(1 for r in rows if r["is_synthetic"]
                                                    and r["real_similarity"] >= 0.95)
    assert summary["overall"]["fid"] is not None and 0 <= summary["overall"]["precision"] <= 1
    text = (reported / "quality" / "README.md").read_text()
    for c in summary["classes"]:
        for rel in c["files"].values():
            assert (reported / rel).is_file()
    assert "](classes/000/00001-grid.png)" in text and "](scores.png)" in text
    first = quality_bytes(reported)
    assert main(["quality", str(reported), "--quiet", "--per-class", "3"]) == 0
    assert quality_bytes(reported) == first


def test_card_links_the_report_and_load_dataset_still_works(reported):
    import datasets

    card = (reported / "README.md").read_text()
    assert "](quality/README.md)" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert all(str(f["path"]).endswith(".tar") or all(p.endswith(".tar") for p in f["path"])
               for c in meta["configs"] for f in c["data_files"])
    ds = datasets.load_dataset(str(reported), split="train")
    assert len(ds) == sum(c["real"] + c["synthetic"] for c in json.loads((reported / "manifest.json").read_text())
                          ["classes"])
    assert isinstance(ds.features["cls"], datasets.ClassLabel)


def test_publish_uploads_the_listed_report_and_no_real_pixels_without_real_images(reported):
    from fillup_data.hub import _read_manifest, plan_files

    manifest = _read_manifest(reported)
    with_real = {f.path for f in plan_files(reported, manifest, include_real=True)[0]}
    assert {f["path"] for f in manifest["quality"]["files"]} <= with_real
    files = {f.path: f for f in plan_files(reported, manifest, include_real=False)[0]}
    assert "quality/classes/000/00001-grid-synthetic.png" in files and "quality/classes/000/00001-grid.png" not in files
    readme = files["quality/README.md"].read().decode()
    assert "](classes/000/00001-grid-synthetic.png)" in readme and "](classes/000/00001-grid.png)" not in readme


def test_rescoring_with_another_model_unlinks_the_stale_report(reported, tmp_path, capsys):
    out = copy_of(reported, tmp_path)
    weights = _tiny_cnn_weights(tmp_path / "cnn.safetensors", 3)
    assert main(["score", str(out), *CLIP, "--classifier-arch", "tiny_cnn", "--classifier-weights", str(weights),
                 "--classifier-image-size", "16", "--classifier-resize", "16"]) == 0
    assert "quality" not in json.loads((out / "manifest.json").read_text())
    assert "quality/README.md" not in (out / "README.md").read_text()


def test_manifest_refuses_report_files_outside_quality(reported, tmp_path):
    """publish uploads what manifest.quality lists: a path leaving quality/ is refused when read."""
    from fillup_data.errors import FillupError
    from fillup_data.schema.manifest import Manifest

    data = json.loads((reported / "manifest.json").read_text())
    data["quality"]["files"].append({"path": "quality/../../etc/passwd", "num_bytes": 1, "sha256": "x"})
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FillupError, match=r"quality.files\[\d+\] is not a file under quality/"):
        Manifest.read(path)


def test_a_stored_image_that_is_missing_or_damaged_is_named(builds, tmp_path):
    """The one reader of an image at its index offset (score, the report, the card's figures, the image
    strategies) names the shard and the sample instead of raising a decoder's traceback."""
    from fillup_data.errors import FillupError
    from fillup_data.shards.index_parquet import read_stored_image

    pristine, _ = builds
    row = pq.read_table(pristine / "index.parquet").to_pylist()[0]
    assert read_stored_image(pristine, row).mode == "RGB"
    out = copy_of(pristine, tmp_path)
    shard = out / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["image_offset"]:row["image_offset"] + row["image_size"]] = b"\0" * row["image_size"]
    shard.write_bytes(bytes(data))
    with pytest.raises(FillupError, match=rf"{shard}: the image of sample {row['key']} does not decode"):
        read_stored_image(out, row)
    shard.unlink()
    with pytest.raises(FillupError, match=rf"{shard}: cannot read the image of sample {row['key']}"):
        read_stored_image(out, row)


# --------------------------------------------------------------------------- bounded memory at any size
def test_block_wise_distances_equal_the_full_matrix_formula():
    """k-NN radii and coverage a block of rows at a time give what the plain [n, n] formula gives."""
    from fillup_data.quality import metrics

    def full_pairwise(x, y):
        return np.sqrt(np.clip((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0, None))

    def full_precision_recall(real, fake, k=3):
        def coverage(points, manifold):
            radii = np.sort(full_pairwise(manifold, manifold), axis=1)[:, k]
            return float(np.mean((full_pairwise(points, manifold) <= radii[None, :]).any(axis=1)))
        return coverage(fake, real), coverage(real, fake)

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(230, 16)), rng.normal(size=(170, 16)) + 0.3
    want_radii = np.sort(full_pairwise(real, real), axis=1)[:, 3]
    want = full_precision_recall(real, fake)
    assert 0 < want[0] < 1 and 0 < want[1] < 1  # a case where the balls decide, not 0 or 1
    for block in (1, 230 * 7 + 5, metrics.BLOCK_DISTANCES):  # one row a block, a ragged last block, one block
        np.testing.assert_allclose(metrics._radii(real, 3, block), want_radii, rtol=1e-12, atol=1e-12)
        assert precision_recall(real, fake, block_distances=block) == pytest.approx(want, abs=0)
    # the default block of the largest pooled set stays within 128 MiB of distances (two matrices live at once)
    rows = metrics._block_rows(10_000, metrics.BLOCK_DISTANCES)
    assert 2 * rows * 10_000 * 8 <= 128 * 2**20


def test_pooled_fid_from_merged_moments_equals_the_formula_on_every_image():
    from fillup_data.quality.metrics import PooledMoments, frechet_from_pooled

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(700, 6)) + 2, rng.normal(size=(500, 6)) * 1.5
    pa_, pb_ = PooledMoments(), PooledMoments()
    for part in np.array_split(a, [1, 3, 200, 450]):  # parts of 1, 2, 197 ... rows, as classes come
        pa_.add(part)
    for part in np.array_split(b, 4):
        pb_.add(part)
    assert frechet_from_pooled(pa_, pb_) == pytest.approx(frechet_distance(a, b), rel=1e-10)


def _scored_build_of_size(scored: Path, dest: Path, n_real: int, n_synthetic: int, *, dim: int = 8,
                          real_label: int = 0, synthetic_label: int = 2, seed: int = 0):
    """A copy of the tiny scored build whose index has ``n_real`` real and ``n_synthetic`` synthetic training
    rows (each pointing at one of the build's stored images) and whose stored scores hold random features:
    the report's numbers at sizes the tiny build cannot reach, in seconds.  Real rows get ``real_label``,
    synthetic ones ``synthetic_label`` (class 2 has 2 real images, k=3 precision/recall is not defined there,
    so no per-class comparison grows quadratic).  Returns the real and synthetic features in index order."""
    import pyarrow as pa

    from fillup_data.quality.shard_scores import ShardScores, write_shard_scores
    from fillup_data.schema.manifest import Manifest

    shutil.copytree(scored, dest)
    shutil.rmtree(dest / ".fillup" / "scores")
    base = pq.read_table(dest / "index.parquet")
    rng = np.random.default_rng(seed)
    n = n_real + n_synthetic
    synthetic = rng.permutation(np.r_[np.zeros(n_real, bool), np.ones(n_synthetic, bool)])
    table = base.take(pa.array(np.arange(n) % len(base)))
    replace = {"key": pa.array([f"k{i:07d}" for i in range(n)]), "split": pa.array(["train"] * n),
               "is_synthetic": pa.array(synthetic), "label": pa.array(np.where(synthetic, synthetic_label, real_label)),
               "clip_score": pa.array(rng.random(n)),
               "real_similarity": pa.array(np.where(synthetic, rng.random(n), np.nan))}
    for name, values in replace.items():
        i = table.column_names.index(name)
        table = table.set_column(i, table.schema.field(i), values.cast(table.schema.field(i).type))
    pq.write_table(table, dest / "index.parquet")
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[synthetic] += 0.25  # the two sets overlap, neither precision nor recall is 0 or 1
    manifest = Manifest.read(dest / "manifest.json")
    shards = table.column("shard").to_numpy(zero_copy_only=False)
    for s in sorted(set(shards)):
        rows = np.flatnonzero(shards == s)
        write_shard_scores(dest, s, manifest.shard(s).sha256, manifest.scores["identity"],
                           ShardScores([f"k{i:07d}" for i in rows], feats[rows], rng.random(len(rows)),
                                       np.full(len(rows), np.nan)))
    return feats[~synthetic], feats[synthetic]


def test_pooled_precision_recall_uses_a_seeded_sample_above_the_cap(builds, tmp_path):
    from fillup_data.quality.report import pooled_sample_rows, write_quality_report

    _, scored = builds
    real, syn = _scored_build_of_size(scored, tmp_path / "b", 700, 900)
    out = tmp_path / "b"
    summary = write_quality_report(out, per_class=1, progress=False, pooled_sample=300)
    o = summary["overall"]
    assert (o["real"], o["synthetic"], o["sample_real"], o["sample_synthetic"]) == (700, 900, 300, 300)
    real_pick, syn_pick = pooled_sample_rows(700, 900, 300)
    assert len(set(real_pick)) == 300 and len(set(syn_pick)) == 300
    want = precision_recall(real[real_pick], syn[syn_pick])
    assert (o["precision"], o["recall"]) == (round(want[0], 6), round(want[1], 6))
    assert o["fid"] == pytest.approx(frechet_distance(syn, real), abs=2e-6)  # FID: every image, not the sample
    assert "seeded sample of 300 real and 300 synthetic images" in (out / "quality" / "README.md").read_text()
    # the same sample again (seeded), and another sample when another cap is asked for
    assert write_quality_report(out, per_class=1, progress=False, pooled_sample=300)["overall"] == o
    assert write_quality_report(out, per_class=1, progress=False, pooled_sample=301)["overall"] != o
    # a cap at or above both sets: every image, the plain computation, no sample sentence
    summary = write_quality_report(out, per_class=1, progress=False, pooled_sample=900)
    o = summary["overall"]
    assert (o["sample_real"], o["sample_synthetic"]) == (700, 900)
    want = precision_recall(real, syn)
    assert (o["precision"], o["recall"]) == (round(want[0], 6), round(want[1], 6))
    assert o["fid"] == round(frechet_distance(syn, real), 6)
    assert "seeded sample" not in (out / "quality" / "README.md").read_text()


def test_report_memory_does_not_grow_with_the_image_count(builds, tmp_path):
    """tracemalloc's peak over the whole report at 12K and 24K training images (pooled cap 2,000): the
    same to within a small margin.  A full [n, n] distance matrix of the real images alone would be
    0.3 GB and 1.2 GB."""
    import tracemalloc

    from fillup_data.quality.report import write_quality_report

    _, scored = builds
    peaks = []
    for n in (12_000, 24_000):
        out = tmp_path / f"b{n}"
        _scored_build_of_size(scored, out, n // 2, n // 2)
        tracemalloc.start()
        try:
            write_quality_report(out, per_class=1, progress=False, pooled_sample=2000)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0] and peaks[1] < 150 * 2**20, [p / 2**20 for p in peaks]


def test_no_folder_of_the_report_holds_more_files_than_the_hub_takes():
    from fillup_data.hub import MAX_FILES_PER_FOLDER
    from fillup_data.quality.report import class_files

    per_folder: dict[str, set] = {}
    for index in range(20_001):
        for path in class_files(index).values():
            folder, name = path.rsplit("/", 1)
            per_folder.setdefault(folder, set()).add(name)
    assert sum(len(v) for v in per_folder.values()) == 3 * 20_001  # every name distinct
    assert max(len(v) for v in per_folder.values()) <= MAX_FILES_PER_FOLDER
    assert len(per_folder) <= MAX_FILES_PER_FOLDER and all(f.startswith("quality/classes/") for f in per_folder)


def test_figures_drawn_by_worker_processes_are_the_same_bytes(reported, tmp_path, monkeypatch):
    """Many classes: worker processes draw the per-class figures; the report is byte for byte the one
    drawn in process (here forced at 3 classes)."""
    import fillup_data.quality.report as report

    out = copy_of(reported, tmp_path)
    shutil.rmtree(out / "quality")
    monkeypatch.setattr(report, "PARALLEL_FIGURES_MIN_CLASSES", 1)
    report.write_quality_report(out, per_class=3, progress=False, workers=2)
    assert quality_bytes(out) == quality_bytes(reported)


def test_low_rank_fid_is_the_fid_formula():
    """With fewer images than dimensions the report computes FID from the centred features: by hand, two
    2-image sets in 3-d have rank-1 covariances u u^T and v v^T, so FID = |mu_a - mu_b|^2 + |u|^2 + |v|^2 -
    2 |u.v| = 2 + 2 + 4 - 2 * 2 = 4; on random sets it agrees with the covariance formula."""
    from fillup_data.quality.metrics import frechet_distance_low_rank

    a, b = np.array([[0.0, 0, 0], [2, 0, 0]]), np.array([[0.0, 1, 0], [2, 1, 2]])
    assert frechet_distance_low_rank(a, b) == pytest.approx(4.0, abs=1e-12)
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=1e-6)  # the [dim, dim] route: sqrt of rounding noise
    rng = np.random.default_rng(5)
    for na, nb, dim in ((3, 40, 64), (30, 500, 64), (200, 300, 16)):
        x, y = rng.normal(size=(na, dim)), rng.normal(size=(nb, dim)) * 1.2 + 0.1
        assert frechet_distance_low_rank(x, y) == pytest.approx(frechet_distance(x, y), rel=1e-6)
    assert math.isnan(frechet_distance_low_rank(a[:1], b))


def test_quality_cli_passes_the_pooled_sample_and_its_default_is_the_report_s(builds, tmp_path, capsys):
    from fillup_data.quality import cli as quality_cli
    from fillup_data.quality.report import POOLED_SAMPLE

    assert quality_cli.POOLED_SAMPLE == POOLED_SAMPLE
    _, scored = builds
    _scored_build_of_size(scored, tmp_path / "b", 40, 50)
    assert main(["quality", str(tmp_path / "b"), "--quiet", "--per-class", "1", "--pooled-sample", "20",
                 "--workers", "1"]) == 0
    summary = json.loads((tmp_path / "b" / "quality" / "summary.json").read_text())
    assert (summary["pooled_sample"], summary["overall"]["sample_real"], summary["overall"]["sample_synthetic"]) == (20, 20, 20)
    with pytest.raises(SystemExit):
        main(["quality", str(tmp_path / "b"), "--pooled-sample", "many"])
    capsys.readouterr()
    assert main(["quality", str(tmp_path / "b"), "--quiet", "--pooled-sample", "3"]) == 2
    assert "--pooled-sample: must be more than k=3 images, got 3" in capsys.readouterr().err
