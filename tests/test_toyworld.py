"""toyworld: the world's captions and held-out pairs, the shipped generator and classifier, TI on it.

The thresholds come from the measurements in benchmarks/RESULTS.md ("toyworld") with margin; the
image counts are small, so each threshold sits well below the measured rate and far above chance
(1/64 for both shape and colour right).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch

from fillup_data.demo import world
from fillup_data.errors import FillupError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHANCE = 1 / 64
# Means over ALL pairs of a kind, measured by `python scripts/train_toyworld.py measure` with exactly
# the tests' settings and seeds (fillup_data.demo.toyworld.evaluate.prompt_check / inversion_check; the
# numbers, date and commit are in benchmarks/RESULTS.md, "toyworld", "What the tests check").
# Measured 2026-11-26 on the shipped weights (commit b9d366f, `measure --parts checks hard`), both right:
# words, all 56 seen pairs 0.929 (52/56); all 8 held-out pairs 0.812 (26/32), colour 1.000;
# Textual Inversion, the demo's 4 held-out classes, 0.859 (55/64), colour 0.984; the same tokens
# zeroed 0.016, colour 0.219; Textual Inversion from harder-background images 0.422 (27/64), zeroed 0.016.
# Chance: 1/64 both, 1/8 colour.
# HELD_MIN and TI_MIN are issue 14's targets themselves (prompts of held-out pairs >= 0.6 at guidance
# 3; Textual Inversion from 10 images >= 0.5): the shipped weights clear them by 6 and 23 images.
SEEN_MIN, HELD_MIN, HELD_COLOUR_MIN = 0.80, 0.60, 0.90
TI_MIN, TI_COLOUR_MIN = 0.50, 0.90  # zeroed tokens: 0.016 and 0.219
HARD_TI_MIN = 0.25  # from harder-background images (the miniature's): 11 images of margin; the previous generator 0.000
PSNR_MIN = 100.0  # the exact autoencoder: lossless (measure_vae's cap, 168 dB)


# ----------------------------------------------------------------------------- the world


# The shapes are rasterised by Pillow's ImageDraw, whose polygon edges have changed between major
# versions: pixels are bit-identical for one Pillow major version, so the hash is pinned per major
# version and skipped (with the reason) on others. What the pixels mean is checked on every version
# by test_shipped_classifier_is_accurate_on_images_it_never_trained_on and test_draw_semantics_*.
DRAW_HASHES = {13: "79302eb3453092ed785ef6f5ad904e07e9ba821922699ae3ad330e76ea2a43af"}


def _draw_hash() -> str:
    h = hashlib.sha256()
    for i, (s, c) in enumerate(world.world_classes(12)):
        h.update(np.asarray(world.draw(s, c, [0, 0, i, 3])[0]).tobytes())
    return h.hexdigest()


def test_draw_is_unchanged_for_the_same_seeds():
    # pins the demo source's pixels: extending the world must not change existing images
    import PIL

    major = int(PIL.__version__.split(".")[0])
    if major not in DRAW_HASHES:
        pytest.skip(f"pixel hash pinned for Pillow {sorted(DRAW_HASHES)}, this is Pillow {PIL.__version__}: "
                    "its polygon rasteriser may move edge pixels; add its hash here once the drawings are checked")
    assert _draw_hash() == DRAW_HASHES[major]
    assert _draw_hash() == DRAW_HASHES[major]  # and within one process, every time


@pytest.mark.parametrize("shape", world.SHAPES)
def test_draw_semantics_the_shape_covers_its_geometric_area(shape):
    """Version-independent: the rasterised mask covers the area of the shape asked for (±8%: Pillow counts edge pixels in, 1-5% today)."""
    import math

    from PIL import Image, ImageDraw

    big, r, rot = 128, 30.0, 0.4
    mask = Image.new("L", (big, big), 0)
    world._draw_shape(ImageDraw.Draw(mask), shape, 64.0, 64.0, r, rot, 255)
    covered = float(np.asarray(mask, dtype=np.float64).sum() / 255.0)

    def polygon_area(pts):
        return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2

    if shape == "circle":
        want = math.pi * r * r
    elif shape == "ring":
        w = max(1, int(r * 0.38))
        want = math.pi * (r * r - (r - w) ** 2)
    elif shape == "cross":
        w, arm = r * 0.42, r * 1.25
        want = 2 * (2 * arm) * (2 * w) - (2 * w) ** 2
    elif shape == "diamond":
        want = 2 * (r * 0.75) * (r * 1.3)
    else:
        n, scale, inner = {"square": (4, 1.2, None), "triangle": (3, 1.25, None), "hexagon": (6, 1.1, None),
                           "star": (5, 1.35, 0.42)}[shape]
        want = polygon_area(world._polygon(64.0, 64.0, r * scale, n, rot, inner=inner))
    assert covered == pytest.approx(want, rel=0.08), (shape, covered, want)


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
    from fillup_data.demo.toyworld import model as tw

    tok = tw.build_tokenizer()
    for word in world.world_words():
        assert len(tok.tokenize(word)) == 1, word
    assert tok.tokenize("a clean orange star") == ["a</w>", "clean</w>", "orange</w>", "star</w>"]
    assert len(tok("zebra, 42 ünïcode").input_ids) > 5  # byte-level fallback, no unknowns lost
    assert tw.tokenize(tok, ["", "a red circle"]).shape == (2, 77)


def test_the_tokenizer_built_from_code_is_the_shipped_one():
    """toyworld's tokenizer comes from the package's one CLIP tokenizer builder; its vocabulary ids are what
    the shipped text encoder's embedding rows mean, so they must not move."""
    from transformers import AutoTokenizer

    from fillup_data.demo.toyworld import model as tw
    from fillup_data.demo.toyworld.export import default_pipeline_dir

    built, shipped = tw.build_tokenizer(), AutoTokenizer.from_pretrained(default_pipeline_dir() / "tokenizer")
    assert built.get_vocab() == shipped.get_vocab()
    for text in ("a photo of a purple square", "a rendering of a <x> object", "zebra, 42 ünïcode", ""):
        assert built(text).input_ids == shipped(text).input_ids, text


