"""Textual Inversion on the tiny pipeline: learning, frozen weights, export, resume, determinism.

Reading and writing token files without a pipeline: tests/test_token_file.py."""

from __future__ import annotations

import json

import pytest
import torch

from fillup_data.errors import FillupError
from fillup_data.inversion import (
    InversionJob,
    TextualInversionTrainer,
    evaluate_token_loss,
    export_diffusers,
    invert_class,
    invert_classes,
    is_complete,
    partial_path,
    read_embedding,
    read_token_file,
)
from fillup_data.inversion.token_file import load_safetensors
from fillup_data.models.text import encode_placeholder_prompt, encode_text
from fillup_data.recipe import InversionConfig
from tests.conftest_ml import draw_class_images

# 40 steps, a checkpoint every 10: seconds on CPU
CFG = InversionConfig(steps_per_image=10, min_steps=40, max_steps=40, checkpoint_every=10)
RES = 32


def _invert(pipe, images, out, **kw):
    return invert_class(
        pipe, images, class_index=3, class_name="red disc", cfg=kw.pop("cfg", CFG), resolution=RES, seed=kw.pop("seed", 0),
        out_path=out, model_id="builtin:tiny-sd", model_revision="", progress=False, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_pipe, tmp_path_factory):
    """One uninterrupted run, shared by the tests that only read its result."""
    images = draw_class_images(4)
    before = {
        name: {k: v.clone() for k, v in getattr(tiny_pipe, name).state_dict().items()}
        for name in ("text_encoder", "unet", "vae")
    }
    out = tmp_path_factory.mktemp("tokens") / "00003.safetensors"
    _invert(tiny_pipe, images, out)
    return {"path": out, "images": images, "before": before}


def test_token_file_contents(trained):
    tf = read_token_file(trained["path"])
    assert tf.checkpoint_steps == [10, 20, 30, 40] == CFG.checkpoint_steps(4)
    assert tf.steps == 40 and tf.n_images == 4 and tf.num_vectors == 4
    assert all(v.shape == (4, 32) and v.dtype == torch.float32 for v in tf.checkpoints.values())
    assert tf.class_index == 3 and tf.class_name == "red disc" and tf.init_word == "object"
    assert tf.learning_rate == 5e-3 and tf.weight_decay == 0.0 and tf.batch_size == 2
    assert len(tf.loss_curve) == 4 and all(x > 0 for x in tf.loss_curve)
    assert tf.token_name == "<fillup-00003>"
    assert is_complete(trained["path"])
    assert not partial_path(trained["path"]).exists()
    assert not torch.equal(tf.checkpoints[10], tf.checkpoints[40])


def test_training_lowers_the_loss_on_the_class_images(tiny_pipe, trained):
    tf = read_token_file(trained["path"])
    init = TextualInversionTrainer(tiny_pipe, CFG, resolution=RES, seed=0, model_id="", model_revision="")._init_vectors
    images = trained["images"]
    # fixed draws (same timesteps and noise for both tokens): no training noise in the comparison
    loss_init = evaluate_token_loss(tiny_pipe, images, init, resolution=RES)
    loss_final = evaluate_token_loss(tiny_pipe, images, tf.checkpoints[40], resolution=RES)
    assert loss_final < loss_init - 1e-3, (loss_init, loss_final)


def test_models_and_all_embedding_rows_stay_bit_identical(tiny_pipe, trained):
    for name, before in trained["before"].items():
        after = getattr(tiny_pipe, name).state_dict()
        assert before.keys() == after.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, f"{name} changed: {changed[:3]}"
        assert not any(p.requires_grad for p in getattr(tiny_pipe, name).parameters())


def test_exported_diffusers_file_loads_exact_vectors(fresh_tiny_pipe, trained, tmp_path):
    tf = read_token_file(trained["path"])
    out = export_diffusers(trained["path"], 20, tmp_path / "tok.safetensors")
    pipe = fresh_tiny_pipe
    pipe.load_textual_inversion(str(out))
    tok = pipe.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in ["<fillup-00003>"] + [f"<fillup-00003>_{i}" for i in (1, 2, 3)]]
    rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.equal(rows, tf.checkpoints[20])
    # and our placeholder encoding is the same computation as prompting with the loaded token
    prompt = encode_placeholder_prompt(tok, "a photo of a {token}", 4)
    ours = encode_text(pipe.text_encoder, [prompt], [tf.checkpoints[20]], "cpu")
    theirs, _ = pipe.encode_prompt("a photo of a <fillup-00003>", "cpu", 1, False)
    assert torch.equal(ours, theirs)
    name, vec = read_embedding(out)
    assert name == "<fillup-00003>" and torch.equal(vec, tf.checkpoints[20])


