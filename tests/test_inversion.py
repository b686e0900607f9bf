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

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The byte-for-byte comparisons here (a class trained with neighbours or alone, resumed or not) hold at a
    fixed CPU thread count: two threads split a reduction over a batch of two classes differently from one
    padded class.  One thread, as the full suite already runs once test_loader is imported; set here so
    this file alone gives the same answer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# Continuous batching at K=3 slots: A (2 images, 20 steps), B (4, 40) and C (3, 30) start together;
# A finishes and D (3, 30) takes its slot at B's step 21; D runs its last 10 steps with two padded
# slots. Checkpoints every 10 steps. (K=3: on this CPU a pass of 6 rows rounds differently from one of
# 2, so a pass that shrank would show in the bytes; 2 and 4 rows happen to round alike.)
SLOT_CFG = InversionConfig(steps_per_image=10, min_steps=20, max_steps=40, checkpoint_every=10, classes_per_pass=3,
                           pad_passes=True)
SLOT_KW = dict(cfg=SLOT_CFG, resolution=RES, seed=0, model_id="builtin:tiny-sd", model_revision="", progress=False)


def _slot_jobs(folder):
    return [
        InversionJob(1, "red disc", draw_class_images(2), folder / "00001.safetensors"),
        InversionJob(2, "blue disc", draw_class_images(4, colour=(20, 20, 200), shape_colour=(240, 240, 0)),
                     folder / "00002.safetensors"),
        InversionJob(5, "green disc", draw_class_images(3, colour=(20, 200, 20), shape_colour=(200, 0, 200)),
                     folder / "00005.safetensors"),
        InversionJob(6, "grey disc", draw_class_images(3, colour=(90, 90, 90), shape_colour=(250, 250, 250)),
                     folder / "00006.safetensors"),
    ]


@pytest.fixture(scope="module")
def slotted(tiny_pipe, tmp_path_factory):
    """The four classes through three slots, uninterrupted (D enters A's slot when A finishes)."""
    jobs = _slot_jobs(tmp_path_factory.mktemp("slotted"))
    invert_classes(tiny_pipe, jobs, **SLOT_KW)
    return jobs


def test_joint_training_matches_single_class_training(tiny_pipe, slotted, tmp_path):
    """Exact: at the same K, a class trained with neighbours (in any slot, entering early or late when
    a slot frees) ends with the same bytes as the class trained alone (its other slot padded)."""
    steps = {job.class_index: read_token_file(job.out_path).steps for job in slotted}
    assert steps == {1: 20, 2: 40, 5: 30, 6: 30}  # unequal: class 6 entered class 1's slot at step 21
    for job in slotted:
        alone = tmp_path / job.out_path.name
        invert_classes(tiny_pipe, [InversionJob(job.class_index, job.class_name, job.images, alone)], **SLOT_KW)
        assert alone.read_bytes() == job.out_path.read_bytes(), f"class {job.class_index}"
    tf = read_token_file(slotted[1].out_path)
    assert (tf.checkpoints[40] - tf.checkpoints[10]).abs().max() > 1e-2  # it did learn something


def test_resume_mid_run_with_classes_at_other_steps_gives_same_bytes(tiny_pipe, slotted, tmp_path):
    jobs = _slot_jobs(tmp_path)
    order = []

    def crash(class_index, step, loss):
        order.append((class_index, step))
        if class_index == 6 and step == 15:  # class 2 is at step 35 (its callback comes after, slot 1)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_classes(tiny_pipe, jobs, **SLOT_KW, step_callback=crash)
    assert (2, 34) in order and (6, 1) in order and order.index((6, 1)) > order.index((1, 20))
    assert is_complete(jobs[0].out_path) and is_complete(jobs[2].out_path)
    assert json.loads(load_safetensors(partial_path(jobs[1].out_path))[1]["step"]) == 30
    assert json.loads(load_safetensors(partial_path(jobs[3].out_path))[1]["step"]) == 10

    # class 2 resumes in slot 0 (it ran in slot 1) at step 31, class 6 in slot 1 (was 0) at step 11
    resumed = []
    invert_classes(tiny_pipe, jobs, **SLOT_KW, step_callback=lambda c, s, loss: resumed.append((c, s)))
    assert resumed[:2] == [(2, 31), (6, 11)]
    for job, ref in zip(jobs, slotted):
        assert job.out_path.read_bytes() == ref.out_path.read_bytes(), f"class {job.class_index}"