def test_bpe_merges_reproduce_single_tokens_even_for_overlapping_words():
    from fillup_data.demo.toyworld.model import train_bpe_merges

    merges = train_bpe_merges(["an", "clean", "green", "red", "rendering"])
    assert len(merges) == len(set(merges))
    # every merged symbol is built from earlier symbols
    assert ("a", "n</w>") in merges or ("an", "</w>") not in merges


# ----------------------------------------------------------------------------- training code


def test_generator_training_checkpoints_and_resumes(tmp_path, restore_threads):
    from fillup_data.demo.toyworld.train import GeneratorTrainConfig, train_generator

    torch.set_num_threads(1)
    cfg = GeneratorTrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1)
    train_generator(tmp_path, cfg, progress=False, log_every=1, threads=2)
    assert torch.get_num_threads() == 1  # the thread tuner's choice does not outlive the call
    state = json.loads((tmp_path / "generator" / "state.json").read_text())
    assert state["step"] == 2 and len(state["log"]) == 2
    cfg.steps = 3  # lengthening a run resumes from step 2
    train_generator(tmp_path, cfg, progress=False, log_every=1, threads=1)
    assert json.loads((tmp_path / "generator" / "state.json").read_text())["step"] == 3
    with pytest.raises(FillupError, match="another config"):
        train_generator(tmp_path, GeneratorTrainConfig(steps=3, batch_size=8), progress=False, threads=1)


def test_thread_tuner_keeps_the_faster_thread_count(monkeypatch, restore_threads):
    from fillup_data.demo.toyworld import train

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


# ----------------------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def classifier():
    from fillup_data.demo.toyworld.classifier import load_classifier

    return load_classifier()


@pytest.fixture(scope="module")
def toy_pipe():
    from fillup_data.demo.toyworld import load_toyworld

    return load_toyworld()


def test_shipped_classifier_is_accurate_on_images_it_never_trained_on(classifier):
    from safetensors import safe_open

    from fillup_data.demo.toyworld.classifier import EVAL_SEED, default_weights_path, evaluate_classifier, training_seeds

    with safe_open(str(default_weights_path()), "pt") as f:
        trained = json.loads(f.metadata()["training"])
    seen = training_seeds(trained["seed"], trained["steps"])
    assert EVAL_SEED not in seen and EVAL_SEED > seen[-1]  # no evaluation batch is a training batch
    report = evaluate_classifier(classifier, n=512)
    assert report.shape_accuracy >= 0.95 and report.colour_accuracy >= 0.98
    # trained on 30% harder backgrounds too, it judges cluttered images (the generator draws plain ones)
    assert trained["hard_fraction"] == 0.3
    hard = evaluate_classifier(classifier, n=512, hard_fraction=1.0)
    assert hard.shape_accuracy >= 0.85 and hard.colour_accuracy >= 0.9, hard
    with pytest.raises(FillupError, match="training batch"):
        evaluate_classifier(classifier, n=8, seed=777)  # step 777's batch of the shipped run


