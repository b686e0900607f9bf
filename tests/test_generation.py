"""Generation: guidance 1.0 cost, per-sample seeds, mixed batches, bad-image retries, preview grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fillup_data.errors import FillupError
from fillup_data.generation import SampleSpec, SyntheticGenerator, build_prompt, is_bad_image, preview_grid
from fillup_data.inversion import export_diffusers
from fillup_data.inversion.token_file import TokenFile, write_token_file
from fillup_data.recipe import GeneratorConfig

CLASSES = ["red disc", "blue square", "green star"]


def _cfg(**kw) -> GeneratorConfig:
    base = dict(model="builtin:tiny-sd", resolution=32, num_inference_steps=3, batch_size=4, guidance_scale=1.0)
    base.update(kw)
    return GeneratorConfig(**base)


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    """Token files with random (seeded) checkpoints: generation does not care how they were learned."""
    root = tmp_path_factory.mktemp("tokens")
    g = torch.Generator().manual_seed(0)
    files = {}
    for c, name in enumerate(CLASSES):
        tf = TokenFile(
            class_index=c, class_name=name, checkpoints={s: torch.randn(4, 32, generator=g) for s in (10, 20, 30)},
            n_images=3, steps=30, learning_rate=5e-3, weight_decay=0.0, batch_size=2, model_id="builtin:tiny-sd",
            model_revision="", init_word="object", num_vectors=4, seed=0, resolution=32, loss_curve=[1.0, 1.0, 1.0],
        )  # fmt: skip
        files[c] = write_token_file(root / f"{c:05d}.safetensors", tf)
    return files


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


MIXED = [SampleSpec(0, 11, 10), SampleSpec(2, 12, 30), SampleSpec(1, 13, 20), SampleSpec(0, 14, 30), SampleSpec(2, 15, 10)]


def test_mixed_batch_equals_each_sample_alone(tiny_pipe, token_files):
    gen = SyntheticGenerator(tiny_pipe, _cfg(), CLASSES, token_files)
    batch = gen.generate(MIXED)  # 5 samples: a full micro-batch of 4 and a padded one
    assert len({_pixels(s).tobytes() for s in batch}) == len(MIXED)  # all different
    for spec, sample in zip(MIXED, batch):
        alone = gen.regenerate(SampleSpec(spec.class_index, sample.seed, spec.token_step))
        assert np.array_equal(_pixels(alone), _pixels(sample)), spec
        assert sample.image.mode == "RGB" and sample.image.size == (32, 32)
        assert sample.retries == 0 and sample.seed == spec.seed
    # another order, other neighbours: same pixels per sample
    shuffled = gen.generate(MIXED[::-1])[::-1]
    assert [_pixels(s).tobytes() for s in shuffled] == [_pixels(s).tobytes() for s in batch]


def test_regeneration_from_metadata_in_a_new_generator(tiny_model_cache, token_files):
    from fillup_data.models import load_pipeline

    first = SyntheticGenerator(load_pipeline("builtin:tiny-sd", device="cpu"), _cfg(), CLASSES, token_files)
    second = SyntheticGenerator(load_pipeline("builtin:tiny-sd", device="cpu"), _cfg(), CLASSES, token_files)
    a = first.generate(MIXED[:3])
    b = [second.regenerate(SampleSpec(s.class_index, g.seed, s.token_step)) for s, g in zip(MIXED[:3], a)]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))


def test_checkpoint_and_class_change_the_image(tiny_pipe, token_files):
    gen = SyntheticGenerator(tiny_pipe, _cfg(), CLASSES, token_files)
    a, b, c = gen.generate([SampleSpec(0, 5, 10), SampleSpec(0, 5, 30), SampleSpec(1, 5, 10)])
    assert not np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(c))


def test_equals_prompting_with_a_loaded_token(fresh_tiny_pipe, token_files, tmp_path):
    """Our slot-free encoding is the same computation as diffusers' load_textual_inversion path."""
    pipe = fresh_tiny_pipe
    export_diffusers(token_files[2], 20, tmp_path / "t.safetensors")
    pipe.load_textual_inversion(str(tmp_path / "t.safetensors"))
    cfg = _cfg()
    ours = SyntheticGenerator(pipe, cfg, CLASSES, token_files).generate([SampleSpec(2, 42, 20)])[0]
    assert ours.prompt == "a photo of a <fillup-00002>"
    gens = [torch.Generator("cpu").manual_seed(42) for _ in range(cfg.batch_size)]
    theirs = pipe(
        prompt=[ours.prompt] * cfg.batch_size, guidance_scale=1.0, num_inference_steps=3, height=32, width=32,
        generator=gens, output_type="np",
    ).images[0]  # fmt: skip
    assert np.array_equal(_pixels(ours), (np.clip(theirs, 0, 1) * 255 + 0.5).astype(np.uint8))


def _count_unet_calls(pipe, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counting)
    return calls


def test_guidance_one_runs_one_unet_pass_per_step(fresh_tiny_pipe, token_files, monkeypatch):
    calls = _count_unet_calls(fresh_tiny_pipe, monkeypatch)
    SyntheticGenerator(fresh_tiny_pipe, _cfg(num_inference_steps=4), CLASSES, token_files).generate(MIXED[:3])
    assert calls == [4] * 4  # one micro-batch of 4 rows, 4 steps, no unconditional rows
    calls.clear()
    SyntheticGenerator(fresh_tiny_pipe, _cfg(num_inference_steps=4, guidance_scale=3.0), CLASSES, token_files).generate(
        MIXED[:3]
    )
    assert calls == [8] * 4  # classifier-free guidance doubles the rows (shows the counter sees it)


