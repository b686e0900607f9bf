"""Issue 13: the generation strategies behind one interface; each names its exact prompt or source in
every sample's metadata, uses its per-class list evenly, and builds byte-identically twice."""

import hashlib
from collections import Counter

import pytest

from fillup_data.build import run_build
from fillup_data.errors import FillupError
from fillup_data.generation import SampleSpec
from fillup_data.generation.strategies import REGISTRY, make_strategy, strategy_class
from fillup_data.generation.strategies.templates import CLIP_TEMPLATES
from fillup_data.recipe import GeneratorConfig, RecipeError, load_recipe
from fillup_data.regenerate import regenerate_sample
from fillup_data.shards.index_parquet import read_index

from .test_synthesis import DEMO, QUIET

NAMES = ["tabby cat", "fire truck", "ox"]


def test_clip_templates_are_the_papers_80_in_figure_order():
    assert len(CLIP_TEMPLATES) == 80 == len(set(CLIP_TEMPLATES))
    assert all(t.count("{class_name}") == 1 for t in CLIP_TEMPLATES)
    # figure A9: first and last of the left column, first and last of the right one
    assert CLIP_TEMPLATES[0] == "a bad photo of a {class_name}."
    assert CLIP_TEMPLATES[39] == "the cartoon {class_name}."
    assert CLIP_TEMPLATES[40] == "a cropped photo of a {class_name}."
    assert CLIP_TEMPLATES[79] == "a tattoo of the {class_name}."


def test_clip_templates_are_used_evenly_per_class():
    s = make_strategy(GeneratorConfig(strategy="clip_templates"), NAMES)
    prompts = [s.condition(SampleSpec(1, seed=0, ordinal=k)).prompt for k in range(200)]
    counts = Counter(prompts)
    assert len(counts) == 80 and set(counts.values()) == {2, 3}  # 200 = 2 x 80 + 40: the first 40 thrice
    assert prompts[0] == "a bad photo of a fire truck." and prompts[80] == prompts[0]
    assert prompts[79] == "a tattoo of the fire truck."
    assert s.condition(SampleSpec(1, seed=0, ordinal=7)).source_key == ""


def test_recipe_templates_replace_the_papers_and_are_checked():
    cfg = GeneratorConfig(strategy="clip_templates", templates=["{class_name} at dusk", "a toy {class_name}"])
    s = make_strategy(cfg, NAMES)
    assert [s.condition(SampleSpec(2, 0, ordinal=k)).prompt for k in range(3)] == ["ox at dusk", "a toy ox", "ox at dusk"]
    with pytest.raises(ValueError, match=r"templates\[1\].*must contain \{class_name\}"):
        GeneratorConfig(strategy="clip_templates", templates=["a {class_name}", "a photo"])
    with pytest.raises(ValueError, match="only used by strategy clip_templates"):
        GeneratorConfig(strategy="single_template", prompt="a {class_name}", templates=["a {class_name}"])


def test_single_template_and_registry():
    s = make_strategy(GeneratorConfig(strategy="single_template", prompt="a photo of a {class_name}"), NAMES)
    assert s.condition(SampleSpec(0, 0, ordinal=5)).prompt == "a photo of a tabby cat"
    assert {"single_template", "clip_templates", "textual_inversion"} <= set(REGISTRY)
    assert strategy_class("textual_inversion").inverts and not strategy_class("clip_templates").inverts
    with pytest.raises(FillupError, match="generates no images"):
        strategy_class("none")


def test_an_unknown_strategy_names_the_field():
    with pytest.raises(RecipeError, match="generator.strategy"):
        load_recipe(DEMO, ["generator.strategy=clip_template"])


# ---------------------------------------------------------------- builds
SMALL = ["source.max_images=12", "fill.target=12", "generator.num_inference_steps=3", "generator.batch_size=8",
         "shards.max_samples=40", "generator.model=builtin:tiny-sd", "generator.guidance_scale=1.0"]


def build_twice(tmp_path_factory, *extra):
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(name) / "out"
        run_build(load_recipe(DEMO, SMALL + list(extra)), out, **QUIET)
        outs.append(out)
    return outs


def synthetic_rows(out):
    return [r for r in read_index(out / "index.parquet") if r["is_synthetic"]]


def shard_digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.tar"))}


@pytest.fixture(scope="module")
def clip_builds(tmp_path_factory):
    return build_twice(tmp_path_factory, "generator.strategy=clip_templates")


@pytest.mark.slow
def test_clip_templates_build_records_each_samples_exact_prompt(clip_builds):
    a, b = clip_builds
    rows = synthetic_rows(a)
    assert rows
    per_class = Counter()
    for r in rows:
        ordinal = int(r["key"].rsplit("-", 1)[1])
        assert r["strategy"] == "clip_templates" and r["source_key"] == "" and r["token_step"] == -1
        assert r["prompt"] == CLIP_TEMPLATES[ordinal % 80].replace("{class_name}", r["class_name"])
        per_class[r["label"]] += 1
    # every filled class used its first templates once each, in order (its ordinals are 0..n-1)
    for c, n in per_class.items():
        prompts = sorted(int(r["key"].rsplit("-", 1)[1]) for r in rows if r["label"] == c)
        assert prompts == list(range(n))
    assert shard_digests(a) == shard_digests(b)
    assert (a / "index.parquet").read_bytes() == (b / "index.parquet").read_bytes()
    # the card says what conditioned the images, not the recipe's unused prompt field
    card = (a / "README.md").read_text()
    assert "(the 80 CLIP prompt templates with the class name)" in card
    assert "the 80 CLIP templates of the paper's figure A9 with the class name, used evenly per class" in card
    assert "{token}" not in card and "Textual Inversion per class" not in card


@pytest.mark.slow
def test_clip_templates_sample_regenerates_exactly_from_its_metadata(clip_builds):
    a, _ = clip_builds
    rows = synthetic_rows(a)
    for r in (rows[0], rows[-1]):
        res = regenerate_sample(a, r["key"])
        assert res.exact, res.summary()
