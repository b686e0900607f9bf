"""`fillup-data compare` (paper Table 1 layout from trained runs) and the `make compare` driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fillup_data.compare import compare_runs
from fillup_data.train.config import load_train_config

from tests.test_loader import write_fixture_build

ROOT = Path(__file__).resolve().parents[1]
COMPARE_TRAIN = ROOT / "recipes" / "train" / "compare.yaml"


def _cli(*args) -> int:
    from fillup_data.cli import main

    return main([str(a) for a in args])


def strategy_build(out: Path, strategy: str, guidance: float, names=None) -> Path:
    """A build in the contract layout whose manifest's recipe names its generator, as `build` writes it."""
    write_fixture_build(out, real=[30, 12, 4], synthetic=[0, 18, 26], names=names)
    m = json.loads((out / "manifest.json").read_text())
    m["recipe"]["generator"] = {"strategy": strategy, "guidance_scale": guidance, "model": "builtin:toyworld"}
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def fake_run(run: Path, build: Path, seed: int, acc: dict, *, stage: int = 1, overrides=(), evaluated=True,
             finished=True) -> Path:
    """A run folder as `fillup-data train` + `eval` leave it: run.json (the trainer's record), the final
    weights and metrics.json; the accuracies are set, so the table's arithmetic can be checked."""
    cfg = load_train_config(COMPARE_TRAIN, [f"seed={seed}", *overrides])
    manifest = json.loads((build / "manifest.json").read_text())
    run.mkdir(parents=True)
    record = {
        "stage": stage, "config": cfg.model_dump(mode="json"), "data": str(build), "real_data": None,
        "builds": {r: {"where": str(build.resolve() / "manifest.json"), "name": build.name, "version": "1.0.0",
                       "fingerprint": "f" * 64} for r in ("real", "synthetic")},
        "class_names": [c["name"] for c in manifest["classes"]],
        "real_counts": [c["real"] for c in manifest["classes"]],
        "groups": manifest["groups"], "init": None, "synthetic_filter": None, "world_size": 1,
    }
    (run / "run.json").write_text(json.dumps(record))
    if finished:
        (run / "model.safetensors").write_bytes(b"weights")
    if evaluated:
        metrics = {"overall": acc["overall"], "top1": acc["overall"], "top5": acc.get("top5", 99.0),
                   "many": acc["many"], "medium": acc["medium"], "few": acc["few"], "num_test_samples": 12,
                   "num_classes": 3, "unit": "percent"}
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _acc(v: float, few=None) -> dict:
    return {"overall": v, "many": v + 10, "medium": v, "few": few}


@pytest.fixture
def builds(tmp_path):
    return {
        "st": strategy_build(tmp_path / "b-st", "single_template", 3.0),
        "st1": strategy_build(tmp_path / "b-st1", "single_template", 1.0),
        "ti": strategy_build(tmp_path / "b-ti", "textual_inversion", 3.0),
    }


# --------------------------------------------------------------------------- the table
def test_rows_are_strategies_with_mean_and_std_over_seeds(tmp_path, builds):
    runs = [fake_run(tmp_path / f"ti-{s}", builds["ti"], s, _acc(60.0 + s, few=40.0 + 2 * s)) for s in (0, 1, 2)]
    runs += [fake_run(tmp_path / f"st-{s}", builds["st"], s, _acc(50.0 + 2 * s)) for s in (0, 1)]
    table = compare_runs(runs)
    assert [r["label"] for r in table["rows"]] == ["single_template", "textual_inversion"]  # Table 1's order
    st, ti = table["rows"]
    assert st["seeds"] == [0, 1] and ti["seeds"] == [0, 1, 2]
    assert ti["overall"]["mean"] == 61.0 and ti["overall"]["std"] == 1.0 and ti["many"]["mean"] == 71.0
    assert ti["few"]["mean"] == 42.0 and ti["few"]["std"] == 2.0
    assert st["few"]["mean"] is None  # a group with no accuracy in any run stays empty
    assert st["overall"]["mean"] == 51.0 and st["overall"]["std"] == pytest.approx(2 ** 0.5)
    assert table["groups"] == {"many": 0, "medium": 1, "few": 2}


def test_guidance_joins_the_label_only_where_one_strategy_has_several(tmp_path, builds, capsys):
    runs = [fake_run(tmp_path / f"st3-{s}", builds["st"], s, _acc(50.0)) for s in (0, 1)]
    runs += [fake_run(tmp_path / f"st1-{s}", builds["st1"], s, _acc(55.0)) for s in (0, 1)]
    runs += [fake_run(tmp_path / "ti-0", builds["ti"], 0, _acc(60.0))]
    assert _cli("compare", *runs) == 0
    out = capsys.readouterr().out
    assert "| strategy | runs (seeds) | overall | many | medium | few | top-5 |" in out
    assert "| single_template (guidance 1) | 2 (0, 1) | 55.0 ± 0.0 | 65.0 ± 0.0 | 55.0 ± 0.0 | – | 99.0 ± 0.0 |" in out
    assert "| single_template (guidance 3) | 2 (0, 1) | 50.0 ± 0.0 |" in out
    assert "| textual_inversion | 1 (0) | 60.0 ± 0.0 |" in out
    assert _cli("compare", *runs, "--format", "json") == 0
    table = json.loads(capsys.readouterr().out)
    assert [(r["strategy"], r["guidance_scale"]) for r in table["rows"]] == [
        ("single_template", 1.0), ("single_template", 3.0), ("textual_inversion", 3.0)]
    assert table["rows"][0]["few"]["mean"] is None  # JSON null, never NaN