def test_passes_are_padded_only_when_asked_or_compiled(tiny_pipe, tmp_path, monkeypatch):
    """pad_passes auto (eager here): the pass shrinks as classes finish (no compute on padding rows, the
    CPU demo's case); pad_passes true: every pass is K classes wide. Either way the same steps are run."""
    from fillup_data.inversion.trainer import TextualInversionTrainer

    rows = []
    real = TextualInversionTrainer._pass_losses

    def count(self, latents, *args, **kw):
        rows.append(latents.shape[0])
        return real(self, latents, *args, **kw)

    monkeypatch.setattr(TextualInversionTrainer, "_pass_losses", count)
    bsz = SLOT_CFG.batch_size
    for pad, folder in ((True, "padded"), ("auto", "shrinking")):
        rows.clear()
        kw = {**SLOT_KW, "cfg": SLOT_CFG.model_copy(update={"pad_passes": pad})}
        invert_classes(tiny_pipe, _slot_jobs(tmp_path / folder), **kw)
        # steps 20/40/30/30 in three slots; class 6 enters class 1's slot at pass 21: 50 passes
        if pad is True:
            assert rows == [3 * bsz] * 50
        else:  # class 5 ends after pass 30, class 2 after 40, class 6 runs alone to 50
            assert rows == [3 * bsz] * 30 + [2 * bsz] * 10 + [1 * bsz] * 10
        extra = read_token_file(tmp_path / folder / "00002.safetensors").extra
        assert extra["pad_passes"] is (pad is True)


def test_token_file_records_how_it_was_computed(slotted):
    extra = read_token_file(slotted[0].out_path).extra
    assert extra["classes_per_pass"] == 3 and extra["compile"] is False
    assert extra["device"].startswith("cpu:") and extra["dtype"] == "float32" and extra["mixed_precision"] == "no"


def test_resume_with_another_pass_width_still_resumes(tiny_pipe, tmp_path):
    images = draw_class_images(2)
    out = tmp_path / "00001.safetensors"

    def crash(class_index, step, loss):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        invert_classes(tiny_pipe, [InversionJob(1, "red disc", images, out)], **SLOT_KW, step_callback=crash)
    steps_run = []
    other = SLOT_CFG.model_copy(update={"classes_per_pass": 1, "classes_per_task": 5, "compile": "auto"})
    invert_classes(tiny_pipe, [InversionJob(1, "red disc", images, out)], **{**SLOT_KW, "cfg": other},
                   step_callback=lambda c, s, loss: steps_run.append(s))
    assert steps_run[0] == 11 and read_token_file(out).extra["classes_per_pass"] == 1


def test_auto_classes_per_pass_on_cpu_and_cuda_sizing_with_fakes(tiny_pipe, monkeypatch):
    from fillup_data import fastpath
    from fillup_data.inversion.trainer import classes_per_pass_for, resolve_classes_per_pass

    assert resolve_classes_per_pass(tiny_pipe, CFG, resolution=RES) == fastpath.CPU_CLASSES_PER_PASS
    assert resolve_classes_per_pass(tiny_pipe, SLOT_CFG, resolution=RES) == 3  # an explicit int as given

    trainer = TextualInversionTrainer(tiny_pipe, CFG, resolution=RES, seed=0, model_id="", model_revision="")
    probed, asked = [], []

    def fake_peak_of(device, run):
        asked.append(str(device))

        def peak_of(n):
            run(n)  # the real probe: one forward and backward of n classes on the tiny pipeline
            probed.append(n)
            return 1000 + 100 * n  # 1000 bytes fixed, 100 per class

        return peak_of

    monkeypatch.setattr(fastpath, "cuda_peak_of", fake_peak_of)
    monkeypatch.setattr(fastpath, "cuda_free_bytes", lambda device: 3000)
    # budget 0.85 * 3000 = 2550 -> 1000 + 100 n fits up to n = 15; the largest candidate below is 12
    assert classes_per_pass_for(torch.device("cuda"), trainer.probe_pass) == 12
    assert probed == [1, 2] and asked == ["cuda"]
    monkeypatch.setattr(fastpath, "cuda_free_bytes", lambda device: 10**9)
    assert classes_per_pass_for("cuda:0", trainer.probe_pass) == max(fastpath.CLASSES_PER_PASS_CANDIDATES)
    assert not any(p.requires_grad for p in tiny_pipe.unet.parameters())


