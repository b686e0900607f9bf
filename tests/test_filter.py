"""The loader's and trainer's filter by quality score (issue 13).

The build is a real one (the demo source, single template, the sampler replaced by the world's own drawing
so it takes seconds); its index.parquet gets the columns `fillup-data score` adds, written the way score
writes them (read the index, append columns, write it back).  The expected key sets are computed here
independently, with pandas, from that index.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fillup_data.errors import FillupError
from fillup_data.loader import SampleFilter, ShardStream, TrainingData, eval_transform, make_loader

from tests.test_loader import hub  # noqa: F401  (the loopback Hub fixture, used by name)

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN = ROOT / "recipes" / "train" / "demo.yaml"
NAN = float("nan")


def _unit(key: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}/{key}".encode()).digest()[:4], "little") / 2**32


def write_scores(build: Path, *, with_classifier: bool = True, nan_clip_keys: tuple[str, ...] = ()) -> None:
    """What `fillup-data score` does to index.parquet: the same rows, four columns appended.  clip_score
    takes 11 values (many ties), real_similarity is NaN on real rows, class_confidence NaN without a classifier."""
    path = build / "index.parquet"
    table = pq.read_table(path)
    keys, synthetic = table["key"].to_pylist(), table["is_synthetic"].to_pylist()
    clip = [NAN if k in nan_clip_keys else 0.20 + int(_unit(k, "clip") * 11) / 100 for k in keys]
    sim = [0.5 + _unit(k, "sim") / 2 if s else NAN for k, s in zip(keys, synthetic)]
    conf = [_unit(k, "conf") if with_classifier else NAN for k in keys]
    nearest = [f"real-{int(_unit(k, 'near') * 9)}" if s else "" for k, s in zip(keys, synthetic)]
    for name, values, kind in (("clip_score", clip, pa.float64()), ("class_confidence", conf, pa.float64()),
                               ("real_similarity", sim, pa.float64()), ("nearest_real_key", nearest, pa.string())):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, kind), pa.array(values, type=kind))
    pq.write_table(table, path, compression="zstd")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A real build: 10 classes of 2..6 real images, 4 synthetic added to each, 7 samples per shard."""
    from fillup_data.build import run_build
    from fillup_data.recipe import load_recipe

    from tests.test_toyworld import patch_world_oracle

    out = tmp_path_factory.mktemp("filter") / "build"
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [
        "source.max_images=6", "source.min_images=2", "source.test_per_class=1", "fill.policy=addon",
        "fill.target=4", "generator.strategy=single_template", "generator.prompt=a photo of a {class_name}",
        "generator.num_inference_steps=1", "shards.max_samples=7",
    ])
    with pytest.MonkeyPatch.context() as mp:
        patch_world_oracle(mp)
        run_build(recipe, out, workers=1, progress=False, log=lambda *a: None)
    return out


@pytest.fixture
def unscored(tiny_build, tmp_path):
    out = tmp_path / "unscored"
    shutil.copytree(tiny_build, out)
    return out