def test_other_differences_get_rows_of_their_own(tmp_path, builds):
    """A filtered and an unfiltered run of one strategy are two rows, labelled with what differs; a run that
    trained on real data only is not credited to the build's strategy."""
    runs = [fake_run(tmp_path / "ti", builds["ti"], 0, _acc(60.0)),
            fake_run(tmp_path / "ti-top", builds["ti"], 0, _acc(62.0), overrides=["stage1.filter.top_k_per_class=5"]),
            fake_run(tmp_path / "real", builds["ti"], 0, _acc(40.0), overrides=["stage1.data=real"])]
    labels = [r["label"] for r in compare_runs(runs)["rows"]]
    assert labels[0].startswith("real data only")
    assert labels[1:] == ["textual_inversion (stage1.filter.top_k_per_class=None)",
                          "textual_inversion (stage1.filter.top_k_per_class=5)"]


def test_builds_made_another_way_are_other_rows_and_build_seeds_are_repeats(tmp_path):
    """Table 1 has two language-model columns (T5, Flan-T5): runs on builds whose generator differs are two
    rows, labelled with what differs; builds that differ only in their seed are repeats of one row."""
    def lm_build(name, model, seed=0):
        out = strategy_build(tmp_path / name, "lm_prompts", 1.0)
        m = json.loads((out / "manifest.json").read_text())
        m["recipe"]["generator"]["language_model"] = {"model": model, "num_prompts": 50}
        m["recipe"]["seed"] = seed
        (out / "manifest.json").write_text(json.dumps(m))
        return out

    t5, flan, t5_again = lm_build("t5", "t5-common-gen"), lm_build("flan", "flan-alpaca"), lm_build("t5b", "t5-common-gen", 1)
    runs = [fake_run(tmp_path / "r-t5", t5, 0, _acc(50.0)), fake_run(tmp_path / "r-flan", flan, 0, _acc(55.0)),
            fake_run(tmp_path / "r-t5b", t5_again, 1, _acc(52.0))]
    rows = compare_runs(runs)["rows"]
    assert [(r["label"], r["seeds"]) for r in rows] == [
        ("lm_prompts (generator.language_model.model=t5-common-gen)", [0, 1]),
        ("lm_prompts (generator.language_model.model=flan-alpaca)", [0])]


def test_a_run_recorded_before_a_config_field_existed_shares_the_row(tmp_path, builds):
    """run.json of an older release lacks stage1.filter: read through today's schema, it is the same
    experiment as a new run with the default, so the two seeds form one row."""
    old = fake_run(tmp_path / "old", builds["ti"], 0, _acc(60.0))
    record = json.loads((old / "run.json").read_text())
    del record["config"]["stage1"]["filter"]
    (old / "run.json").write_text(json.dumps(record))
    rows = compare_runs([old, fake_run(tmp_path / "new", builds["ti"], 1, _acc(62.0))])["rows"]
    assert [(r["label"], r["seeds"]) for r in rows] == [("textual_inversion", [0, 1])]


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("case,message", [
    ("missing", "no such run folder"),
    ("not_a_run", "no run.json; pass the --out folder of `fillup-data train`"),
    ("unfinished", "training has not finished (no model.safetensors)"),
    ("not_evaluated", "no metrics.json; evaluate it first: `fillup-data eval --data BUILD --run RUN`"),
    ("twice", "given twice"),
    ("same_seed", "are the same experiment with the same seed (0)"),
    ("other_classes", "were trained on different class lists"),
    ("build_gone", "cannot read the build it trained on"),
    ("no_strategy", "names no recipe.generator.strategy"),
])
def test_what_is_not_a_finished_comparable_run_is_a_clear_error(tmp_path, builds, capsys, case, message):
    good = fake_run(tmp_path / "good", builds["st"], 0, _acc(50.0))
    runs = [good]
    if case == "missing":
        runs.append(tmp_path / "nope")
    elif case == "not_a_run":
        (tmp_path / "empty").mkdir()
        runs.append(tmp_path / "empty")
    elif case == "unfinished":
        runs.append(fake_run(tmp_path / "r", builds["st"], 1, _acc(50.0), finished=False, evaluated=False))
    elif case == "not_evaluated":
        runs.append(fake_run(tmp_path / "r", builds["st"], 1, _acc(50.0), evaluated=False))
    elif case == "twice":
        runs.append(tmp_path / "." / "good")
    elif case == "same_seed":
        runs.append(fake_run(tmp_path / "r", builds["st"], 0, _acc(52.0)))
    elif case == "other_classes":
        other = strategy_build(tmp_path / "b-other", "single_template", 3.0, names=["a", "b", "c"])
        runs.append(fake_run(tmp_path / "r", other, 1, _acc(50.0)))
    elif case == "build_gone":
        b = strategy_build(tmp_path / "b-gone", "single_template", 3.0)
        runs.append(fake_run(tmp_path / "r", b, 1, _acc(50.0)))
        (b / "manifest.json").unlink()
    elif case == "no_strategy":
        b = write_fixture_build(tmp_path / "b-plain", real=[30, 12, 4], synthetic=[0, 18, 26])
        runs.append(fake_run(tmp_path / "r", b, 1, _acc(50.0)))
    assert _cli("compare", *runs) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --------------------------------------------------------------------------- recipes and the driver
