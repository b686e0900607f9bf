"""Trainer, schedules, models, evaluation; end-to-end Stage I -> Stage II -> eval; DDP under torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fillup_data.errors import FillupError
from fillup_data.train.config import STAGE2_DEFAULTS, TrainConfig, load_train_config, parse_train_config
from fillup_data.train import checkpoint as ckpt_mod
from fillup_data.train import trainer as trainer_mod
from fillup_data.train.checkpoint import last_good_checkpoint, load_checkpoint, save_checkpoint
from fillup_data.train.evaluate import ClassTallies, summarize, write_per_class_csv
from fillup_data.train.models import build_model, classifier_of, load_weights
from fillup_data.train.schedule import learning_rate

from tests.test_loader import write_fixture_build

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN = ROOT / "recipes" / "train" / "demo.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for these small models; the previous count is restored for the next test file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- config and schedules
def test_defaults_are_the_papers_schedule():
    cfg = TrainConfig()
    s1, s2 = cfg.stage1, cfg.stage2
    assert (s1.data, s1.epochs, s1.batch_size, s1.lr, s1.momentum, s1.step_size, s1.gamma) == (
        "filled", 100, 256, 0.1, 0.9, 30, 0.1)
    assert (s2.data, s2.epochs, s2.lr, s2.step_size, s2.warmup_epochs, s2.train) == ("real", 30, 1e-3, 10, 5, "all")
    assert s1.loss == s2.loss == "balanced_softmax"
    assert cfg.model.arch == "resnet50" and cfg.data.image_size == 224 and cfg.data.eval_resize == 256


def test_partial_stage2_keeps_stage2_defaults():
    cfg = parse_train_config({"stage2": {"train": "classifier"}})
    assert cfg.stage2.train == "classifier"
    assert {k: getattr(cfg.stage2, k) for k in STAGE2_DEFAULTS} == STAGE2_DEFAULTS


def test_bad_config_names_the_field(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("stage1: {lr: -1, epochz: 3}\n")
    with pytest.raises(FillupError) as e:
        load_train_config(p)
    assert "stage1.lr" in str(e.value) and "stage1.epochz: unknown field" in str(e.value)
    with pytest.raises(FillupError, match="warmup_epochs"):
        load_train_config(DEMO_TRAIN, ["stage2.warmup_epochs=9", "stage2.epochs=3"])


@pytest.mark.parametrize("name", ["demo", "imagenet_lt", "places_lt", "inat2018", "cifar100_lt"])
def test_shipped_train_recipes_validate(name):
    cfg = load_train_config(ROOT / "recipes" / "train" / f"{name}.yaml")
    assert cfg.stage2.data == "real"


def test_stage2_step_schedule_with_warmup():
    s2 = TrainConfig().stage2  # lr 1e-3, x0.1 every 10 epochs, 5 warm-up epochs, 30 epochs
    iters = 10
    lrs = [learning_rate(s2, e, i, iters) for e in range(30) for i in range(iters)]
    assert lrs[0] == pytest.approx(1e-3 / 50) and lrs[49] == pytest.approx(1e-3)  # linear ramp over 5 epochs
    assert all(a < b for a, b in zip(lrs[:49], lrs[1:50]))
    assert learning_rate(s2, 9, 9, iters) == pytest.approx(1e-3)
    assert learning_rate(s2, 10, 0, iters) == pytest.approx(1e-4)
    assert learning_rate(s2, 29, 9, iters) == pytest.approx(1e-5)


def test_stage1_and_cosine_schedules():
    s1 = TrainConfig().stage1
    assert [learning_rate(s1, e, 0, 5) for e in (0, 29, 30, 60, 99)] == pytest.approx([0.1, 0.1, 0.01, 1e-3, 1e-4])
    cos = load_train_config(ROOT / "recipes/train/inat2018.yaml").stage2
    assert learning_rate(cos, 0, 0, 10) == pytest.approx(0.01)
    assert learning_rate(cos, 200, 0, 10) == pytest.approx(0.005)
    assert learning_rate(cos, 399, 9, 10) < 1e-6


# --------------------------------------------------------------------------- models
def test_models_by_name_and_cifar_stem():
    x = torch.randn(2, 3, 32, 32)
    assert build_model("tiny_cnn", 7)(x).shape == (2, 7)
    r = build_model("resnet18", 5, cifar_stem=True)
    assert r.conv1.stride == (1, 1) and isinstance(r.maxpool, torch.nn.Identity)
    assert r(x).shape == (2, 5)
    with pytest.raises(FillupError, match="not a torchvision"):
        build_model("resnet51", 5)


def test_init_from_weights_skips_a_mismatched_head(tmp_path):
    src = build_model("resnet18", 1000)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = build_model("resnet18", 10)
    left = load_weights(dst, path)
    assert left == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(FillupError, match="safetensors"):
        load_weights(dst, tmp_path / "x.pth")
    assert classifier_of(dst) is dst.fc


# --------------------------------------------------------------------------- metrics
def test_group_accuracy_is_the_mean_of_per_class_accuracies():
    t = ClassTallies(total=np.array([100, 10, 10, 10, 0]), top1=np.array([90, 5, 10, 0, 0]),
                     top5=np.array([100, 10, 10, 5, 0]))
    m = summarize(t, ["many", "medium", "few", "few", "few"])
    assert m["overall"] == pytest.approx(105 / 130 * 100)  # over samples
    assert m["many"] == pytest.approx(90.0)
    assert m["medium"] == pytest.approx(50.0)
    assert m["few"] == pytest.approx(50.0)  # (100 + 0) / 2: the class with no test image is left out
    assert m["top5"] == pytest.approx(125 / 130 * 100)
    assert m["classes_without_test_samples"] == 1
    assert summarize(t, ["few"] * 5)["many"] is None


def test_per_class_csv_neutralises_spreadsheet_formulas(tmp_path):
    # class names come from a downloaded manifest: a spreadsheet must not run them (OWASP CSV injection)
    names = ['=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(A1)", "\tx", "\rx", 'plain, "quoted"', "blue ring"]
    n = len(names)
    t = ClassTallies(total=np.full(n, 4), top1=np.arange(n) % 5, top5=np.full(n, 4))
    path = tmp_path / "per_class.csv"
    write_per_class_csv(path, t, names, list(range(n)), ["few"] * n)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + n
    got = [r[1] for r in rows[1:]]
    assert got[:6] == ["'" + name for name in names[:6]]
    assert got[6:] == names[6:]  # ordinary names (commas and quotes included) round-trip unchanged
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(n)] and rows[1][6] == "0.0000"


# --------------------------------------------------------------------------- checkpoints
def _tiny_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_a_damaged_checkpoint_counts_as_not_done(tmp_path):
    run = tmp_path / "run"
    for epoch in (0, 1):
        model, opt = _tiny_state(epoch)
        save_checkpoint(run, epoch, model, opt, {"step": 10 * (epoch + 1)})
    warnings: list[str] = []
    assert last_good_checkpoint(run, warnings.append).path.name == "epoch-0001" and not warnings
    # an empty state.json, as a power cut leaves it on a filesystem that reorders writes
    (run / "checkpoint" / "epoch-0001" / "state.json").write_bytes(b"")
    good = last_good_checkpoint(run, warnings.append)
    assert good.path.name == "epoch-0000" and good.scalars["step"] == 10
    assert len(warnings) == 1 and "epoch-0001" in warnings[0] and "state.json" in warnings[0]
    # the fallback loads completely: weights and momentum of epoch 0
    model, opt = _tiny_state(5)
    assert load_checkpoint(good, model, opt)["epoch"] == 0
    assert torch.equal(model.weight, _tiny_state(0)[0].weight)
    # a truncated tensor file too: nothing readable is left, so the stage starts again
    weights = run / "checkpoint" / "epoch-0000" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    warnings.clear()
    assert last_good_checkpoint(run, warnings.append) is None
    assert "model.safetensors" in warnings[1] and "starts again" in warnings[-1]
    # a truncated optimizer file is caught the same way
    model, opt = _tiny_state(0)
    save_checkpoint(run, 2, model, opt, {"step": 30})
    opt_file = run / "checkpoint" / "epoch-0002" / "optimizer.pt"
    opt_file.write_bytes(opt_file.read_bytes()[:100])
    warnings.clear()
    assert last_good_checkpoint(run, warnings.append) is None and "optimizer.pt" in warnings[0]


def test_checkpoint_files_and_folders_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    monkeypatch.setattr(ckpt_mod.os, "fsync", recording_fsync)
    model, opt = _tiny_state(0)
    final = save_checkpoint(tmp_path / "run", 0, model, opt, {"step": 1})
    tmp = final.parent / ".epoch-0000.tmp"
    for name in ("model.safetensors.tmp", "optimizer.pt", "state.json.tmp"):
        assert str(tmp / name) in synced, (name, synced)  # the data, before its rename
    assert str(tmp) in synced and str(final.parent) in synced  # the renames themselves
    assert synced.index(str(tmp / "optimizer.pt")) < synced.index(str(final.parent))


# --------------------------------------------------------------------------- end to end
def _cli(*args: str) -> int:
    from fillup_data.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    """The real demo build (issue 2's builder) with several shards, or a fixture build until it exists."""
    out = tmp_path_factory.mktemp("demo") / "build"
    try:
        from fillup_data.build import run_build
        from fillup_data.recipe import load_recipe
    except ImportError:
        return write_fixture_build(out, real=[60, 30, 15, 8, 4], synthetic=[0, 30, 45, 52, 56], test=10,
                                   shard_size=40, size=32)
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["generator.strategy=none", "shards.max_samples=100"])
    run_build(recipe, out, workers=1, progress=False, log=lambda *a: None)
    return out