@pytest.fixture(scope="module")
def scored(tiny_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "build"
    shutil.copytree(tiny_build, out)
    syn = sorted(r for r, s in zip(*pq.read_table(out / "index.parquet", columns=["key", "is_synthetic"])
                                   .to_pydict().values()) if s)
    write_scores(out, nan_clip_keys=(syn[3],))  # one synthetic sample whose score failed: never kept
    return out


def expected_synthetic(build: Path, f: dict) -> set[str]:
    """The kept synthetic keys, computed from the index with pandas (not with the code under test)."""
    df = pq.read_table(build / "index.parquet").to_pandas()
    df = df[df.is_synthetic & (df.split == "train")]
    if f.get("min_clip_score") is not None:
        df = df[df.clip_score >= f["min_clip_score"]]
    if f.get("max_real_similarity") is not None:
        df = df[~(df.real_similarity > f["max_real_similarity"])]  # NaN: no real image to copy, kept
    if f.get("min_class_confidence") is not None:
        df = df[df.class_confidence >= f["min_class_confidence"]]
    if f.get("top_k_per_class") is not None:
        df = (df.sort_values(["clip_score", "key"], ascending=[False, True], na_position="last")
              .groupby("label").head(f["top_k_per_class"]))
    return set(df.key)


def _replace_column(build: Path, table: pa.Table, name: str, values: pa.Array) -> None:
    pq.write_table(table.set_column(table.column_names.index(name), name, values.cast(pa.float64())),
                   build / "index.parquet")


def _tf():
    return eval_transform(32, 32)


def _all_keys(loader) -> list[str]:
    return [k for _, _, keys in loader for k in keys]


FILTERS = [
    {"min_clip_score": 0.25},
    {"max_real_similarity": 0.8},
    {"min_class_confidence": 0.5},
    {"top_k_per_class": 2},
    {"min_clip_score": 0.22, "max_real_similarity": 0.9, "top_k_per_class": 3},
]


# --------------------------------------------------------------------------- what the loader yields
@pytest.mark.parametrize("f", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_filtered_loader_yields_exactly_the_kept_keys(scored, f):
    want = expected_synthetic(scored, f)
    all_syn = expected_synthetic(scored, {})
    assert 0 < len(want) < len(all_syn)  # the filter keeps some and drops some
    data = TrainingData.open(scored, sample_filter=SampleFilter(**f))
    syn = _all_keys(make_loader(data, "synthetic", "train", 4, _tf(), train=False, return_keys=True))
    assert sorted(syn) == sorted(want)  # each kept sample once, nothing else
    filled = _all_keys(make_loader(data, "filled", "train", 4, _tf(), train=False, return_keys=True))
    real = _all_keys(make_loader(TrainingData.open(scored), "real", "train", 4, _tf(), train=False, return_keys=True))
    assert sorted(filled) == sorted(want | set(real))  # real samples are always kept
    assert data.selection.num_kept == len(want) and data.selection.num_dropped == len(all_syn) - len(want)


def test_top_k_breaks_ties_by_key_and_ranks_a_missing_score_last(scored):
    df = pq.read_table(scored / "index.parquet").to_pandas()
    df = df[df.is_synthetic]
    assert df.clip_score.isna().sum() == 1
    ties = df.dropna().groupby(["label", "clip_score"]).size()
    assert (ties > 1).any()  # the fixture has ties inside a class, so the key decides
    data = TrainingData.open(scored, sample_filter=SampleFilter(top_k_per_class=4))
    nan_key = df[df.clip_score.isna()].key.item()
    kept = set().union(*data.selection.kept.values())
    assert nan_key in kept  # 4 per class = all of them: a NaN score is ranked last, not dropped by top-k alone
    data = TrainingData.open(scored, sample_filter=SampleFilter(top_k_per_class=3))
    assert nan_key not in set().union(*data.selection.kept.values())


def test_training_epochs_use_the_kept_counts(scored):
    f = {"min_clip_score": 0.24}
    want = expected_synthetic(scored, f)
    data = TrainingData.open(scored, sample_filter=SampleFilter(**f))
    loader = make_loader(data, "synthetic", "train", 4, _tf(), seed=1, return_keys=True)
    assert len(loader) == len(want) // 4  # not the unfiltered count: no sample repeats within an epoch
    for epoch in range(2):
        loader.set_epoch(epoch)
        got = _all_keys(loader)
        assert len(got) == len(want) // 4 * 4 and len(set(got)) == len(got) and set(got) <= want


def _rank_streams(data, batch_size, world):
    return [ShardStream(data.shards("synthetic", "train"), batch_size, _tf(), train=True,
                        num_classes=data.num_classes, seed=5, rank=r, world_size=world, return_keys=True)
            for r in range(world)]


def _ranks_take_equal_steps(build: Path, f: dict, batch_size: int = 2) -> list[int]:
    want = expected_synthetic(build, f)
    data = TrainingData.open(build, sample_filter=SampleFilter(**f))
    streams = _rank_streams(data, batch_size, 2)
    assert len(streams[0]) == len(streams[1]) == (len(want) // 2) // batch_size > 0
    for epoch in range(2):
        got = []
        for s in streams:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) and all(len(k) == batch_size for _, _, k in batches)
            got.append([k for _, _, ks in batches for k in ks])
        assert not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) <= want
    return [s.num_kept for s in data.shards("synthetic", "train")]


def test_ranks_take_equal_steps_on_uneven_kept_counts(scored):
    """What DDP needs (tests/test_train.py runs it under torchrun, unfiltered): every rank the same number
    of full batches, from disjoint samples, though the filter left the shards uneven."""
    kept = _ranks_take_equal_steps(scored, {"min_clip_score": 0.24})
    assert len(kept) > 2 and len(set(kept)) > 1


def test_ranks_share_the_one_shard_a_filter_leaves(scored, tmp_path):
    """Fewer kept shards than ranks: both ranks read the shard, each taking every other *kept* sample."""
    build = tmp_path / "one"
    shutil.copytree(scored, build)
    table = pq.read_table(build / "index.parquet")
    rows = list(zip(table["key"].to_pylist(), table["shard"].to_pylist(), table["is_synthetic"].to_pylist()))
    shard = next(s for _, s, syn in rows if syn)
    kept = [k for k, s, syn in rows if syn and s == shard][:3]  # 3 of the shard's 7 samples
    _replace_column(build, table, "clip_score", pa.array([0.9 if k in kept else 0.1 for k, _, _ in rows]))
    assert _ranks_take_equal_steps(build, {"min_clip_score": 0.5}, batch_size=1) == [3]
    data = TrainingData.open(build, sample_filter=SampleFilter(min_clip_score=0.5))
    parts = [s._rank_parts(0) for s in _rank_streams(data, 1, 2)]
    assert [(p[0].stride, p[0].offset, p[0].num_samples) for p in parts] == [(2, 0, 2), (2, 1, 1)]


def test_a_null_score_counts_as_missing(scored, tmp_path):
    """A writer that stores a missing score as null rather than NaN: it never passes, and nothing crashes."""
    build = tmp_path / "nulls"
    shutil.copytree(scored, build)
    table = pq.read_table(build / "index.parquet")
    syn = [k for k, s in zip(table["key"].to_pylist(), table["is_synthetic"].to_pylist()) if s]
    clip = table["clip_score"].to_pylist()
    keys = table["key"].to_pylist()
    _replace_column(build, table, "clip_score", pa.array([None if k == syn[0] else v for k, v in zip(keys, clip)],
                                                         pa.float64()))
    nan = {k for k, v in zip(keys, clip) if v != v}  # the fixture's NaN one
    selection = TrainingData.open(build, sample_filter=SampleFilter(min_clip_score=0.0)).selection
    assert set().union(*selection.kept.values()) == set(syn) - {syn[0]} - nan and len(nan) == 1


def test_an_unknown_real_similarity_is_no_near_copy(scored, tmp_path):
    """`score` writes NaN real_similarity for a class without real training images: nothing to copy, so the
    near-copy filter keeps its samples (an unknown clip score, by contrast, never reaches a minimum)."""
    build = tmp_path / "nosim"
    shutil.copytree(scored, build)
    table = pq.read_table(build / "index.parquet")
    keys, sims = table["key"].to_pylist(), table["real_similarity"].to_pylist()
    target = next(k for k, v in zip(keys, sims) if v == v and v > 0.8)  # would be dropped at 0.8
    _replace_column(build, table, "real_similarity", pa.array([NAN if k == target else v for k, v in zip(keys, sims)]))
    selection = TrainingData.open(build, sample_filter=SampleFilter(max_real_similarity=0.8)).selection
    kept = set().union(*selection.kept.values())
    assert target in kept and kept == expected_synthetic(build, {"max_real_similarity": 0.8})


def test_the_kept_set_is_a_pure_function_of_the_index(scored, tmp_path):
    f = SampleFilter(min_clip_score=0.23, top_k_per_class=3)
    a = TrainingData.open(scored, sample_filter=f).selection
    copy = tmp_path / "copy"
    shutil.copytree(scored, copy)
    b = TrainingData.open(copy, sample_filter=f).selection  # another folder, the same index
    assert a.kept == b.kept and a.index_sha256 == b.index_sha256
    assert set().union(*a.kept.values()) == expected_synthetic(scored, f.model_dump())


def test_a_hub_build_is_filtered_from_its_published_index(scored, hub, tmp_path):  # noqa: F811 (the fixture)
    hub(scored, "org/scored", "v1")
    f = SampleFilter(max_real_similarity=0.8)
    remote = TrainingData.open("org/scored@v1", cache_dir=str(tmp_path / "cache"), sample_filter=f)
    assert remote.selection.kept == TrainingData.open(scored, sample_filter=f).selection.kept
    got = _all_keys(make_loader(remote, "synthetic", "train", 4, _tf(), train=False, return_keys=True))
    assert sorted(got) == sorted(expected_synthetic(scored, f.model_dump()))


# --------------------------------------------------------------------------- errors
def test_a_filter_on_an_unscored_build_says_to_score_it(unscored):
    message = r"index\.parquet has no column clip_score: run `fillup-data score OUT` first"
    with pytest.raises(FillupError, match=message):
        TrainingData.open(unscored, sample_filter=SampleFilter(min_clip_score=0.2))
    TrainingData.open(unscored, sample_filter=SampleFilter())  # no filter: no score needed


def test_class_confidence_without_a_classifier_is_an_error(unscored):
    write_scores(unscored, with_classifier=False)
    TrainingData.open(unscored, sample_filter=SampleFilter(min_clip_score=0.2))  # the other scores are there
    with pytest.raises(FillupError, match="class_confidence is NaN for every synthetic sample.*without a classifier"):
        TrainingData.open(unscored, sample_filter=SampleFilter(min_class_confidence=0.5))


def test_an_index_from_another_build_is_an_error(scored, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(scored, other)
    table = pq.read_table(other / "index.parquet")
    first = table["is_synthetic"].to_pylist().index(True)
    rest = pa.concat_tables([table.slice(0, first), table.slice(first + 1)])
    pq.write_table(rest, other / "index.parquet")  # one synthetic sample fewer than the manifest says
    with pytest.raises(FillupError, match="the index is not this build's"):
        TrainingData.open(other, sample_filter=SampleFilter(min_clip_score=0.2))


def test_an_index_with_a_class_the_manifest_lacks_is_an_error(scored, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(scored, other)
    table = pq.read_table(other / "index.parquet")
    labels = [9 + 5 * s for s in table["is_synthetic"].to_pylist()]  # synthetic rows say class 14 of 10
    pq.write_table(table.set_column(table.column_names.index("label"), "label", pa.array(labels, pa.int64())),
                   other / "index.parquet")
    with pytest.raises(FillupError, match=r"a synthetic sample of class 14, outside 0\.\.9; the index is not"):
        TrainingData.open(other, sample_filter=SampleFilter(top_k_per_class=1))


def test_a_filter_that_keeps_nothing_is_an_error(scored):
    data = TrainingData.open(scored, sample_filter=SampleFilter(min_clip_score=0.9))
    with pytest.raises(FillupError, match="keeps no synthetic sample; loosen it"):
        data.shards("synthetic", "train")
    assert data.shards("filled", "train")  # real ones are still there


def test_filter_values_are_checked():
    with pytest.raises(ValueError, match="min_class_confidence"):
        SampleFilter(min_class_confidence=1.5)
    with pytest.raises(ValueError, match="top_k_per_class"):
        SampleFilter(top_k_per_class=0)
    with pytest.raises(ValueError, match="min_clip_score"):
        SampleFilter(min_clip_score=float("nan"))


# --------------------------------------------------------------------------- the trainer
def _cli(*args) -> int:
    from fillup_data.cli import main

    return main([str(a) for a in args])


def _train(data: Path, out: Path, *extra) -> int:
    return _cli("train", "--data", data, "--config", DEMO_TRAIN, "--stage", "1", "--out", out, "--device", "cpu",
                "--set", "stage1.epochs=1", "--set", "stage1.warmup_epochs=0", "--set", "model.width=4",
                "--set", "stage1.batch_size=8", *extra)


def test_a_run_records_its_filter_and_what_it_kept(scored, tmp_path, capsys):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert _train(scored, run, "--min-clip-score", "0.22", "--set", "stage1.filter.top_k_per_class=3") == 0
    out = capsys.readouterr().out
    want = expected_synthetic(scored, {"min_clip_score": 0.22, "top_k_per_class": 3})
    rec = json.loads((run / "run.json").read_text())
    assert rec["config"]["stage1"]["filter"] == {"min_clip_score": 0.22, "max_real_similarity": None,
                                                 "min_class_confidence": None, "top_k_per_class": 3}
    sf = rec["synthetic_filter"]
    assert sf["kept"] == len(want) and sf["kept"] + sf["dropped"] == 40
    assert sum(g["kept"] for g in sf["by_group"].values()) == len(want)
    assert sf["index_sha256"] == hashlib.sha256((scored / "index.parquet").read_bytes()).hexdigest()
    assert f"kept {len(want)} of 40 synthetic samples (many 0/0, medium 0/0, few {len(want)}/40)" in out
    # the log counts what was read: real samples plus the kept synthetic ones, in whole batches
    log = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    index = pq.read_table(scored / "index.parquet").to_pandas()
    real = int(((~index.is_synthetic) & (index.split == "train")).sum())
    assert log["images"] == (real + len(want)) // 8 * 8

    # the same command resumes; with the index scored again (another ranking) it does not
    args = ("--min-clip-score", "0.22", "--set", "stage1.filter.top_k_per_class=3", "--resume")
    assert _train(scored, run, *args) == 0
    rescored, run2 = tmp_path / "rescored", tmp_path / "run2"
    shutil.copytree(scored, rescored)
    shutil.copytree(run, run2)
    table = pq.read_table(rescored / "index.parquet")
    _replace_column(rescored, table, "clip_score", pa.array([0.5 - v for v in table["clip_score"].to_pylist()]))
    capsys.readouterr()
    assert _train(rescored, run2, *args) == 2
    assert "is not the one this run's score filter read" in capsys.readouterr().err


def test_a_run_recorded_before_the_filter_field_still_resumes(scored, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert _train(scored, run) == 0
    rec = json.loads((run / "run.json").read_text())
    assert rec["synthetic_filter"] is None
    for stage in ("stage1", "stage2"):
        del rec["config"][stage]["filter"]  # what the code before the filter recorded
    del rec["synthetic_filter"]
    (run / "run.json").write_text(json.dumps(rec))
    assert _train(scored, run, "--resume") == 0


def test_filter_errors_at_the_command_line(unscored, tmp_path, capsys):
    assert _train(unscored, tmp_path / "r", "--min-clip-score", "0.2") == 2
    err = capsys.readouterr().err
    assert "index.parquet has no column clip_score: run `fillup-data score OUT` first" in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()
    assert _cli("train", "--data", unscored, "--config", DEMO_TRAIN, "--stage", "2", "--init", tmp_path,
                "--out", tmp_path / "r2", "--top-k-per-class", "5") == 2
    err = capsys.readouterr().err
    assert "stage2: filter: it keeps or drops synthetic samples, and this stage's data is real" in err
