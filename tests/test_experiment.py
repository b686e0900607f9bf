"""The Table 6 driver's protocol and aggregation, with the build/train/eval commands stubbed
(the commands themselves are tested end to end in test_build, test_synthesis and test_train)."""

import json

import fillup_data.experiment as experiment


def test_protocol_and_mean_std(tmp_path, monkeypatch):
    calls = []
    acc = {"ce": 40.0, "bs": 50.0, "fillup1": 55.0, "fillup2": 60.0}

    def fake_cli(args):
        args = [str(a) for a in args]
        calls.append(args)
        if args[0] == "train":
            out = args[args.index("--out") + 1]
            import pathlib

            pathlib.Path(out).mkdir(parents=True)
            (pathlib.Path(out) / "model.safetensors").write_bytes(b"x")
        if args[0] == "eval":
            run = args[args.index("--run") + 1]
            tag, seed = run.rsplit("/", 1)[1].split("-seed")
            seed = int(seed.split("-")[0])
            v = acc[tag] + seed  # seeds 0, 1, 2 -> mean acc + 1, std 1
            (tmp_path / "out" / "runs" / run.rsplit("/", 1)[1] / "metrics.json").write_text(
                json.dumps({"overall": v, "many": v + 10, "medium": v, "few": None}))

    monkeypatch.setattr(experiment, "_cli", fake_cli)
    monkeypatch.setattr(experiment, "synthetic_fidelity", lambda build: {"overall_both": 0.5, "chance": 1 / 64,
                                                                         "per_class": {}})
    (tmp_path / "out" / "build").mkdir(parents=True)
    (tmp_path / "out" / "build" / "manifest.json").write_text(json.dumps({"classes": [
        {"group": "many"}, {"group": "few"}]}))
    result = experiment.run(tmp_path / "r.yaml", tmp_path / "t.yaml", [0, 1, 2], tmp_path / "out", tmp_path / "res", [])
    trains = [c for c in calls if c[0] == "train"]
    assert len(trains) == 3 * 5  # CE, BS, Fill-Up I: one stage; Fill-Up I+II: two stages
    s2 = [c for c in trains if c[c.index("--stage") + 1] == "2"]
    assert len(s2) == 3 and all(c[c.index("--init") + 1].endswith(f"fillup2-seed{i}-stage1") for i, c in enumerate(s2))
    assert all("stage1.loss=cross_entropy" in c for c in trains if "ce-seed" in c[c.index("--out") + 1])
    assert all("stage1.data=real" in c for c in trains if "/bs-seed" in c[c.index("--out") + 1])
    row = result["table"]["Fill-Up Stage I + II + BS"]
    assert row["overall"]["mean"] == 61.0 and row["overall"]["std"] == 1.0 and row["many"]["mean"] == 71.0
    assert row["few"]["mean"] is None  # a group without classes stays empty, never NaN in JSON
    text = (tmp_path / "res" / "demo_experiment.md").read_text()
    assert "| CE baseline | 41.0 ± 1.0 | 51.0 ± 1.0 | 41.0 ± 1.0 | – |" in text
    json.loads((tmp_path / "res" / "demo_experiment.json").read_text())  # valid JSON (no NaN)
    # relaunching does not retrain finished runs
    calls.clear()
    experiment.run(tmp_path / "r.yaml", tmp_path / "t.yaml", [0, 1, 2], tmp_path / "out", tmp_path / "res", [])
    assert not [c for c in calls if c[0] == "train"]