def test_shipped_pipeline_loads_with_stock_from_pretrained():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from fillup_data.models.space_to_depth import SpaceToDepthAutoencoder  # diffusers finds the class in sys.modules
    from fillup_data.demo.toyworld import model as tw
    from fillup_data.demo.toyworld import pipeline_dir

    folder = pipeline_dir()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["fillup_data.models.space_to_depth", "SpaceToDepthAutoencoder"]  # issue 14: exact
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, SpaceToDepthAutoencoder)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config.in_channels == 12 and pipe.vae_scale_factor == 2
    assert list(pipe.unet.config.block_out_channels) == tw.UNET_SIZES["large"]
    info = json.loads((folder / "fillup_toyworld.json").read_text())
    import dataclasses

    from fillup_data.demo.toyworld.train import GeneratorTrainConfig

    training = info["generator_training"]
    assert training["steps_done"] == training["config"]["steps"] == 5000
    # the second GPU sitting's settings (results/toyworld_training), which are the training defaults
    assert training["config"]["batch_size"] == 128 and training["config"]["hard_fraction"] == 0.15
    defaults = dataclasses.asdict(GeneratorTrainConfig())
    assert {k: v for k, v in training["config"].items() if k in defaults} == defaults
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total <= 20 * 10**6  # issue 14: weights at most 20 MB


def test_shipped_vae_is_near_lossless_space_to_depth(toy_pipe):
    from fillup_data.demo.toyworld import model as tw
    from fillup_data.demo.toyworld.vae import measure_vae

    q = measure_vae(toy_pipe.vae, n=64, seed=5)
    assert q["psnr_roundtrip_db"] >= PSNR_MIN, q
    with torch.no_grad():
        dist = toy_pipe.vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist
    assert dist.mean.shape == (2, tw.LATENT_CHANNELS, 16, 16)
    assert float(dist.std.max()) < 1e-5  # a point posterior: TI's latent samples equal the means


@pytest.mark.slow  # 88 images: about 12 s on 2 idle cores
def test_prompts_control_shape_and_colour_over_all_seen_and_held_out_pairs(toy_pipe, classifier):
    from fillup_data.demo.toyworld.evaluate import prompt_check

    r = prompt_check(toy_pipe, classifier)
    assert len(r["seen"].per_class) == 56 and len(r["held_out"].per_class) == 8
    assert r["seen"].both >= SEEN_MIN, r["seen"].per_class
    assert r["held_out"].both >= HELD_MIN, r["held_out"].per_class
    assert r["held_out"].colour >= HELD_COLOUR_MIN, r["held_out"].per_class


@pytest.mark.slow
def test_textual_inversion_recovers_the_demos_held_out_classes(toy_pipe, classifier, tmp_path):
    from fillup_data.demo.toyworld.evaluate import DEMO_HELD_OUT, inversion_check

    r = inversion_check(toy_pipe, classifier, tmp_path)
    assert len(r["token"].per_class) == len(DEMO_HELD_OUT) == 4
    assert r["token"].both >= TI_MIN, r["token"].per_class  # the mean over all four classes
    assert r["token"].colour >= TI_COLOUR_MIN, r["token"].per_class
    # the check needs the learned vectors: the same tokens zeroed fall under both thresholds
    assert r["zeroed_token"].both < TI_MIN and r["zeroed_token"].colour < TI_COLOUR_MIN, r["zeroed_token"].per_class


@pytest.mark.slow
def test_textual_inversion_learns_classes_from_harder_background_images(toy_pipe, classifier, tmp_path):
    """The miniature experiment's situation: each class's 10 images have the harder backgrounds (clutter,
    near-hue backgrounds); the generator saw such images in 15% of its pretraining, so the tokens still
    draw the class."""
    from fillup_data.demo.toyworld.evaluate import inversion_check

    r = inversion_check(toy_pipe, classifier, tmp_path, hard=True)
    assert len(r["token"].per_class) == 4
    assert r["token"].both >= HARD_TI_MIN, r["token"].per_class
    assert r["zeroed_token"].both < HARD_TI_MIN, r["zeroed_token"].per_class


# ----------------------------------------------------------------------------- the tables' computation


