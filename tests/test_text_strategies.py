"""Issue 13: the strategies that make prompts first -- lm_prompts (a language model's N prompts per class,
paper B.1) and captions (one greedy caption per real image, paper B.3) -- store them in the build
(prompts/NNNNN.json), generate from them evenly, record the exact prompt (and the captioned image), build
byte-identically, regenerate exactly and resume a SIGKILLed build per class."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fillup_data.build import run_build
from fillup_data.errors import FillupError
from fillup_data.generation import SampleSpec
from fillup_data.generation.prompt_files import ClassPrompts, prompt_file_path
from fillup_data.generation.strategies import make_strategy
from fillup_data.recipe import GeneratorConfig, LanguageModelConfig, CaptionerConfig, RecipeError, load_recipe
from fillup_data.regenerate import regenerate_sample
from fillup_data.schema.manifest import Manifest
from fillup_data.shards.index_parquet import read_index

from .helpers import split_file_recipe, write_split_file_dataset
from .test_synthesis import DEMO, QUIET

NAMES = ["tabby cat", "fire truck", "ox"]
LM = ["generator.strategy=lm_prompts", "generator.language_model.model=builtin:tiny-t5",
      "generator.language_model.num_prompts=7", "generator.language_model.max_new_tokens=16"]
CAPTIONS = ["generator.strategy=captions", "generator.captioner.model=builtin:tiny-blip",
            "generator.captioner.max_new_tokens=10", "generator.captioner.batch_size=4",
            "generator.captioner.template=a photo, {caption}"]


# ---------------------------------------------------------------- the prompt models
def _lm(model="builtin:tiny-t5", **cfg):
    from fillup_data.models.prompt_models import load_language_model

    return load_language_model(LanguageModelConfig(model=model, **cfg), "cpu")


def test_tiny_t5_prompts_are_seeded_non_empty_and_per_class():
    from fillup_data.generation.prompt_making import language_model_prompts, prompt_seed

    cfg = LanguageModelConfig(model="builtin:tiny-t5", num_prompts=6, max_new_tokens=12)
    lm = _lm(num_prompts=6, max_new_tokens=12)
    assert lm.kind == "seq2seq"
    a, _ = language_model_prompts(lm, cfg, "fire truck", prompt_seed(0, 1))
    b, _ = language_model_prompts(_lm(num_prompts=6, max_new_tokens=12), cfg, "fire truck", prompt_seed(0, 1))
    assert a == b and len(a) == 6 and all(p and p == " ".join(p.split()) for p in a)
    assert language_model_prompts(lm, cfg, "fire truck", prompt_seed(0, 2))[0] != a  # another class, other draws
    assert prompt_seed(0, 1) != prompt_seed(1, 1)


def test_beam_search_returns_the_best_beams_and_a_causal_model_extends_the_input():
    from fillup_data.generation.prompt_making import language_model_prompts, language_model_settings

    beam = LanguageModelConfig(model="builtin:tiny-t5", num_prompts=3, decoding="beam", max_new_tokens=8)
    assert language_model_settings(beam)["num_beams"] == 12  # paper B.1: 4 x n beams for n prompts
    prompts, _ = language_model_prompts(_lm(), beam, "ox", 5)
    assert len(prompts) == 3 and prompts == language_model_prompts(_lm(), beam, "ox", 99)[0]  # no sampling
    gpt = LanguageModelConfig(model="builtin:tiny-gpt2", num_prompts=4, max_new_tokens=8, input="a {class_name}")
    lm = _lm("builtin:tiny-gpt2")
    assert lm.kind == "causal"
    prompts, _ = language_model_prompts(lm, gpt, "tabby cat", 3)
    assert len(prompts) == 4 and all(p.startswith("a tabby cat") for p in prompts)


def test_empty_outputs_are_passed_over_and_too_many_are_an_error(monkeypatch):
    from fillup_data.generation import prompt_making

    cfg = LanguageModelConfig(model="builtin:tiny-t5", num_prompts=3, max_new_tokens=4)
    lm = _lm()
    outputs = iter([["", "a", "  "], ["b", "", "c", "d"]])
    monkeypatch.setattr(prompt_making, "normalize", lambda t: t)
    monkeypatch.setattr(lm.tokenizer, "batch_decode", lambda seqs, **_: [" ".join(x.split()) for x in next(outputs)],
                        raising=False)
    prompts, empty = prompt_making.language_model_prompts(lm, cfg, "ox", 0)
    assert prompts == ["a", "b", "c"] and empty == 3
    monkeypatch.setattr(lm.tokenizer, "batch_decode", lambda seqs, **_: [""] * 3, raising=False)
    with pytest.raises(FillupError, match=r"generator.language_model.*15 empty outputs.*'ox'"):
        prompt_making.language_model_prompts(lm, cfg, "ox", 0)


def test_a_model_of_the_wrong_kind_or_unknown_offline_names_the_field():
    from fillup_data.models.prompt_models import load_captioner

    with pytest.raises(FillupError, match=r"^generator.language_model.model: 'builtin:tiny-blip' is a 'blip' model "
                                          r".*not a text-generation .*generator.captioner"):
        _lm("builtin:tiny-blip")
    with pytest.raises(FillupError, match=r"^generator.captioner.model: 'builtin:tiny-t5' is a 't5' model.*not an "
                                          r"image captioning model.*generator.language_model"):
        load_captioner(CaptionerConfig(model="builtin:tiny-t5"), "cpu")
    with pytest.raises(FillupError, match=r"^generator.language_model.model: cannot load 'nobody-xyz/no-such-lm' "
                                          r"\(revision default\) \(HF_HUB_OFFLINE is set"):
        _lm("nobody-xyz/no-such-lm")
    with pytest.raises(FillupError, match=r"generator.captioner.model: unknown built-in model 'builtin:tiny-git'"):
        load_captioner(CaptionerConfig(model="builtin:tiny-git"), "cpu")


def test_tiny_blip_captions_images_greedily_and_deterministically():
    from fillup_data.demo import world
    from fillup_data.generation.prompt_making import caption_images
    from fillup_data.models.prompt_models import load_captioner

    cfg = CaptionerConfig(model="builtin:tiny-blip", max_new_tokens=8, batch_size=3)
    images = [world.draw(*world.world_classes(10)[c], [1, c, 0], size=32)[0] for c in range(5)]
    captions = caption_images(load_captioner(cfg, "cpu"), cfg, images)
    assert len(captions) == 5 and all(captions) and len(set(captions)) > 1  # each image its own caption
    assert caption_images(load_captioner(cfg, "cpu"), cfg, images) == captions


# ---------------------------------------------------------------- recipe and stored prompts
def test_recipe_blocks_belong_to_their_strategy_and_are_checked():
    with pytest.raises(RecipeError, match=r"generator: .*strategy lm_prompts needs generator.language_model"):
        load_recipe(DEMO, ["generator.strategy=lm_prompts"])
    with pytest.raises(RecipeError, match=r"generator: .*captioner: only used by strategy captions"):
        load_recipe(DEMO, ["generator.captioner.model=builtin:tiny-blip"])
    with pytest.raises(RecipeError, match=r"generator.captioner.template: .*must contain \{caption\}"):
        load_recipe(DEMO, CAPTIONS + ["generator.captioner.template=a photo"])
    with pytest.raises(RecipeError, match=r"generator.language_model: .*num_beams \(4\) must be >= num_prompts \(7\)"):
        load_recipe(DEMO, LM + ["generator.language_model.decoding=beam", "generator.language_model.num_beams=4"])
    with pytest.raises(RecipeError, match=r"generator.language_model.input: .*must contain \{class_name\}"):
        load_recipe(DEMO, LM + ["generator.language_model.input=describe it"])


def _write(out, c, strategy, prompts):
    ClassPrompts(c, NAMES[c], strategy, "m", "main", {}, prompts).write(prompt_file_path(out, c))


def test_stored_prompts_are_used_evenly_and_captions_name_their_image(tmp_path):
    from fillup_data.generation.strategies import StrategyContext

    _write(tmp_path, 1, "lm_prompts", ["p0", "p1", "p2"])
    lm = make_strategy(GeneratorConfig(strategy="lm_prompts", language_model={"model": "m"}), NAMES,
                       StrategyContext(out=tmp_path))
    assert [lm.condition(SampleSpec(1, 0, ordinal=k)).prompt for k in range(5)] == ["p0", "p1", "p2", "p0", "p1"]
    _write(tmp_path, 2, "captions", [{"source_key": "train-real-00002-000000", "caption": "an ox in snow"},
                                     {"source_key": "train-real-00002-000001", "caption": "two oxen"}])
    cap = make_strategy(GeneratorConfig(strategy="captions", captioner={"model": "m", "template": "{class_name}: {caption}"}),
                        NAMES, StrategyContext(out=tmp_path))
    got = [cap.condition(SampleSpec(2, 0, ordinal=k)) for k in range(3)]
    assert [(c.prompt, c.source_key) for c in got] == [("ox: an ox in snow", "train-real-00002-000000"),
                                                      ("ox: two oxen", "train-real-00002-000001"),
                                                      ("ox: an ox in snow", "train-real-00002-000000")]
    with pytest.raises(FillupError, match=r"prompts/00001.json: holds lm_prompts prompts, not captions"):
        cap.condition(SampleSpec(1, 0))
    with pytest.raises(FillupError, match=r"prompts/00000.json: missing"):
        lm.condition(SampleSpec(0, 0))
    prompt_file_path(tmp_path, 0).write_text(json.dumps({**json.loads(prompt_file_path(tmp_path, 1).read_text()),
                                                         "class_index": 0, "prompts": ["ok", ""]}))
    with pytest.raises(FillupError, match=r"prompts/00000.json: prompts\[1\] is not a non-empty string"):
        lm.condition(SampleSpec(0, 0))


# ---------------------------------------------------------------- bad input through the CLI
def _cli_build(tmp_path, counts, generator):
    root = tmp_path / "data"
    write_split_file_dataset(root, counts, test_per_class=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(split_file_recipe(root, generator={
        "model": "builtin:tiny-sd", "guidance_scale": 1.0, "num_inference_steps": 2, "resolution": 32, **generator})))
    return subprocess.run([sys.executable, "-m", "fillup_data.cli", "build", str(recipe), "--out",
                           str(tmp_path / "out"), "--quiet", "--workers", "1"], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("generator, message", [
    ({"strategy": "lm_prompts", "language_model": {"model": "nobody-xyz/no-such-lm"}},
     "generator.language_model.model: cannot load 'nobody-xyz/no-such-lm'"),
    ({"strategy": "captions", "captioner": {"model": "builtin:tiny-t5"}},
     "generator.captioner.model: 'builtin:tiny-t5' is a 't5' model"),
])
def test_cli_bad_prompt_model_exits_2_naming_the_field(tmp_path, generator, message):
    res = _cli_build(tmp_path, [4, 2], generator)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert message in res.stderr


def test_cli_captions_of_a_class_without_real_images_exits_2_before_any_work(tmp_path):
    res = _cli_build(tmp_path, [4, 0, 3], {"strategy": "captions", "captioner": {"model": "builtin:tiny-blip"}})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "'class 1': no training images are listed for it" in res.stderr  # the index refuses it first
    assert not (tmp_path / "out" / "prompts").exists()


def test_captions_refuse_a_planned_class_without_real_images_and_name_a_vanished_image(tmp_path):
    from types import SimpleNamespace

    from fillup_data.index import build_index
    from fillup_data.plan import make_plan
    from fillup_data.recipe import parse_recipe
    from fillup_data.stages.prompts import PromptMaker, prompt_groups

    recipe = load_recipe(DEMO, CAPTIONS)
    plan = SimpleNamespace(classes=[SimpleNamespace(index=0, name="a", real=3, synthetic=2),
                                    SimpleNamespace(index=1, name="b", real=0, synthetic=5)])
    with pytest.raises(FillupError, match=r"generator.strategy captions: 1 class\(es\) .* no real training images "
                                          r"to caption \(1 'b'\)"):
        prompt_groups(recipe, plan)
    # a real image deleted after indexing: the captioning names it and says what to do
    root = tmp_path / "data"
    write_split_file_dataset(root, [3, 2], test_per_class=1)
    recipe = parse_recipe(split_file_recipe(root, generator={"strategy": "captions", "model": "builtin:tiny-sd",
                                                             "captioner": {"model": "builtin:tiny-blip"}}))
    plan = make_plan(recipe, build_index(recipe, workers=1))
    (root / "train" / "n00000001" / "img_1.jpg").unlink()
    with pytest.raises(FillupError, match=r"train.txt:5: the real image train-real-00001-000001 no longer "
                                          r"loads \(missing: train/n00000001/img_1.jpg\).*restore it or rebuild"):
        PromptMaker(recipe, plan).make(1)


def test_prompts_made_for_another_seed_or_other_images_are_made_again(tmp_path):
    """A folder reused across recipes (preview's --tokens) must not serve stale prompts: a class's file
    counts as made only for the same model, settings and sources (the seed; the captioned images)."""
    from fillup_data.index import build_index
    from fillup_data.plan import make_plan
    from fillup_data.recipe import parse_recipe
    from fillup_data.stages.prompts import PromptMaker, make_prompts

    root = tmp_path / "data"
    write_split_file_dataset(root, [3, 2], test_per_class=1)

    def setup(generator, **over):
        recipe = parse_recipe(split_file_recipe(root, generator={"model": "builtin:tiny-sd", **generator}, **over))
        return recipe, make_plan(recipe, build_index(recipe, workers=1))

    def made(recipe, plan):
        return make_prompts(recipe, plan, tmp_path / "work", [0, 1], lambda: PromptMaker(recipe, plan), False)

    lm = {"strategy": "lm_prompts", "language_model": {"model": "builtin:tiny-t5", "num_prompts": 3,
                                                         "max_new_tokens": 8}}
    assert made(*setup(lm)) == 2 and made(*setup(lm)) == 0  # the same recipe again: nothing to make
    assert made(*setup(lm, seed=1)) == 2  # another seed: other prompts
    captions = {"strategy": "captions", "captioner": {"model": "builtin:tiny-blip", "max_new_tokens": 6}}
    assert made(*setup(captions)) == 2 and made(*setup(captions)) == 0
    # one image more in class 1: its captions come from other sources and are made again, class 0's are kept
    write_split_file_dataset(root, [3, 3], test_per_class=1)
    assert made(*setup(captions)) == 1


# ---------------------------------------------------------------- builds
SMALL = ["source.max_images=12", "fill.target=12", "generator.num_inference_steps=3", "generator.batch_size=8",
         "shards.max_samples=40", "generator.model=builtin:tiny-sd", "generator.guidance_scale=1.0"]


def digests(out):
    files = sorted((out / "data").glob("*.tar")) + sorted((out / "prompts").glob("*.json")) + [out / "index.parquet"]
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def synthetic_rows(out):
    return [r for r in read_index(out / "index.parquet") if r["is_synthetic"]]


def _build(tmp_path_factory, name, extra):
    out = tmp_path_factory.mktemp(name) / "out"
    run_build(load_recipe(DEMO, SMALL + extra), out, **QUIET)
    return out


@pytest.fixture(scope="module")
def lm_builds(tmp_path_factory):
    return [_build(tmp_path_factory, name, LM) for name in ("lm-a", "lm-b")]


@pytest.fixture(scope="module")
def captions_build(tmp_path_factory):
    return _build(tmp_path_factory, "cap", CAPTIONS)


def _stored(out, c):
    return ClassPrompts.read(prompt_file_path(out, c), c)


@pytest.mark.slow
def test_lm_prompts_build_records_the_stored_prompt_of_each_sample_and_is_reproducible(lm_builds):
    a, b = lm_builds
    rows = synthetic_rows(a)
    assert rows
    for r in rows:
        stored = _stored(a, r["label"])
        assert stored.strategy == "lm_prompts" and stored.model == "builtin:tiny-t5" and len(stored.prompts) == 7
        ordinal = int(r["key"].rsplit("-", 1)[1])
        assert r["strategy"] == "lm_prompts" and r["source_key"] == "" and r["token_step"] == -1
        assert r["prompt"] == stored.prompts[ordinal % 7]
    manifest = Manifest.read(a / "manifest.json")
    assert {p.path for p in manifest.prompts} == {f"prompts/{c:05d}.json" for c in {r["label"] for r in rows}}
    from fillup_data.hub import plan_files

    published = {f.path for f in plan_files(a, manifest.to_dict(), include_real=False)[0]}
    assert {p.path for p in manifest.prompts} <= published  # publish uploads them with the shards
    assert "prompts/NNNNN.json" in (a / "README.md").read_text()  # and the card says what they are
    assert digests(a) == digests(b)
    res = regenerate_sample(a, rows[-1]["key"])
    assert res.exact, res.summary()


@pytest.mark.slow
def test_captions_build_records_the_caption_and_its_real_image(captions_build):
    out = captions_build
    rows = synthetic_rows(out)
    real = {r["key"] for r in read_index(out / "index.parquet") if not r["is_synthetic"] and r["split"] == "train"}
    for r in rows:
        stored = _stored(out, r["label"]).prompts
        ordinal = int(r["key"].rsplit("-", 1)[1])
        entry = stored[ordinal % len(stored)]
        assert r["strategy"] == "captions" and r["prompt"] == f"a photo, {entry['caption']}"
        assert r["source_key"] == entry["source_key"] and r["source_key"] in real
    for c in {r["label"] for r in rows}:  # one caption per real image of the class, in key order
        keys = sorted(k for k in real if k.startswith(f"train-real-{c:05d}-"))
        assert [e["source_key"] for e in _stored(out, c).prompts] == keys
    res = regenerate_sample(out, rows[0]["key"])
    assert res.exact, res.summary()


@pytest.mark.slow
def test_a_sigkilled_captions_build_resumes_per_class_to_the_same_bytes(captions_build, tmp_path):
    """A real `fillup-data build` killed after some classes' captions are written: the resumed build keeps
    those files (same inode: not made again), makes the rest, and equals the uninterrupted build."""
    out = tmp_path / "out"
    code = ("import sys, torch; torch.set_num_threads(min(2, __import__('os').cpu_count() or 1)); "
            "from fillup_data.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["build", str(DEMO), "--out", str(out), "--quiet", "--workers", "1"]
    for s in SMALL + CAPTIONS:
        args += ["--set", s]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = out / "prompts"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if folder.is_dir() and len(list(folder.glob("0*.json"))) >= 2:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: os.stat(p).st_ino for p in folder.glob("0*.json")}
    total = len(list((captions_build / "prompts").glob("*.json")))
    assert 2 <= len(done) < total, f"killed with {len(done)} of {total} classes captioned"
    assert not (out / ".fillup" / "prompts" / "g00000.json").exists()
    run_build(load_recipe(DEMO, SMALL + CAPTIONS), out, **QUIET)
    assert {p.name: os.stat(p).st_ino for p in folder.glob("0*.json") if p.name in done} == done
    assert digests(out) == digests(captions_build)
