"""The cost planner: exact work of a plan, GPU-hours from a rates file, --gpus, which rates are used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fillup_data.cli import main
from fillup_data.cost import (
    Work,
    bench_rates_path,
    estimate,
    read_rates,
    shipped_rates,
    shipped_rates_apply,
    this_device_kind,
    wall_clock,
    work_of,
)
from fillup_data.index import build_index
from fillup_data.plan import make_plan
from fillup_data.recipe import parse_recipe

SMALL = {
    "name": "cost-small",
    "source": {"kind": "demo", "num_classes": 10, "max_images": 150, "min_images": 5, "test_per_class": 20,
               "image_size": 16},
    "fill": {"policy": "fill_to", "target": 150},
    "generator": {"model": "builtin:sd15-random", "resolution": 512, "num_inference_steps": 50, "batch_size": 32},
    "inversion": {"steps_per_image": 10, "min_steps": 400, "max_steps": 800, "checkpoint_every": 50,
                  "classes_per_task": 4, "classes_per_pass": 16},
    "shards": {"max_samples": 300},
}


def _recipe(**over):
    data = json.loads(json.dumps(SMALL))
    for path, value in over.items():
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_recipe(data)


def _write_recipe(tmp_path: Path, **over) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(**over).resolved()))
    return path


def test_work_counts_images_class_steps_and_real_images_exactly():
    recipe = _recipe()
    plan = make_plan(recipe, build_index(recipe))
    real = [c.real for c in plan.classes]
    assert real == [150, 102, 70, 48, 33, 22, 15, 10, 7, 5]  # the demo world's long tail (pins the inputs)
    work = work_of(recipe, plan)
    assert work.synthetic_images == sum(150 - n for n in real) == 1038
    # 9 classes below the target get a token: 10 steps per image clamped to 400..800 (paper B.3 shape)
    assert work.token_classes == 9
    assert work.inversion_class_steps == 800 + 700 + 480 + 400 * 6 == 4380
    assert work.real_images == 462 + 200 == 662  # train + test, both packed
    assert [len(t) for t in work.inversion_tasks] == [4, 4, 1]  # classes_per_task 4
    assert sum(work.generation_tasks) == 1038 and len(work.generation_tasks) == 4  # shards of <= 300


def test_no_inversion_work_without_textual_inversion():
    recipe = _recipe(**{"generator.strategy": "single_template", "generator.prompt": "a photo of a {class_name}"})
    work = work_of(recipe, make_plan(recipe, build_index(recipe)))
    assert work.synthetic_images == 1038 and work.inversion_class_steps == 0 and work.inversion_tasks == []


def _rates_file(tmp_path: Path) -> Path:
    data = {
        "kind": "fillup-data rates", "device": "cuda:Test GPU", "measured": "2026-01-02", "commit": "abc1234",
        "torch": "t", "diffusers": "d",
        "generation": {"resolution": 512, "reference_batch_size": 32,
                       "compiled": {"unet_row_step_s": 0.01, "decode_image_s": 0.1, "overhead_factor": 1.0},
                       "eager": {"unet_row_step_s": 0.02, "decode_image_s": 0.2, "overhead_factor": 1.5}},
        "inversion": {"resolution": 512, "batch_size": 2, "auto_classes_per_pass": 16,
                      "compiled": {"class_steps_per_s": {"16": 40.0}},
                      "eager": {"class_steps_per_s": {"1": 4.0, "16": 20.0}}},
    }
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(data))
    return path


def test_gpu_hours_follow_steps_guidance_pixels_batch_and_compile(tmp_path):
    rates = read_rates(_rates_file(tmp_path))
    work = Work(synthetic_images=1000, inversion_class_steps=7200, token_classes=16, real_images=0,
                inversion_tasks=[[450] * 16], generation_tasks=[1000])
    est = estimate(_recipe(), work, rates)
    assert est.image_s == pytest.approx(50 * 0.01 + 0.1)  # compile auto on a CUDA device: compiled rates
    assert est.generation_s == pytest.approx(600.0)
    assert est.inversion_s == pytest.approx(7200 / 40.0)
    assert est.total_s == pytest.approx(780.0)

    assert estimate(_recipe(**{"generator.guidance_scale": 3.0}), work, rates).image_s == pytest.approx(100 * 0.01 + 0.1)
    assert estimate(_recipe(**{"generator.resolution": 256}), work, rates).image_s == pytest.approx((0.5 + 0.1) / 4)
    assert estimate(_recipe(**{"generator.num_inference_steps": 25}), work, rates).image_s == pytest.approx(0.35)
    eager = estimate(_recipe(**{"generator.compile": False, "inversion.compile": False}), work, rates)
    assert eager.image_s == pytest.approx(1.5 * (50 * 0.02 + 0.2))
    assert eager.inversion_s == pytest.approx(7200 / 20.0)
    # inversion batch 4 and 256 px: twice the rows, a quarter of the pixels
    half = estimate(_recipe(**{"inversion.batch_size": 4, "inversion.resolution": 256}), work, rates)
    assert half.inversion_s == pytest.approx(7200 / (40.0 / (2 * 0.25)))
    # one class per pass: no compiled rate measured that narrow, the eager one is used and said so
    one = estimate(_recipe(**{"inversion.classes_per_pass": 1}), work, rates)
    assert one.inversion_s == pytest.approx(7200 / 4.0)
    assert any("eager one is used" in n for n in one.notes)


def test_shipped_rates_reproduce_the_measured_h100_figures():
    rates = shipped_rates()
    assert rates.data["measured"] == "2026-11-25" and rates.data["commit"] == "c083b16"
    work = Work(1, 68, 1, 0, [[68] * 16], [1])
    est = estimate(_recipe(), work, rates)  # 512 px, DDIM 50, guidance 1, batch 32, compiled
    assert 1 / est.image_s == pytest.approx(7.9, rel=1e-3)
    eager = estimate(_recipe(**{"generator.compile": False}), work, rates)
    assert 1 / eager.image_s == pytest.approx(5.54, rel=1e-3)
    assert 1 / estimate(_recipe(**{"generator.compile": False, "generator.batch_size": 8}), work, rates).image_s \
        == pytest.approx(4.19, rel=1e-3)
    assert est.class_steps_per_s == {16: pytest.approx(68.0)}


def test_wall_clock_on_n_gpus_is_limited_by_the_longest_task():
    assert wall_clock([10, 10, 10, 10], 2) == 20
    assert wall_clock([10, 10, 10, 10], 8) == 10
    assert wall_clock([100, 1, 1], 4) == 100
    assert wall_clock([], 4) == 0


def test_plan_prints_work_gpu_hours_and_wall_clock(tmp_path, capsys):
    recipe = _write_recipe(tmp_path)
    assert main(["plan", str(recipe), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "work: 1,038 synthetic images to generate, 4,380 inversion class-steps (9 classes get a token), " \
           "662 real images to pack" in out
    assert "shipped with fillup-data: cuda:NVIDIA H100 80GB HBM3, 2026-11-25 at commit c083b16" in out
    assert "estimated GPU-hours on one NVIDIA H100 80GB HBM3" in out and "  total " in out
    assert "on 2 GPUs: about" in out
    # 3 inversion tasks on 2 GPUs cannot split evenly
    assert "limited by task granularity: inversion is 3 task(s)" in out


def test_plan_refuses_gpus_below_one(tmp_path, capsys):
    assert main(["plan", str(_write_recipe(tmp_path)), "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:toyworld"])
def test_plan_says_shipped_rates_do_not_apply_to_other_architectures(tmp_path, capsys, model):
    assert main(["plan", str(_write_recipe(tmp_path, **{"generator.model": model}))]) == 0
    out = capsys.readouterr().out
    assert "work: 1,038 synthetic images to generate" in out
    assert f"the shipped H100 rates do not apply ({model} is not SD 1.5/2.x-sized)" in out
    assert "fillup-data bench --quick" in out and "GPU-hours" not in out


def test_local_model_folder_is_judged_by_its_unet_config(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    sd = json.loads((Path(__file__).parents[1] / "fillup_data/models/configs/sd15_unet.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(sd))
    assert shipped_rates_apply(_recipe(**{"generator.model": str(folder)}))[0] is True
    sd["block_out_channels"] = [32, 64]
    (folder / "unet" / "config.json").write_text(json.dumps(sd))
    applies, why = shipped_rates_apply(_recipe(**{"generator.model": str(folder)}))
    assert not applies and "block_out_channels [32, 64]" in why
    (folder / "unet" / "config.json").unlink()
    applies, why = shipped_rates_apply(_recipe(**{"generator.model": str(folder)}))
    assert not applies and "cannot read the UNet config" in why


def test_plan_prefers_bench_rates_for_the_same_model_and_device_kind(tmp_path, capsys):
    recipe_path = _write_recipe(tmp_path, **{"generator.model": "builtin:tiny-sd"})
    recipe = _recipe(**{"generator.model": "builtin:tiny-sd"})
    bench = bench_rates_path(recipe, this_device_kind())
    bench.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(_rates_file(tmp_path).read_text())
    data.update(device=this_device_kind(), measured="2026-02-03", commit=None, fillup_version="9.9.9")
    bench.write_text(json.dumps(data))
    try:
        assert main(["plan", str(recipe_path)]) == 0
        out = capsys.readouterr().out
        assert f"rates: measured here by `fillup-data bench`: {this_device_kind()}, 2026-02-03" in out
        assert "do not apply" not in out
        # another model's bench rates are not used
        assert main(["plan", str(recipe_path), "--set", "generator.model=builtin:toyworld"]) == 0
        assert "do not apply" in capsys.readouterr().out
    finally:
        bench.unlink()


def test_unreadable_bench_rates_file_is_a_clear_error(tmp_path, capsys):
    recipe_path = _write_recipe(tmp_path)
    bench = bench_rates_path(_recipe(), this_device_kind())
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text("{not json")
    try:
        assert main(["plan", str(recipe_path)]) == 2
        err = capsys.readouterr().err
        assert str(bench) in err and "bench --quick" in err
    finally:
        bench.unlink()


def test_bench_rates_without_inversion_leave_a_textual_inversion_plan_unestimated(tmp_path, capsys):
    recipe_path = _write_recipe(tmp_path)
    bench = bench_rates_path(_recipe(), this_device_kind())
    bench.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(_rates_file(tmp_path).read_text())
    del data["inversion"]  # a bench of a single_template recipe
    bench.write_text(json.dumps(data))
    try:
        assert main(["plan", str(recipe_path)]) == 0
        out = capsys.readouterr().out
        assert "work: 1,038 synthetic images" in out
        assert "GPU time: not estimated" in out and "has no inversion rates" in out
    finally:
        bench.unlink()