@pytest.mark.slow
def test_stage1_stage2_eval_end_to_end(demo_build, tmp_path):
    cfg = str(DEMO_TRAIN)
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    assert _cli("train", "--data", str(demo_build), "--config", cfg, "--stage", "1", "--out", str(run1),
                "--device", "cpu") == 0
    assert (run1 / "model.safetensors").is_file()
    log = [json.loads(line) for line in (run1 / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == list(range(1, 7)) and log[-1]["loss"] < log[0]["loss"]
    assert _cli("train", "--data", str(demo_build), "--config", cfg, "--stage", "2", "--init", str(run1),
                "--out", str(run2), "--device", "cpu") == 0
    assert _cli("eval", "--data", str(demo_build), "--run", str(run2), "--device", "cpu") == 0
    m = json.loads((run2 / "metrics.json").read_text())
    for key in ("overall", "many", "medium", "few", "top1", "top5"):
        assert key in m
    assert m["overall"] > 30.0  # 10 classes: chance is 10%
    rows = (run2 / "per_class.csv").read_text().splitlines()
    assert len(rows) == 1 + m["num_classes"]
    assert (run2 / "per_class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # Stage II started from Stage I: a re-run of the same command refuses to overwrite
    assert _cli("train", "--data", str(demo_build), "--config", cfg, "--stage", "2", "--init", str(run1),
                "--out", str(run2)) == 2


def test_stage2_needs_a_finished_stage1(demo_build, tmp_path, capsys):
    args = ["train", "--data", str(demo_build), "--config", str(DEMO_TRAIN), "--stage", "2", "--out", str(tmp_path / "r")]
    assert _cli(*args) == 2
    assert "--init" in capsys.readouterr().err
    (tmp_path / "s1").mkdir()
    assert _cli(*args, "--init", str(tmp_path / "s1")) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def _train_short(data: Path, out: Path, *extra: str) -> int:
    return _cli("train", "--data", str(data), "--config", str(DEMO_TRAIN), "--stage", "1", "--out", str(out),
                "--device", "cpu", "--set", "stage1.epochs=3", "--set", "stage1.step_size=2",
                "--set", "model.width=8", *extra)


def _log_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def epochs_trained(monkeypatch):
    """The (0-based) epochs the trainer actually runs, seen from inside its loop."""
    seen: list[int] = []
    real = trainer_mod.learning_rate

    def spy(stage, epoch, it, iters):
        if it == 0:
            seen.append(epoch)
        return real(stage, epoch, it, iters)

    monkeypatch.setattr(trainer_mod, "learning_rate", spy)
    return seen


@pytest.mark.slow
def test_resume_repeats_an_uninterrupted_run_exactly(demo_build, tmp_path, epochs_trained, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train_short(demo_build, full) == 0
    assert _train_short(demo_build, cut) == 0
    assert epochs_trained == [0, 1, 2, 0, 1, 2]
    want = load_file(str(full / "model.safetensors"))

    def same_weights() -> bool:
        got = load_file(str(cut / "model.safetensors"))
        return want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    # a crash after the last epoch's log line but before its checkpoint and the final weights
    shutil.rmtree(cut / "checkpoint" / "epoch-0002")
    (cut / "model.safetensors").unlink()
    assert _train_short(demo_build, cut) == 2  # refuses to clobber without --resume
    epochs_trained.clear()
    assert _train_short(demo_build, cut, "--resume") == 0
    assert epochs_trained == [2]  # epochs 1 and 2 were not trained again
    assert _log_epochs(cut) == [1, 2, 3]  # one line per epoch, the re-run one not doubled
    assert same_weights()
    # a power cut that left the newest checkpoint's state.json empty: resume warns, falls back
    (cut / "checkpoint" / "epoch-0002" / "state.json").write_bytes(b"")
    (cut / "model.safetensors").unlink()
    capsys.readouterr()
    epochs_trained.clear()
    assert _train_short(demo_build, cut, "--resume") == 0
    assert "skipping damaged checkpoint epoch-0002" in capsys.readouterr().out
    assert epochs_trained == [2] and _log_epochs(cut) == [1, 2, 3] and same_weights()
    # a crash between the checkpoint and its log line: the line comes back from the checkpoint
    lines = (cut / "log.jsonl").read_text().splitlines()
    (cut / "log.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])  # a torn last line
    epochs_trained.clear()
    assert _train_short(demo_build, cut, "--resume") == 0
    assert epochs_trained == [] and _log_epochs(cut) == [1, 2, 3]
    assert json.loads((cut / "log.jsonl").read_text().splitlines()[2]) == json.loads(lines[2])
    # a resume with another recipe is refused
    assert _train_short(demo_build, cut, "--resume", "--set", "stage1.lr=0.3") == 2


@pytest.mark.slow
def test_classifier_only_stage2_freezes_the_features(demo_build, tmp_path):
    run1, run2 = tmp_path / "r1", tmp_path / "r2"
    assert _train_short(demo_build, run1, "--set", "stage1.epochs=1") == 0
    assert _cli("train", "--data", str(demo_build), "--config", str(DEMO_TRAIN), "--stage", "2", "--init", str(run1),
                "--out", str(run2), "--device", "cpu", "--set", "model.width=8", "--set", "stage2.epochs=2",
                "--set", "stage2.train=classifier", "--set", "stage2.lr=0.05") == 0
    a, b = load_file(str(run1 / "model.safetensors")), load_file(str(run2 / "model.safetensors"))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BatchNorm running statistics stay frozen too


# --------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from fillup_data.loader import TrainingData, make_loader, eval_transform
    from fillup_data.train.distributed import init_distributed, all_reduce_sum, shutdown

    env = init_distributed("cpu")
    data = TrainingData.open(sys.argv[1])
    loader = make_loader(data, "filled", "train", 8, eval_transform(16, 16), seed=0, rank=env.rank,
                         world_size=env.world_size, return_keys=True)
    steps, keys = 0, []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, y, k in loader:
            all_reduce_sum(torch.ones(1), env)  # what DDP's gradient sync does every step: a hang if counts differ
            steps += 1
            keys.append([epoch, list(k)])
    json.dump({"rank": env.rank, "world": env.world_size, "steps": steps, "len": len(loader), "keys": keys},
              open(os.path.join(sys.argv[2], f"rank{env.rank}.json"), "w"))
    shutdown(env)
    """
)


def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_shards_and_take_the_same_steps(tmp_path):
    # 5 unequal-size shards over 2 ranks: without the loader's per-rank quota one rank would run out first
    b = write_fixture_build(tmp_path / "b", real=[13, 12, 11, 7], synthetic=[0, 2, 3, 4], shard_size=12)
    script = tmp_path / "ddp_loader.py"
    script.write_text(DDP_SCRIPT)
    res = _torchrun([str(script), str(b), str(tmp_path)], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"] == 2 * r0["len"] > 0
    for epoch in range(2):
        shards = [{k.rsplit("-", 1)[0] for e, ks in r["keys"] if e == epoch for k in ks} for r in (r0, r1)]
        assert shards[0] and shards[1] and not shards[0] & shards[1]


@pytest.mark.slow
def test_trainer_runs_under_torchrun(demo_build, tmp_path):
    out = tmp_path / "ddp-run"
    res = _torchrun(["-m", "fillup_data.cli", "train", "--data", str(demo_build), "--config", str(DEMO_TRAIN),
                     "--stage", "1", "--out", str(out), "--device", "cpu", "--set", "stage1.epochs=1",
                     "--set", "model.width=8"], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["images"] % 32 == 0  # whole global batches from both ranks
    assert (out / "model.safetensors").is_file()


def test_train_recipe_expands_variables_only_in_model_weights(monkeypatch):
    from fillup_data.errors import FillupError
    from fillup_data.train.config import parse_train_config

    monkeypatch.setenv("WEIGHTS_DIR", "/models")
    assert parse_train_config({"model": {"weights": "${WEIGHTS_DIR}/r50.safetensors"}}).model.weights == \
        "/models/r50.safetensors"
    with pytest.raises(FillupError, match=r"name: \$\{WEIGHTS_DIR\} is not expanded here.*model\.weights"):
        parse_train_config({"name": "${WEIGHTS_DIR}"})
    with pytest.raises(FillupError, match="looks like a secret"):
        parse_train_config({"model": {"weights": "${HF_TOKEN}"}})