@pytest.mark.slow
def test_compiled_unet_trains_and_gives_identical_bytes(tiny_pipe, tmp_path):
    cfg = InversionConfig(steps_per_image=1, min_steps=3, max_steps=3, checkpoint_every=3, compile=True,
                          classes_per_pass=2)
    kw = dict(cfg=cfg, resolution=RES, seed=0, model_id="builtin:tiny-sd", model_revision="", progress=False)
    images = draw_class_images(2)
    paths = []
    for run in ("a", "b"):
        paths.append(invert_classes(tiny_pipe, [InversionJob(1, "red disc", images, tmp_path / run / "t.safetensors")],
                                    **kw)[0])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    tf = read_token_file(paths[0])
    assert tf.extra["compile"] is True and tf.steps == 3 and all(torch.isfinite(v).all() for v in tf.checkpoints.values())


def test_bad_input_errors(tiny_pipe, tmp_path):
    with pytest.raises(FillupError, match="no images"):
        _invert(tiny_pipe, [], tmp_path / "x.safetensors")
    with pytest.raises(FillupError, match="init_word"):
        TextualInversionTrainer(
            tiny_pipe, CFG.model_copy(update={"init_word": " "}), resolution=RES, seed=0, model_id="", model_revision=""
        )


def _demo_recipe(*overrides):
    from pathlib import Path

    from fillup_data.recipe import load_recipe

    return load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml",
                       ["generator.model=builtin:tiny-sd", *overrides])


def test_inversion_tasks_are_classes_per_task_slices_whatever_the_pass_width():
    from types import SimpleNamespace

    from fillup_data.stages.invert import inversion_groups

    plan = SimpleNamespace(classes=[SimpleNamespace(index=i, real=5 + i, synthetic=0 if i in (0, 4) else 5)
                                    for i in range(10)])
    for per_pass in ("auto", "1", "3", "9"):
        recipe = _demo_recipe("inversion.classes_per_task=3", f"inversion.classes_per_pass={per_pass}")
        assert inversion_groups(recipe, plan) == [[1, 2, 3], [5, 6, 7], [8, 9]]
        auto = _demo_recipe(f"inversion.classes_per_pass={per_pass}")
        assert inversion_groups(auto, plan) == [[1, 2, 3, 5, 6, 7, 8, 9]]  # auto: one task below 64 classes


def _shaped_plan(counts):
    from types import SimpleNamespace

    return SimpleNamespace(classes=[SimpleNamespace(index=i, real=n, synthetic=1) for i, n in enumerate(counts)])


def test_auto_inversion_tasks_cost_the_same_and_divide_among_8_gpus():
    """ImageNet-LT's shape in class order: 16 slices of 64 classes differ in class-steps, so 8 GPUs wait on
    the dearest; auto tasks hold every class once, in plan order, with near-equal class-steps."""
    import numpy as np

    from fillup_data.cost import wall_clock
    from fillup_data.stages.invert import inversion_groups

    rng = np.random.default_rng(0)
    counts = list(rng.permutation(np.r_[rng.integers(101, 1281, 385), rng.integers(20, 101, 479),
                                        rng.integers(5, 20, 136)]))
    plan = _shaped_plan(counts)
    recipe = _demo_recipe("inversion.steps_per_image=100", "inversion.min_steps=2000", "inversion.max_steps=10000",
                          "inversion.checkpoint_every=100")
    steps = [recipe.inversion.steps_for(n) for n in counts]
    auto = inversion_groups(recipe, plan)
    assert len(auto) == 16 and sorted(c for g in auto for c in g) == list(range(1000))
    assert all(g == sorted(g) and len(g) >= 32 for g in auto)
    cost = [sum(steps[c] for c in g) for g in auto]
    assert max(cost) - min(cost) <= max(steps)  # LPT: within one class of each other
    slices = inversion_groups(_demo_recipe("inversion.classes_per_task=64", "inversion.steps_per_image=100",
                                           "inversion.min_steps=2000", "inversion.max_steps=10000",
                                           "inversion.checkpoint_every=100"), plan)
    even = sum(steps) / 8
    assert wall_clock(cost, 8) <= 1.01 * even < wall_clock([sum(steps[c] for c in g) for g in slices], 8)
    # iNaturalist's 8,142 classes: 128 tasks (a multiple of 8); Places-LT's 365: 8 tasks of 45 or 46
    assert len(inversion_groups(recipe, _shaped_plan([5] * 8142))) == 128
    assert sorted(len(g) for g in inversion_groups(recipe, _shaped_plan([5] * 365)))[::7] == [45, 46]