def patch_world_oracle(monkeypatch, drawn_as: dict[tuple[str, str], str] | None = None) -> None:
    """Replace the diffusion sampler with the world's own drawing code, so every fidelity number is known:
    each sample shows its class (named by its prompt, or by its token file's class name), except the
    classes in ``drawn_as``, drawn with another shape (shape wrong, colour right). Everything around the
    sampler (specs, class mapping, token files, scoring, averaging, tables) is the real code."""
    from fillup_data.generation.generator import SyntheticGenerator
    from fillup_data.inversion.token_file import read_token_file

    drawn_as = drawn_as or {}

    def sample(self, specs, conditions, seeds):
        self.conditioning(specs, conditions)  # the real conditioning path: prompts, token files, class checks
        out = []
        for spec, seed in zip(specs, seeds):
            if self.cfg.strategy == "textual_inversion":
                name = read_token_file(self.strategy.token_files[spec.class_index]).class_name
            else:
                name = self.class_names[spec.class_index]
            colour, shape = name.split(" ", 1)
            image, _ = world.draw(drawn_as.get((shape, colour), shape), colour, [int(seed), 0x0A])
            out.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        return np.stack(out), np.zeros(len(out), dtype=bool)  # finished uint8 rows, none bad

    monkeypatch.setattr(SyntheticGenerator, "_sample_batch", sample)


def test_measure_and_its_tables_report_what_was_generated(toy_pipe, classifier, monkeypatch, tmp_path):
    from fillup_data.demo.toyworld import evaluate

    # purple square (a held-out pair and a demo tail class) comes out as a purple circle
    patch_world_oracle(monkeypatch, {("square", "purple"): "circle"})
    monkeypatch.setattr(evaluate, "CHECK_TI_STEPS", 2)
    result = evaluate.measure(toy_pipe, classifier, n_per=2, steps=1, ti_classes=[("square", "purple"), ("ring", "blue")],
                              ti_steps=2, parts=("words", "inversion", "checks"), work_dir=tmp_path, progress=False)
    w = result["words"]
    for g in (1, 3):
        assert w[f"seen_g{g}"]["both"] == 1.0 and len(w[f"seen_g{g}"]["per_class"]) == 8
        held = w[f"held_out_g{g}"]
        assert held["per_class"]["purple square"] == {"both": 0.0, "shape": 0.0, "colour": 1.0, "n": 2}
        assert all(v["both"] == 1.0 for k, v in held["per_class"].items() if k != "purple square")
        assert (held["both"], held["shape"], held["colour"]) == (7 / 8, 7 / 8, 1.0)  # the mean over pairs
    ti = result["inversion"]["classes"]
    assert ti["purple square"]["token_g3"]["both"] == 0.0 and ti["purple square"]["token_g3"]["colour"] == 1.0
    assert ti["blue ring"]["token_g1"] == {"both": 1.0, "shape": 1.0, "colour": 1.0, "n": 4}  # 2 * n_per images
    k = result["checks"]
    assert k["words_seen"]["both"] == 1.0 and len(k["words_seen"]["per_class"]) == 56
    assert k["words_held_out"]["both"] == 7 / 8 and len(k["words_held_out"]["per_class"]) == 8
    assert set(k["token"]["per_class"]) == {"white diamond", "orange hexagon", "yellow circle", "purple square"}
    assert k["token"]["both"] == 3 / 4 and k["token"]["per_class"]["purple square"]["both"] == 0.0

    md = evaluate.results_markdown(result, machine="test box", date="2026-01-02", command="measure --x", commit="abc1234")
    assert "2026-01-02, commit abc1234, test box. Produced by `measure --x`" in md
    assert "| held-out pairs (8) | 3 | 0.875 | 0.875 | 1.000 |" in md
    assert "| seen pairs (8) | 1 | 1.000 | 1.000 | 1.000 |" in md
    assert "both-right rate of 4 images per class" in md
    assert re.search(r"\| purple square \| [\d.]+ \| 0\.000 \| 0\.000 \| 0\.000 \| 0\.000 \|", md)
    assert re.search(r"\| blue ring \| [\d.]+ \| 1\.000 \| 1\.000 \| 1\.000 \| 1\.000 \|", md)
    assert "| words, all 8 held-out pairs | 32 | 0.875 | 0.875 | 1.000 |" in md
    assert "| Textual Inversion, the demo's 4 held-out classes (10 images, 2 steps, jointly) | 64 | 0.750 | 0.750 | 1.000 |" in md