def test_interrupted_run_resumes_to_the_same_bytes(tiny_pipe, trained, tmp_path):
    out = tmp_path / "00003.safetensors"

    def crash(class_index, step, loss):
        if step == 25:  # between checkpoints 20 and 30
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _invert(tiny_pipe, trained["images"], out, step_callback=crash)
    assert not out.exists()
    tensors, meta = load_safetensors(partial_path(out))
    assert json.loads(meta["step"]) == 20 and "exp_avg" in tensors

    steps_run = []
    _invert(tiny_pipe, trained["images"], out, step_callback=lambda c, s, loss: steps_run.append(s))
    assert steps_run[0] == 21  # resumed from the last checkpoint, not from scratch
    assert out.read_bytes() == trained["path"].read_bytes()
    assert not partial_path(out).exists()
    # a complete token file is skipped
    _invert(tiny_pipe, trained["images"], out, step_callback=lambda *a: pytest.fail("retrained a complete class"))


def test_two_runs_give_identical_bytes_and_other_seed_differs(tiny_pipe, trained, tmp_path):
    again = _invert(tiny_pipe, trained["images"], tmp_path / "a.safetensors")
    assert again.read_bytes() == trained["path"].read_bytes()
    other = _invert(tiny_pipe, trained["images"], tmp_path / "b.safetensors", seed=1)
    assert other.read_bytes() != trained["path"].read_bytes()


def test_stale_resume_state_is_discarded(tiny_pipe, trained, tmp_path):
    out = tmp_path / "00003.safetensors"

    def crash(class_index, step, loss):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _invert(tiny_pipe, trained["images"], out, step_callback=crash, seed=5)
    with pytest.warns(UserWarning, match="other settings"):
        _invert(tiny_pipe, trained["images"], out)  # seed 0 now: the seed-5 state must not be used
    assert out.read_bytes() == trained["path"].read_bytes()


def test_joint_training_matches_single_class_training(tiny_pipe, trained, tmp_path):
    blue = draw_class_images(3, colour=(20, 20, 200), shape_colour=(240, 240, 0))
    cfg = InversionConfig(steps_per_image=10, min_steps=20, max_steps=40, checkpoint_every=10)
    jobs = [
        InversionJob(3, "red disc", trained["images"], tmp_path / "joint" / "00003.safetensors"),
        InversionJob(7, "blue disc", blue, tmp_path / "joint" / "00007.safetensors"),
    ]
    kw = dict(cfg=cfg, resolution=RES, seed=0, model_id="builtin:tiny-sd", model_revision="", progress=False)
    invert_classes(tiny_pipe, jobs, **kw)
    for job in jobs:
        single = tmp_path / "single" / job.out_path.name
        invert_classes(tiny_pipe, [InversionJob(job.class_index, job.class_name, job.images, single)], **kw)
        a, b = read_token_file(job.out_path), read_token_file(single)
        assert a.checkpoint_steps == b.checkpoint_steps == cfg.checkpoint_steps(len(job.images))
        # same math; a batch of 4 rows instead of 2 changes float rounding, which Adam's
        # normalized updates carry along (~3e-5 after 40 steps); vectors move by ~1e-1
        for s in a.checkpoint_steps:
            torch.testing.assert_close(a.checkpoints[s], b.checkpoints[s], rtol=0, atol=2e-4)
        assert (a.checkpoints[a.steps] - a.checkpoints[10]).abs().max() > 1e-2


def test_bad_input_errors(tiny_pipe, tmp_path):
    with pytest.raises(FillupError, match="no images"):
        _invert(tiny_pipe, [], tmp_path / "x.safetensors")
    with pytest.raises(FillupError, match="init_word"):
        TextualInversionTrainer(
            tiny_pipe, CFG.model_copy(update={"init_word": " "}), resolution=RES, seed=0, model_id="", model_revision=""
        )
