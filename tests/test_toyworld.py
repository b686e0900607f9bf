"""toyworld: the world's captions and held-out pairs, the shipped generator and classifier, TI on it.

The thresholds come from the measurements in benchmarks/RESULTS.md ("toyworld") with margin; the
image counts are small, so each threshold sits well below the measured rate and far above chance
(1/64 for both shape and colour right).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from fillup_data import world
from fillup_data.errors import FillupError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHANCE = 1 / 64
# measured (benchmarks/RESULTS.md "toyworld", guidance 3, 16 images per class): cyan circle 0.94,
# purple ring 0.94 (seen); blue ring 0.81, white diamond 0.44 (held out); all-pair means 0.46 seen,
# 0.31 held out. The test pairs are ones the shipped model draws reliably; thresholds ~half of that.
SEEN_PAIRS = [("circle", "cyan"), ("ring", "purple")]
HELD_PAIRS = [("ring", "blue"), ("diamond", "white")]
SEEN_MIN, HELD_MIN, COLOUR_MIN = 0.5, 0.25, 0.6
PSNR_MIN = 22.0  # measured 26.4 dB round trip on 512 images
# TI on blue ring (held out), 600 steps, 10 images: 0.81 both right at guidance 3 (words: 0.84)
TI_CLASS, TI_STEPS, TI_MIN = ("ring", "blue"), 600, 0.3


# ----------------------------------------------------------------------------- the world


def test_draw_is_unchanged_for_the_same_seeds():
    # pins the demo source's pixels: extending the world must not change existing images
    h = hashlib.sha256()
    for i, (s, c) in enumerate(world.world_classes(12)):
        h.update(np.asarray(world.draw(s, c, [0, 0, i, 3])[0]).tobytes())
    assert h.hexdigest() == "79302eb3453092ed785ef6f5ad904e07e9ba821922699ae3ad330e76ea2a43af"


def test_held_out_pairs_cover_the_demo_tail_and_leave_every_shape_and_colour_seen():
    held = set(world.HELD_OUT)
    seen = world.pretraining_combos()
    assert not held & set(seen)
    assert len(held) + len(seen) == len(world.SHAPES) * len(world.COLOURS)
    assert {s for s, _ in seen} == set(world.SHAPES)
    assert {c for _, c in seen} == set(world.COLOURS)
    # the demo's tail classes (its last, fewest-image ones) are combinations the generator never saw
    assert set(world.world_classes(10)[6:]) <= held
    assert not set(world.world_classes(10)[:6]) & held


def test_sample_world_never_draws_held_out_pairs_and_captions_match_labels():
    images, captions, labels = world.sample_world(3, 400)
    assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
    colours = list(world.COLOURS)
    pairs = {(world.SHAPES[s], colours[c]) for s, c in labels}
    assert not pairs & set(world.HELD_OUT)
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.05 < empty < 0.16  # ~10% unconditional for classifier-free guidance
    for cap, (s, c) in zip(captions, labels):
        words = cap.replace("-", " ").split()
        assert set(words) <= set(world.world_words())
        assert world.SHAPES[s] in words or colours[c] in words or cap == ""
        # a caption never names a wrong shape or colour
        assert not (set(words) & set(world.SHAPES)) - {world.SHAPES[s]}
        assert not (set(words) & set(colours)) - {colours[c]}
    again = world.sample_world(3, 400)
    assert again[1] == captions and np.array_equal(again[0], images)


def test_tokenizer_makes_every_world_word_one_token_and_tokenizes_anything():
    from fillup_data.toyworld import model as tw

    tok = tw.build_tokenizer()
    for word in world.world_words():
        assert len(tok.tokenize(word)) == 1, word
    assert tok.tokenize("a clean orange star") == ["a</w>", "clean</w>", "orange</w>", "star</w>"]
    assert len(tok("zebra, 42 ünïcode").input_ids) > 5  # byte-level fallback, no unknowns lost
    assert tw.tokenize(tok, ["", "a red circle"]).shape == (2, 77)


def test_bpe_merges_reproduce_single_tokens_even_for_overlapping_words():
    from fillup_data.toyworld.model import train_bpe_merges

    merges = train_bpe_merges(["an", "clean", "green", "red", "rendering"])
    assert len(merges) == len(set(merges))
    # every merged symbol is built from earlier symbols
    assert ("a", "n</w>") in merges or ("an", "</w>") not in merges


# ----------------------------------------------------------------------------- training code


def test_generator_training_checkpoints_and_resumes(tmp_path):
    from fillup_data.toyworld.train import GeneratorTrainConfig, train_generator

    torch.set_num_threads(1)
    cfg = GeneratorTrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1)
    train_generator(tmp_path, cfg, progress=False, log_every=1, threads=1)
    state = json.loads((tmp_path / "generator" / "state.json").read_text())
    assert state["step"] == 2 and len(state["log"]) == 2
    cfg.steps = 3  # lengthening a run resumes from step 2
    train_generator(tmp_path, cfg, progress=False, log_every=1, threads=1)
    assert json.loads((tmp_path / "generator" / "state.json").read_text())["step"] == 3
    with pytest.raises(FillupError, match="another config"):
        train_generator(tmp_path, GeneratorTrainConfig(steps=3, batch_size=8), progress=False, threads=1)


def test_thread_tuner_keeps_the_faster_thread_count(monkeypatch):
    from fillup_data.toyworld import train

    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)
    tuner = train.ThreadTuner(options=(2, 1), trial_steps=2, period=10)
    fake = {2: 1.0, 1: 0.1}
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    for step in range(6):
        tuner.before_step(step)
        clock[0] += fake[torch.get_num_threads()]
        tuner.after_step()
    assert tuner.current == 1
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def classifier():
    from fillup_data.toyworld.classifier import load_classifier

    return load_classifier()


@pytest.fixture(scope="module")
def toy_pipe():
    from fillup_data.toyworld import load_toyworld

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_toyworld()


def test_shipped_classifier_is_accurate(classifier):
    from fillup_data.toyworld.classifier import evaluate_classifier

    report = evaluate_classifier(classifier, n=512, seed=777)
    assert report.shape_accuracy >= 0.95 and report.colour_accuracy >= 0.98


def test_shipped_pipeline_loads_with_stock_from_pretrained():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from fillup_data.toyworld import pipeline_dir

    folder = pipeline_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config.in_channels == 12 and pipe.vae_scale_factor == 2
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 12 * 2**20  # commit-size


def test_shipped_vae_is_near_lossless_space_to_depth(toy_pipe):
    from fillup_data.toyworld import model as tw
    from fillup_data.toyworld.vae import measure_vae

    q = measure_vae(toy_pipe.vae, n=64, seed=5)
    assert q["psnr_roundtrip_db"] >= PSNR_MIN, q
    with torch.no_grad():
        dist = toy_pipe.vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist
    assert dist.mean.shape == (2, tw.LATENT_CHANNELS, 16, 16)
    assert float(dist.std.max()) < 1e-5  # a point posterior: TI's latent samples equal the means


def test_prompts_control_shape_and_colour_for_seen_and_held_out_pairs(toy_pipe, classifier):
    from fillup_data.toyworld.evaluate import prompt_fidelity

    assert not set(SEEN_PAIRS) & set(world.HELD_OUT) and set(HELD_PAIRS) <= set(world.HELD_OUT)
    rs = prompt_fidelity(toy_pipe, classifier, SEEN_PAIRS, n_per=8, guidance=3.0, steps=20)
    rh = prompt_fidelity(toy_pipe, classifier, HELD_PAIRS, n_per=8, guidance=3.0, steps=20)
    assert rs.both >= SEEN_MIN, rs.per_class
    assert rh.both >= HELD_MIN, rh.per_class
    assert rh.colour >= COLOUR_MIN, rh.per_class


@pytest.mark.slow
def test_textual_inversion_finds_a_held_out_class_from_ten_images(toy_pipe, classifier, tmp_path):
    from fillup_data.toyworld.evaluate import (
        generate_from_token,
        invert_world_class,
        score,
    )

    shape, colour = TI_CLASS
    path = invert_world_class(toy_pipe, shape, colour, n_images=10, steps=TI_STEPS, num_vectors=4, out_dir=tmp_path)
    images = generate_from_token(toy_pipe, path, 16, guidance=3.0, steps=25)
    s = score(classifier, images, shape, colour)
    assert s["both"] >= TI_MIN, s
