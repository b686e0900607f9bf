"""The world's harder backgrounds (issue 14's miniature) and the generator-training options that go with them:
the UNet width, the share of hard images, GPU-ready data loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from fillup_data.demo import world
from fillup_data.errors import FillupError


def _pixels(shape, colour, seed, hard):
    return np.asarray(world.draw(shape, colour, seed, hard=hard)[0]).astype(np.int16)


def test_hard_images_have_their_own_palette_clutter_and_seeded_pixels():
    backgrounds, clutter = set(), []
    for i, (s, c) in enumerate(world.world_classes(48)):
        img, meta = world.draw(s, c, [5, i], hard=True)
        again, meta2 = world.draw(s, c, [5, i], hard=True)
        assert np.array_equal(np.asarray(img), np.asarray(again)) and meta == meta2
        assert meta["background"] in {**world.BACKGROUNDS, **world.HARD_BACKGROUNDS}
        backgrounds.add(meta["background"])
        clutter.append(meta["clutter"])
        # the plain image of the same seed is another image (and has no clutter)
        plain, plain_meta = world.draw(s, c, [5, i])
        assert plain_meta["clutter"] == 0 and not np.array_equal(np.asarray(plain), np.asarray(img))
    assert set(world.HARD_BACKGROUNDS) <= backgrounds  # the new colours are drawn
    assert set(clutter) == {1, 2, 3}


def test_clutter_is_smaller_than_the_class_shape():
    # the distractors' radius range lies below the class shape's, so the label is the largest shape
    assert world.CLUTTER_RADIUS[1] < 0.17
    rng = np.random.default_rng(0)
    for s, c in world.world_classes(16):
        masks = world._clutter(rng, s, c, 32)
        for m, fill in masks:
            assert 0 < m.sum() < 0.1 * 32 * 32
            assert fill.shape == (1, 1, 3)


def test_hard_fraction_zero_is_the_old_stream_and_one_captions_every_background_as_cluttered():
    base = world.sample_world(7, 64)
    zero = world.sample_world(7, 64, hard_fraction=0.0)
    assert np.array_equal(base[0], zero[0]) and base[1] == zero[1] and np.array_equal(base[2], zero[2])
    # captions and labels of the stream from before the option existed (pure numpy RNG: the same on every
    # platform), so a random draw added to the plain path shows here
    digest = hashlib.sha256(json.dumps([base[1], base[2].tolist()]).encode()).hexdigest()
    assert digest == "d8cd791a4cb1fcd8ba84d64fa18cc4d2156e084afcd3e50db0f7bf724e57954c"
    images, captions, labels = world.sample_world(7, 200, hard_fraction=1.0)
    with_background = [c for c in captions if "background" in c]
    assert with_background and all(f"{world.CLUTTER_WORD} " in c for c in with_background)
    words = set(world.world_words())
    for cap in captions:
        assert set(cap.replace("-", " ").split()) <= words, cap
    mixed = world.sample_world(7, 400, hard_fraction=0.3)[1]
    share = sum(world.CLUTTER_WORD in c for c in mixed) / max(1, sum("background" in c for c in mixed))
    assert 0.15 < share < 0.45


def test_demo_source_draws_hard_backgrounds_when_the_recipe_asks(tmp_path):
    from fillup_data.recipe import DemoSource as Cfg
    from fillup_data.demo.source import DemoSource

    cfg = Cfg(kind="demo", num_classes=20, max_images=10, min_images=2, test_per_class=1, hard_backgrounds=True)
    src = DemoSource(cfg, seed=3)
    item = src.items("train")[5]
    shape, colour = src.classes[item.label]
    _, split, label, i = item.locator.split("/")
    expected = world.draw(shape, colour, [3, 0, int(label), int(i)], size=32, hard=True)[0]
    assert np.array_equal(np.asarray(src.load(item)), np.asarray(expected))
    plain = DemoSource(cfg.model_copy(update={"hard_backgrounds": False}), seed=3)
    assert not np.array_equal(np.asarray(plain.load(item)), np.asarray(expected))


# ----------------------------------------------------------------------------- training options


def test_the_data_stream_is_the_same_for_any_number_of_data_workers(tmp_path, restore_threads):
    from safetensors.torch import load_file

    from fillup_data.demo.toyworld.train import GeneratorTrainConfig, train_generator

    cfg = GeneratorTrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, autoencoder="exact",
                               hard_fraction=0.5)
    train_generator(tmp_path / "w0", cfg, progress=False, threads=1, data_workers=0)
    train_generator(tmp_path / "w2", cfg, progress=False, threads=1, data_workers=2)
    a = load_file(str(tmp_path / "w0" / "generator" / "weights.safetensors"))
    b = load_file(str(tmp_path / "w2" / "generator" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and another hard share is another stream
    train_generator(tmp_path / "h0", dataclasses.replace(cfg, hard_fraction=0.0), progress=False, threads=1)
    c = load_file(str(tmp_path / "h0" / "generator" / "weights.safetensors"))
    assert not torch.equal(a["ema.unet.conv_in.weight"], c["ema.unet.conv_in.weight"])


def test_unet_width_and_hard_share_are_recorded_resume_checked_and_exported(tmp_path, restore_threads):
    from fillup_data.models import load_pipeline
    from fillup_data.demo.toyworld import model as tw
    from fillup_data.demo.toyworld.export import INFO_NAME, export_pipeline
    from fillup_data.demo.toyworld.train import GeneratorTrainConfig, train_generator

    cfg = GeneratorTrainConfig(steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1, autoencoder="exact",
                               unet="large", hard_fraction=0.3)
    train_generator(tmp_path, cfg, progress=False, threads=1)
    with pytest.raises(FillupError, match="unet: 'large' in the state, 'base' now"):
        train_generator(tmp_path, dataclasses.replace(cfg, steps=2, unet="base"), progress=False, threads=1)
    with pytest.raises(FillupError, match="hard_fraction: 0.3 in the state, 0.0 now"):
        train_generator(tmp_path, dataclasses.replace(cfg, steps=2, hard_fraction=0.0), progress=False, threads=1)
    out = export_pipeline(tmp_path, cfg, tmp_path / "out")
    info = json.loads((out / INFO_NAME).read_text())
    assert info["reproduce"] == ("python scripts/train_toyworld.py all --work build/toyworld-train --steps 1 "
                                 "--autoencoder exact --unet large --hard-fraction 0.3 --batch-size 2")
    pipe = load_pipeline(str(out), dtype="float32", device="cpu")
    assert list(pipe.unet.config.block_out_channels) == tw.UNET_SIZES["large"]
    # a run stopped before its last step says so in the command it records
    train_generator(tmp_path / "cut", dataclasses.replace(cfg, steps=1), progress=False, threads=1)
    state_path = tmp_path / "cut" / "generator" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"]["steps"] = 5
    state_path.write_text(json.dumps(state))
    info = json.loads((export_pipeline(tmp_path / "cut", cfg, tmp_path / "cut-out") / INFO_NAME).read_text())
    assert "--steps 5" in info["reproduce"] and "stopped at step 1" in info["reproduce"]


def test_an_unknown_unet_width_is_refused_by_name():
    from fillup_data.demo.toyworld import model as tw

    with pytest.raises(ValueError, match="unknown toyworld UNet size 'huge'"):
        tw.build_unet(12, "huge")


def test_world_classifier_trains_on_the_mix_and_reports_hard_accuracy(tmp_path, restore_threads):
    from safetensors import safe_open

    from fillup_data.demo.toyworld.classifier import train_classifier

    torch.set_num_threads(1)
    path = tmp_path / "c.safetensors"
    train_classifier(path, steps=2, batch_size=8, progress=False, data_workers=0)
    with safe_open(str(path), "pt") as f:
        training = json.loads(f.metadata()["training"])
    assert training["hard_fraction"] == 0.3 and set(training["report_hard_backgrounds"]) >= {"both_accuracy", "n"}


def test_train_script_passes_batch_size_into_the_recorded_config(tmp_path, restore_threads):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_toyworld", Path(__file__).parents[1] / "scripts" / "train_toyworld.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["generator", "--work", str(tmp_path), "--steps", "1", "--batch-size", "3", "--unet", "base",
                        "--threads", "1"]) == 0
    config = json.loads((tmp_path / "generator" / "state.json").read_text())["config"]
    assert config["batch_size"] == 3 and config["unet"] == "base"


def test_the_hard_measure_inverts_from_harder_background_images(tmp_path, monkeypatch):
    """``measure --parts hard``: the Textual Inversion check learns each token from images with the harder
    backgrounds (the miniature's real images) and reports them in their own table."""
    import fillup_data.inversion as inversion
    from fillup_data.demo.toyworld import evaluate as ev

    seen = {}

    def fake_invert(pipe, jobs, **kw):
        for job in jobs:
            seen[job.class_name] = job.images
        return [job.out_path for job in jobs]

    monkeypatch.setattr(inversion, "invert_classes", fake_invert)
    report = ev.FidelityReport()
    report.per_class = {ev.world.class_name(s, c): {"both": 0.5, "shape": 0.5, "colour": 1.0, "n": 16}
                        for s, c in ev.DEMO_HELD_OUT}
    monkeypatch.setattr(ev, "token_fidelity", lambda *a, **k: report)
    monkeypatch.setattr(ev, "zeroed_token", lambda p, out: out)
    result = ev.measure(None, None, parts=["hard"], work_dir=tmp_path, progress=False)
    for shape, colour in ev.DEMO_HELD_OUT:
        images = seen[world.class_name(shape, colour)]
        assert len(images) == ev.CHECK_TI_IMAGES
        hard = world.draw(shape, colour, [0, 0xE1, 3], hard=True)[0]
        assert np.array_equal(np.asarray(images[3]), np.asarray(hard))
    md = ev.results_markdown(result, machine="m", date="d", command="c", commit="x")
    assert "from harder-background images | 64 | 0.500 | 0.500 | 1.000 |" in md


def test_gpu_script_variants_spell_out_batch_and_hard_share():
    """The training defaults changed (batch 64 -> 128, hard share 0 -> 0.15): a variant of
    scripts/toyworld_gpu.sh that left them out would silently train something else than its name says."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "scripts" / "toyworld_gpu.sh").read_text()
    default = re.search(r'^VARIANTS_DEFAULT="([^"]+)"', text, re.M).group(1)
    variants = dict(v.split(":", 1) for v in default.split(";"))
    assert set(variants) == {"b128-plain", "b128-mix15", "b128-mix30"}
    for name, args in variants.items():
        assert "--batch-size 128" in args and "--hard-fraction" in args, name
    assert "--hard-fraction 0 " in variants["b128-plain"] + " "