def test_invert_all_pins_auto_once_and_hands_all_classes_to_one_call(tiny_pipe, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import fillup_data.inversion as inversion_pkg
    import fillup_data.stages.invert as invert_stage
    from fillup_data import fastpath

    calls = []
    monkeypatch.setattr(inversion_pkg, "invert_classes", lambda pipe, jobs, **kw: calls.append((jobs, kw)))
    monkeypatch.setattr(invert_stage, "load_class_images", lambda recipe, items: draw_class_images(len(items)))
    plan = SimpleNamespace(classes=[SimpleNamespace(index=i, name=f"c{i}", synthetic=3) for i in range(5)])
    index = SimpleNamespace(items={"train": [SimpleNamespace(label=i % 5) for i in range(10)]})
    out = tmp_path / "out"
    recipe = _demo_recipe("inversion.classes_per_pass=auto")
    assert invert_stage.invert_all(recipe, plan, index, out, tiny_pipe, False) == 5
    (jobs, kw), = calls  # one call, every unfinished class: the trainer's slots do the slicing
    assert [j.class_index for j in jobs] == [0, 1, 2, 3, 4] and kw["classes_per_pass"] == 1  # CPU
    pinned = json.loads(fastpath.pinned_path(out, "inversion.classes_per_pass").read_text())
    assert pinned["value"] == 1
    # a later worker (another machine, other free memory) uses the pinned value, not its own
    fastpath.pinned_path(out, "inversion.classes_per_pass").write_text(json.dumps({"value": 7}))
    invert_stage.invert_all(recipe, plan, index, out, tiny_pipe, False, classes=[3, 4])
    assert [j.class_index for j in calls[1][0]] == [3, 4] and calls[1][1]["classes_per_pass"] == 7
    invert_stage.invert_all(_demo_recipe("inversion.classes_per_pass=2"), plan, index, out, tiny_pipe, False)
    assert calls[2][1]["classes_per_pass"] == 2  # an explicit int is used as given


def test_a_task_opens_the_source_once_and_loads_a_class_only_when_it_enters_a_slot(tiny_pipe, tmp_path, monkeypatch):
    """At iNaturalist's size opening the source parses 460K list lines (0.4 s): once per class it cost most of
    an hour. And a task's classes hold tens of thousands of decoded photos at ImageNet's size if loaded up
    front: each class's images are loaded when it enters a slot, after the class before it has finished."""
    from types import SimpleNamespace

    import fillup_data.stages.invert as invert_stage

    opened, loads = [], []
    real_open = invert_stage.open_source
    monkeypatch.setattr(invert_stage, "open_source", lambda recipe: opened.append(1) or real_open(recipe))

    def load(recipe, items, source=None):
        finished = sorted(p.name for p in (tmp_path / "out" / "tokens").glob("*.safetensors"))
        loads.append((items[0].label, finished))
        return draw_class_images(len(items))

    monkeypatch.setattr(invert_stage, "load_class_images", load)
    plan = SimpleNamespace(classes=[SimpleNamespace(index=i, name=f"c{i}", synthetic=3, real=2) for i in range(3)])
    index = SimpleNamespace(items={"train": [SimpleNamespace(label=i % 3) for i in range(6)]})
    recipe = _demo_recipe("inversion.classes_per_pass=1", "inversion.min_steps=2", "inversion.max_steps=2",
                          "inversion.checkpoint_every=1", "generator.resolution=32")
    assert invert_stage.invert_all(recipe, plan, index, tmp_path / "out", tiny_pipe, False) == 3
    assert len(opened) == 1
    assert loads == [(0, []), (1, ["00000.safetensors"]), (2, ["00000.safetensors", "00001.safetensors"])]
