"""The Table 6 driver's protocol and aggregation, with the build/train/eval commands stubbed
(the commands themselves are tested end to end in test_build, test_synthesis and test_train)."""

import json
from pathlib import Path

import pytest

import fillup_data.demo.experiment as experiment
import fillup_data.demo.experiment_steps as experiment_steps


def test_protocol_and_mean_std(tmp_path, monkeypatch):
    calls, builds = [], []
    acc = {"ce": 40.0, "bs": 50.0, "fillup1": 55.0, "fillup2": 60.0}

    def fake_cli(args):
        args = [str(a) for a in args]
        calls.append(args)
        if args[0] == "train":
            out = args[args.index("--out") + 1]
            import pathlib

            pathlib.Path(out).mkdir(parents=True)
            (pathlib.Path(out) / "model.safetensors").write_bytes(b"x")
        if args[0] == "build":
            import pathlib

            assert args[-2:] == ["--set", f"seed={args[args.index('--out') + 1].rsplit('seed', 1)[1]}"]
            builds.append(args[args.index("--out") + 1])
            pathlib.Path(builds[-1]).mkdir(parents=True, exist_ok=True)
            (pathlib.Path(builds[-1]) / "manifest.json").write_text(json.dumps({"classes": [
                {"group": "many"}, {"group": "few"}]}))
        if args[0] == "eval":
            run = args[args.index("--run") + 1]
            build_dir, name = run.rsplit("/", 2)[1:]
            tag, seed = name.split("-seed")
            seed = int(seed.split("-")[0])
            v = acc[tag] + seed + 3 * int(build_dir.removeprefix("build"))  # builds 0, 1: +0, +3
            (Path(run) / "metrics.json").write_text(json.dumps({"overall": v, "many": v + 10, "medium": v, "few": None}))

    monkeypatch.setattr(experiment_steps, "run_cli", fake_cli)
    fid = {"red circle": {"n": 10, "group": "many", "real": 50, "both": 0.5, "shape": 0.6, "colour": 0.9}}
    monkeypatch.setattr(experiment, "synthetic_fidelity", lambda build: {
        "overall_both": 0.5 if build.name == "seed0" else 1.0, "chance": 1 / 64,
        "per_class": fid if build.name == "seed0" else {"red circle": {**fid["red circle"], "n": 30, "both": 1.0}}})
    run = lambda: experiment.run(tmp_path / "r.yaml", tmp_path / "t.yaml", [0, 1, 2], tmp_path / "out",  # noqa: E731
                                 tmp_path / "res", [], build_seeds=[0, 1])
    result = run()
    assert builds == [str(tmp_path / "out" / "builds" / "seed0"), str(tmp_path / "out" / "builds" / "seed1")]
    trains = [c for c in calls if c[0] == "train"]
    assert len(trains) == 2 * 3 * 5  # per build: CE, BS, Fill-Up I: one stage; Fill-Up I+II: two stages
    assert all(c[c.index("--data") + 1].endswith("seed" + c[c.index("--out") + 1].split("/build")[-1][0]) for c in trains)
    s2 = [c for c in trains if c[c.index("--stage") + 1] == "2"]
    assert len(s2) == 6 and all(c[c.index("--init") + 1].endswith(f"fillup2-seed{i % 3}-stage1") for i, c in enumerate(s2))
    assert all("stage1.loss=cross_entropy" in c for c in trains if "/ce-seed" in c[c.index("--out") + 1])
    assert all("stage1.data=real" in c for c in trains if "/bs-seed" in c[c.index("--out") + 1])
    row = result["table"]["Fill-Up Stage I + II + BS"]
    # 6 runs: 60, 61, 62 (build 0) and 63, 64, 65 (build 1)
    assert row["overall"]["mean"] == 62.5 and row["overall"]["std"] == pytest.approx(1.8708, abs=1e-4)
    assert row["many"]["mean"] == 72.5 and len(row["overall"]["values"]) == 6
    assert row["few"]["mean"] is None  # a group without classes stays empty, never NaN in JSON
    assert result["build_means"]["CE baseline"] == {"0": 41.0, "1": 44.0}
    # fidelity over both builds' images: (10 * 0.5 + 30 * 1.0) / 40
    assert result["fidelity"]["overall_both"] == pytest.approx(35 / 40)
    assert result["fidelity"]["per_class"]["red circle"]["n"] == 40
    text = (tmp_path / "res" / "demo_experiment.md").read_text()
    assert "| CE baseline | 42.5 ± 1.9 | 52.5 ± 1.9 | 42.5 ± 1.9 | – |" in text
    assert "| CE baseline | 41.0 | 44.0 |" in text and "(per build seed: 0.500, 1.000)" in text
    assert text.startswith(f"{result['provenance']['date']}, commit ") and "`python -m fillup_data.demo.experiment" in text
    json.loads((tmp_path / "res" / "demo_experiment.json").read_text())  # valid JSON (no NaN)
    # relaunching does not retrain finished runs
    calls.clear()
    run()
    assert not [c for c in calls if c[0] == "train"]


def test_synthetic_fidelity_scores_each_class_of_a_real_build(tmp_path, monkeypatch, capsys):
    """The README's fidelity table: a real build (demo source, single_template on toyworld) whose sampler
    is replaced by the world's own drawing, so each class's true rate is known; green square and purple
    square come out as circles (shape wrong, colour right)."""
    from fillup_data.build import run_build
    from fillup_data.recipe import load_recipe

    from tests.test_toyworld import patch_world_oracle

    patch_world_oracle(monkeypatch, {("square", "green"): "circle", ("square", "purple"): "circle"})
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes" / "demo.yaml", [
        "source.max_images=6", "source.min_images=2", "source.test_per_class=1", "fill.target=6",
        "generator.strategy=single_template", "generator.prompt=a photo of a {class_name}",
        "generator.num_inference_steps=1", "shards.max_samples=7",
    ])
    build = tmp_path / "build"
    run_build(recipe, build, workers=1, progress=False, log=lambda *a: None)
    fid = experiment.synthetic_fidelity(build)
    per = fid["per_class"]
    # real counts 6, 5, 4, 4, 3, 3, 2, 2, 2, 2 filled to 6: red circle has no synthetic image and no row
    assert [(k, v["n"], v["real"]) for k, v in per.items()] == [
        ("green square", 1, 5), ("blue triangle", 2, 4), ("yellow cross", 2, 4), ("purple ring", 3, 3),
        ("cyan star", 3, 3), ("white diamond", 4, 2), ("orange hexagon", 4, 2), ("yellow circle", 4, 2),
        ("purple square", 4, 2)]
    for name, v in per.items():
        wrong = name in ("green square", "purple square")
        assert (v["both"], v["shape"], v["colour"]) == ((0.0, 0.0, 1.0) if wrong else (1.0, 1.0, 1.0)), name
        assert v["group"] == "few"
    assert fid["overall_both"] == pytest.approx(22 / 27)  # over images (27 - 1 - 4 of 27), not over classes (7/9)
    # the README's demo number comes from this command
    assert experiment.main(["--fidelity-of", str(build)]) == 0
    out = capsys.readouterr().out
    assert "0.815 overall." in out and "| green square | few | 5 | 1 | 0.00 | 0.00 | 1.00 |" in out