def test_black_image_is_regenerated_with_the_next_seed(fresh_tiny_pipe, token_files, monkeypatch):
    pipe = fresh_tiny_pipe
    gen = SyntheticGenerator(pipe, _cfg(), CLASSES, token_files)
    expected = gen.generate([SampleSpec(1, 101, 20)])[0]  # what seed 101 gives
    original = pipe.vae.decode
    state = {"calls": 0}

    def black_once(latents, *args, **kwargs):
        state["calls"] += 1
        out = original(latents, *args, **kwargs)
        if state["calls"] == 1:
            out[0][0] = -1.0  # decoder output in [-1, 1]: -1 is black
        return out

    monkeypatch.setattr(pipe.vae, "decode", black_once)
    specs = [SampleSpec(1, 100, 20), SampleSpec(2, 7, 10)]
    got = gen.generate(specs)
    assert got[0].retries == 1 and got[0].seed == 101
    assert np.array_equal(_pixels(got[0]), _pixels(expected))
    assert got[1].retries == 0 and got[1].seed == 7
    assert state["calls"] == 2


def test_persistent_bad_images_raise(fresh_tiny_pipe, token_files, monkeypatch):
    pipe = fresh_tiny_pipe
    original = pipe.vae.decode

    def nan_decode(latents, *args, **kwargs):
        out = original(latents, *args, **kwargs)
        out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(pipe.vae, "decode", nan_decode)
    gen = SyntheticGenerator(pipe, _cfg(max_retries=2), CLASSES, token_files)
    with pytest.raises(FillupError, match="black or non-finite"):
        gen.generate([SampleSpec(0, 1, 10)])


def test_single_template_strategy(tiny_pipe):
    gen = SyntheticGenerator(tiny_pipe, _cfg(strategy="single_template"), CLASSES, None)
    a, b = gen.generate([SampleSpec(1, 3), SampleSpec(2, 3)])
    assert a.prompt == "a photo of a blue square" and b.prompt == "a photo of a green star"
    assert np.array_equal(_pixels(gen.regenerate(SampleSpec(1, 3))), _pixels(a))
    assert not np.array_equal(_pixels(a), _pixels(b))


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler"])
def test_other_schedulers_reproduce(tiny_model_cache, token_files, scheduler):
    from fillup_data.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd", device="cpu", scheduler=scheduler)
    gen = SyntheticGenerator(pipe, _cfg(scheduler=scheduler), CLASSES, token_files)
    batch = gen.generate(MIXED[:2])
    assert np.array_equal(_pixels(gen.regenerate(MIXED[1])), _pixels(batch[1]))


def test_ddim_eta_noise_is_per_sample(tiny_pipe, token_files):
    gen = SyntheticGenerator(tiny_pipe, _cfg(eta=1.0), CLASSES, token_files)
    batch = gen.generate(MIXED[:3])
    assert np.array_equal(_pixels(gen.regenerate(MIXED[2])), _pixels(batch[2]))


def test_prompts_and_input_errors(tiny_pipe, token_files):
    assert build_prompt("textual_inversion", "a photo of a {token}", 17, "zebra") == "a photo of a <fillup-00017>"
    assert build_prompt("single_template", "a photo of a {token}", 17, "zebra") == "a photo of a zebra"
    assert build_prompt("single_template", "{class_name}", 1, "zebra") == "zebra"
    with pytest.raises(FillupError, match="token files"):
        SyntheticGenerator(tiny_pipe, _cfg(), CLASSES, None)
    gen = SyntheticGenerator(tiny_pipe, _cfg(), CLASSES, {0: token_files[0]})
    with pytest.raises(FillupError, match="no checkpoint at step 15"):
        gen.generate([SampleSpec(0, 1, 15)])
    with pytest.raises(FillupError, match="class 1: no token file"):
        gen.generate([SampleSpec(1, 1, 10)])
    with pytest.raises(FillupError, match="outside the 3 classes"):
        gen.generate([SampleSpec(5, 1, 10)])


def test_is_bad_image():
    assert is_bad_image(np.zeros((4, 4, 3), np.float32))
    assert is_bad_image(np.full((4, 4, 3), np.nan, np.float32))
    assert not is_bad_image(np.full((4, 4, 3), 0.5, np.float32))
    img = np.zeros((4, 4, 3), np.float32)
    img[0, 0, 0] = 0.1
    assert not is_bad_image(img)


def test_preview_grid(tmp_path):
    real = {0: [Image.new("RGB", (40, 30), (255, 0, 0))] * 3, 2: [Image.new("RGB", (20, 20), (0, 255, 0))]}
    syn = {0: [Image.new("RGB", (32, 32), (0, 0, 255))] * 2, 2: [Image.new("RGB", (32, 32), (9, 9, 9))] * 2}
    from fillup_data.generation.preview import _LABEL_W as L

    out = preview_grid(real, syn, CLASSES, tmp_path / "grid.png", thumb=16)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (L + 5 * 18 + 12, 24 + 2 * 20)
        px = im.convert("RGB")
        assert px.getpixel((L + 8, 24 + 8)) == (255, 0, 0)  # first real image of class 0
        assert px.getpixel((L + 3 * 18 + 12 + 8, 24 + 8)) == (0, 0, 255)  # first synthetic of class 0
        assert px.getpixel((L + 18 + 8, 24 + 20 + 8)) == (230, 230, 230)  # class 2 has one real image