@pytest.mark.parametrize("name", ["single_template", "clip_templates", "textual_inversion"])
def test_compare_recipes_share_the_demo_source_and_differ_in_strategy(name):
    from fillup_data.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "compare" / f"{name}.yaml")
    demo = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert r.generator.strategy == name
    fields = ("kind", "num_classes", "max_images", "min_images", "image_size")
    assert [getattr(r.source, f) for f in fields] == [getattr(demo.source, f) for f in fields]
    assert (r.generator.model, r.generator.resolution, r.generator.guidance_scale) == ("builtin:toyworld", 32, 3.0)
    assert (r.fill.policy, r.fill.target) == ("addon", 100)  # every class gets its own synthetic images


def test_the_compare_train_recipe_trains_on_synthetic_images_only():
    cfg = load_train_config(COMPARE_TRAIN)
    assert cfg.stage1.data == "synthetic" and cfg.stage1.loss == "cross_entropy"


TINY_BUILD = ["source.max_images=6", "source.min_images=2", "source.test_per_class=2", "fill.target=3",
              "generator.num_inference_steps=2", "generator.batch_size=8", "shards.max_samples=16",
              "inversion.min_steps=2", "inversion.max_steps=2", "inversion.checkpoint_every=1"]
TINY_TRAIN = ["stage1.epochs=1", "stage1.warmup_epochs=0", "stage1.batch_size=8", "model.width=4"]


@pytest.mark.slow
def test_the_driver_builds_trains_evaluates_and_tabulates_then_resumes(tmp_path, monkeypatch, capsys):
    """`make compare` at a tiny scale: two strategies (real builds with toyworld, real training and
    evaluation), two seeds, the table and its provenance written; relaunching trains nothing again."""
    import fillup_data.demo.experiment_steps as steps
    from fillup_data.demo import compare_experiment

    recipes = [ROOT / "recipes" / "compare" / f"{n}.yaml" for n in ("single_template", "textual_inversion")]
    args = ["--recipes", *map(str, recipes), "--train-config", str(COMPARE_TRAIN), "--seeds", "0", "1",
            "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results")]
    for o in TINY_BUILD:
        args += ["--set", o]
    for o in TINY_TRAIN:
        args += ["--train-set", o]
    monkeypatch.chdir(ROOT)
    assert compare_experiment.main(args) == 0
    md = (tmp_path / "results" / "compare.md").read_text()
    result = json.loads((tmp_path / "results" / "compare.json").read_text())
    assert md.startswith(f"{result['provenance']['date']}, commit ")
    assert "`python -m fillup_data.demo.compare_experiment" in md
    rows = result["table"]["rows"]
    assert [(r["label"], r["seeds"]) for r in rows] == [("single_template", [0, 1]), ("textual_inversion", [0, 1])]
    for r in rows:
        assert all(0.0 <= v <= 100.0 for v in r["overall"]["values"])
        for run in r["runs"]:
            rec = json.loads((Path(run) / "run.json").read_text())
            assert rec["config"]["stage1"]["data"] == "synthetic" and rec["config"]["stage1"]["epochs"] == 1
    assert set(result["fidelity"]) == {"single_template", "textual_inversion"}
    assert "| textual_inversion | 2 (0, 1) |" in md
    # the table is what `fillup-data compare` prints for the same runs
    capsys.readouterr()
    assert _cli("compare", *[run for r in rows for run in r["runs"]]) == 0
    assert capsys.readouterr().out.strip() in md
    # relaunch: builds resume (nothing to do), finished runs are not trained again
    trained = []
    real_cli = steps.run_cli
    monkeypatch.setattr(steps, "run_cli", lambda a: (trained.append(a) if a[0] == "train" else None, real_cli(a)))
    assert compare_experiment.main(args) == 0
    assert trained == []
