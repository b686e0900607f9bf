"""Issue 13, the image-to-image strategies (paper 3.1, B.2): image_variation (SD image variations) and
reimagine (SD 2.1 unCLIP). Each varies the real images of the class evenly and records the source's key;
our denoising loop is bit-identical to the diffusers pipeline call; builds are byte-identical and every
sample regenerates exactly from the build alone."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from fillup_data.build import run_build
from fillup_data.errors import FillupError
from fillup_data.generation import SampleSpec, SyntheticGenerator
from fillup_data.generation.generator import to_uint8
from fillup_data.generation.strategies import Condition, StrategyContext, make_strategy
from fillup_data.recipe import GeneratorConfig, RecipeError, load_recipe
from fillup_data.regenerate import regenerate_sample
from fillup_data.shards.index_parquet import read_index

from .test_synthesis import DEMO, QUIET

VARIATION, UNCLIP = "builtin:tiny-sd-image-variation", "builtin:tiny-sd-unclip"
CLASSES = ["red disc", "blue square"]


def _sources(n: int) -> dict[str, Image.Image]:
    """``n`` distinct real images of class 0 by key, of another size than the model's (the feature
    extractor resizes and crops them, as it does a user's photos)."""
    return {f"real-00000-{i:06d}": Image.fromarray((np.random.RandomState(i).rand(40, 48, 3) * 255).astype(np.uint8))
            for i in range(n)}


def _generator(pipe, images: dict, rows: int, **cfg) -> SyntheticGenerator:
    base = dict(resolution=32, num_inference_steps=3, batch_size=rows, compile=False)
    base.update(cfg)
    context = StrategyContext(real_keys=[sorted(images), []], load_real=images.__getitem__)
    return SyntheticGenerator(pipe, GeneratorConfig(**base), CLASSES, context=context)


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _ours(gen: SyntheticGenerator, specs) -> np.ndarray:
    return np.stack([np.asarray(s.image) for s in gen.generate(specs)])


def _pixels(out) -> np.ndarray:
    return np.stack([to_uint8(im) for im in out.images])


@pytest.fixture(scope="module")
def variation_pipe(fillup_cache):
    from fillup_data.models import load_pipeline

    return load_pipeline(VARIATION, device="cpu", pipeline_class="StableDiffusionImageVariationPipeline")


@pytest.fixture(scope="module")
def unclip_pipe(fillup_cache):
    from fillup_data.models import load_pipeline

    return load_pipeline(UNCLIP, device="cpu", pipeline_class="StableUnCLIPImg2ImgPipeline")


# ---------------------------------------------------------------- even use of the sources
@pytest.mark.parametrize("strategy", ["image_variation", "reimagine"])
def test_sample_k_varies_real_image_k_mod_n_of_its_class(strategy):
    keys = [[f"real-00000-{i:06d}" for i in range(5)], [f"real-00001-{i:06d}" for i in (3, 7)]]
    s = make_strategy(GeneratorConfig(strategy=strategy), CLASSES, StrategyContext(real_keys=keys))
    conditions = [s.condition(SampleSpec(0, seed=0, ordinal=k)) for k in range(13)]
    assert [c.source_key for c in conditions] == [keys[0][k % 5] for k in range(13)]
    assert set(Counter(c.source_key for c in conditions).values()) == {2, 3}  # 13 = 2 x 5 + 3
    assert all(c.prompt == "" for c in conditions)  # paper: no prompt
    assert s.condition(SampleSpec(1, seed=0, ordinal=3)).source_key == "real-00001-000007"
    with pytest.raises(FillupError, match=f"{strategy}: needs the real images"):
        make_strategy(GeneratorConfig(strategy=strategy), CLASSES).condition(SampleSpec(0, 0))
    with pytest.raises(FillupError, match="class 1 has no real training images"):
        make_strategy(GeneratorConfig(strategy=strategy), CLASSES,
                      StrategyContext(real_keys=[keys[0], []])).condition(SampleSpec(1, 0))


def test_reimagine_records_the_prompt_it_used():
    s = make_strategy(GeneratorConfig(strategy="reimagine", prompt="a photo of a {class_name}"), CLASSES,
                      StrategyContext(real_keys=[["a"], ["b"]]))
    assert s.condition(SampleSpec(1, seed=0, ordinal=0)) == s.condition(SampleSpec(1, seed=9, ordinal=4))
    assert s.condition(SampleSpec(1, seed=0)).prompt == "a photo of a blue square"


def test_paper_defaults_of_the_image_strategies():
    v, r = GeneratorConfig(strategy="image_variation"), GeneratorConfig(strategy="reimagine")
    assert (v.model, v.guidance_scale, v.prompt, v.resolution) == ("lambdalabs/sd-image-variations-diffusers", 3.0,
                                                                   "", 512)
    assert (r.model, r.guidance_scale, r.prompt, r.resolution, r.noise_level) == (
        "stabilityai/stable-diffusion-2-1-unclip", 10.0, "", 768, 0)
    # given values win; a stored (resolved) recipe reads back as it was
    assert GeneratorConfig(strategy="reimagine", guidance_scale=4.0, resolution=32).guidance_scale == 4.0
    assert GeneratorConfig(**r.model_dump()) == r


# ---------------------------------------------------------------- our loop == the diffusers pipeline
def test_image_variation_loop_is_bit_identical_to_the_pipeline(variation_pipe):
    pipe = variation_pipe
    images = _sources(3)
    keys = sorted(images)
    seeds = [5, 6, 7]
    for guidance in (1.0, 3.0):
        gen = _generator(pipe, images, 3, strategy="image_variation", model=VARIATION, guidance_scale=guidance)
        # three samples of one source (ordinals 0, 3, 6 of 3 sources): the pipeline's num_images_per_prompt
        ours = _ours(gen, [SampleSpec(0, s, ordinal=3 * i) for i, s in enumerate(seeds)])
        ref = pipe(images[keys[0]], num_images_per_prompt=3, generator=_generators(seeds), guidance_scale=guidance,
                   num_inference_steps=3, height=32, width=32, output_type="np")
        assert np.array_equal(ours, _pixels(ref)), guidance
    # each source's conditioning is the pipeline's, computed for that image alone (the image encoder gives
    # other bits inside a batch: one at a time keeps a sample independent of its micro-batch neighbours)
    for k in keys:
        ref = pipe._encode_image(images[k], pipe.device, 1, False)
        assert torch.equal(gen.strategy.encode(pipe, [], [gen.condition(SampleSpec(0, 0, ordinal=keys.index(k)))])
                           .embeds, ref)


@pytest.mark.parametrize("guidance,prompt,noise_level", [(1.0, "", 0), (10.0, "", 0),
                                                         (10.0, "a photo of a {class_name}", 250)])
def test_reimagine_loop_is_bit_identical_to_the_pipeline(unclip_pipe, guidance, prompt, noise_level):
    pipe = unclip_pipe
    images = _sources(3)
    keys = sorted(images)
    cfg = dict(strategy="reimagine", model=UNCLIP, guidance_scale=guidance, prompt=prompt, noise_level=noise_level)
    text = prompt.replace("{class_name}", CLASSES[0])
    call = dict(noise_level=noise_level, guidance_scale=guidance, num_inference_steps=3, height=32, width=32,
                output_type="np")
    # one sample alone: the pipeline call on the PIL image, image encoder included
    gen = _generator(pipe, images, 1, **cfg)
    ours = _ours(gen, [SampleSpec(0, 11, ordinal=1)])
    ref = pipe(images[keys[1]], prompt=text, generator=_generators([11]), **call)
    assert np.array_equal(ours, _pixels(ref))
    # three sources in one micro-batch: the pipeline given the same (per-image) embeddings; the
    # embedding noise comes from each sample's own generator, before its latents
    gen = _generator(pipe, images, 3, **cfg)
    specs = [SampleSpec(0, s, ordinal=i) for i, s in enumerate((20, 21, 22))]
    ours = _ours(gen, specs)
    embeds = gen.strategy.image_embeddings(pipe, [gen.condition(s) for s in specs])
    ref = pipe(image_embeds=embeds, prompt=[text] * 3, generator=_generators([20, 21, 22]), **call)
    assert np.array_equal(ours, _pixels(ref))


def test_a_sample_alone_equals_it_in_a_mixed_micro_batch(unclip_pipe):
    """Regeneration's premise for these strategies: the cached per-source embedding and the per-sample
    embedding noise make a row independent of the other rows' sources."""
    images = _sources(4)
    gen = _generator(unclip_pipe, images, 3, strategy="reimagine", model=UNCLIP, guidance_scale=10.0, noise_level=100)
    batch = gen.generate([SampleSpec(0, 30 + k, ordinal=k) for k in range(3)])
    fresh = _generator(unclip_pipe, images, 3, strategy="reimagine", model=UNCLIP, guidance_scale=10.0,
                       noise_level=100)
    # as regenerate does it: the recorded seed, prompt and source_key
    alone = fresh.regenerate(SampleSpec(0, 32), Condition(batch[2].prompt, batch[2].source_key))
    assert alone.source_key == batch[2].source_key == sorted(images)[2]
    assert np.array_equal(np.asarray(alone.image), np.asarray(batch[2].image))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_memory_probe_runs_the_image_conditioned_shapes(variation_pipe, unclip_pipe, guidance):
    """``generator.batch_size: auto`` probes one step + decode on CUDA; the probe must feed each pipeline's
    UNet what it takes (one image-embedding token; unCLIP's class labels) -- run here on CPU."""
    from fillup_data.generation.sampler import DenoisingSampler

    for pipe in (variation_pipe, unclip_pipe):
        calls = []
        handle = pipe.unet.register_forward_hook(lambda m, a, kw, out: calls.append((kw["encoder_hidden_states"].shape,
                                                                                    kw.get("class_labels"))),
                                                 with_kwargs=True)
        try:
            DenoisingSampler(pipe).probe(2, guidance_scale=guidance, height=32, width=32)
        finally:
            handle.remove()
        (shape, labels), = calls
        rows = 4 if guidance > 1 else 2
        assert shape[0] == rows and shape[-1] == pipe.unet.config.cross_attention_dim
        assert shape[1] == (1 if pipe is variation_pipe else pipe.tokenizer.model_max_length)
        assert (labels is None) == (pipe is variation_pipe)
        assert labels is None or tuple(labels.shape) == (rows, 64)


# ---------------------------------------------------------------- bad input
def test_a_pipeline_of_the_wrong_class_is_refused_naming_the_model(fillup_cache):
    from fillup_data.generation.strategies import strategy_class

    with pytest.raises(FillupError, match=r"generator.model: 'builtin:tiny-sd' is a StableDiffusionPipeline, but "
                                          r"generator.strategy image_variation needs a StableDiffusionImageVariation"):
        strategy_class("image_variation").load_pipeline(GeneratorConfig(strategy="image_variation",
                                                                        model="builtin:tiny-sd"), device="cpu")
    with pytest.raises(FillupError, match=r"'builtin:tiny-sd-image-variation' is a StableDiffusionImageVariationPipeline"
                                          r", but generator.strategy reimagine needs a StableUnCLIPImg2ImgPipeline"):
        strategy_class("reimagine").load_pipeline(GeneratorConfig(strategy="reimagine", model=VARIATION), device="cpu")
    with pytest.raises(FillupError, match=r"is a StableDiffusionImageVariationPipeline, but generator.strategy "
                                          r"clip_templates needs a StableDiffusionPipeline"):
        strategy_class("clip_templates").load_pipeline(GeneratorConfig(strategy="clip_templates", model=VARIATION),
                                                       device="cpu")
    with pytest.raises(FillupError, match="generator.safety_checker: true, but a StableUnCLIPImg2ImgPipeline has no"):
        strategy_class("reimagine").load_pipeline(GeneratorConfig(strategy="reimagine", model=UNCLIP,
                                                                  safety_checker=True), device="cpu")


def test_recipe_errors_name_the_field():
    with pytest.raises(RecipeError, match=r"generator.noise_level: only used by strategy reimagine, not 'image_varia"):
        load_recipe(DEMO, ["generator.strategy=image_variation", "generator.prompt=''", "generator.noise_level=10"])
    with pytest.raises(RecipeError, match=r"generator.noise_level: only used by strategy reimagine, not 'textual_inv"):
        load_recipe(DEMO, ["generator.noise_level=10"])
    with pytest.raises(RecipeError, match=r"generator.noise_level: .*less than or equal to 999"):
        load_recipe(DEMO, ["generator.strategy=reimagine", "generator.prompt=''", "generator.noise_level=1000"])
    with pytest.raises(RecipeError, match=r"generator.prompt: strategy image_variation .* takes no prompt"):
        load_recipe(DEMO, ["generator.strategy=image_variation"])  # demo.yaml's prompt is a TI one
    with pytest.raises(RecipeError, match=r"generator.prompt: strategy reimagine has no learned token"):
        load_recipe(DEMO, ["generator.strategy=reimagine"])
    assert load_recipe(DEMO, ["generator.strategy=reimagine", "generator.prompt=''",
                              "generator.noise_level=100"]).generator.noise_level == 100


def test_cli_exits_2_naming_the_field(tmp_path, capsys):
    from fillup_data.cli import main

    assert main(["validate", str(DEMO), "--set", "generator.noise_level=3"]) == 2
    err = capsys.readouterr().err
    assert "generator.noise_level: only used by strategy reimagine" in err and "Traceback" not in err
    out = tmp_path / "out"
    assert main(["build", str(DEMO), "--out", str(out), "--set", "generator.strategy=image_variation",
                 "--set", "generator.prompt=''", "--set", "generator.model=builtin:tiny-sd", "--set",
                 "source.max_images=6", "--set", "fill.target=6", "--set", "source.test_per_class=0"]) == 2
    err = capsys.readouterr().err
    assert "generator.model: 'builtin:tiny-sd' is a StableDiffusionPipeline" in err and "Traceback" not in err


# ---------------------------------------------------------------- builds
SMALL = ["source.max_images=8", "fill.target=12", "source.test_per_class=0", "generator.num_inference_steps=2",
         "generator.batch_size=8", "shards.max_samples=40", "generator.prompt=''"]
KINDS = {
    # the paper's guidance for each; reimagine's real shards are jpg: the sources must be the stored pixels
    "image_variation": [f"generator.model={VARIATION}", "generator.guidance_scale=3.0"],
    "reimagine": [f"generator.model={UNCLIP}", "generator.guidance_scale=10.0", "shards.image_format=jpg"],
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def builds(request, tmp_path_factory):
    strategy = request.param
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"{strategy}-{name}") / "out"
        run_build(load_recipe(DEMO, SMALL + KINDS[strategy] + [f"generator.strategy={strategy}"]), out, **QUIET)
        outs.append(out)
    return strategy, outs


def _digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.tar"))}


@pytest.mark.slow
def test_build_records_each_samples_source_and_regenerates_exactly(builds, tmp_path):
    strategy, (a, b) = builds
    rows = read_index(a / "index.parquet")
    real = defaultdict(list)
    for r in rows:
        if not r["is_synthetic"] and r["split"] == "train":
            real[r["label"]].append(r["key"])
    synthetic = [r for r in rows if r["is_synthetic"]]
    assert synthetic
    used = defaultdict(Counter)
    for r in synthetic:
        ordinal = int(r["key"].rsplit("-", 1)[1])
        keys = sorted(real[r["label"]])
        assert r["strategy"] == strategy and r["prompt"] == "" and r["token_step"] == -1
        assert r["source_key"] == keys[ordinal % len(keys)], r["key"]
        used[r["label"]][r["source_key"]] += 1
    for label, counts in used.items():  # each source of a class used evenly
        n = sum(counts.values())
        assert len(counts) == min(n, len(real[label])) and max(counts.values()) - min(counts.values()) <= 1
    assert any(max(c.values()) > 1 for c in used.values())  # some class has more samples than sources
    assert _digests(a) == _digests(b)
    assert (a / "index.parquet").read_bytes() == (b / "index.parquet").read_bytes()
    card = (a / "README.md").read_text()
    assert "variations of the class's real training images, each used evenly (`source_key`)" in card
    assert "prompt ``" not in card and "Textual Inversion per class" not in card
    for r in (synthetic[0], synthetic[-1]):
        res = regenerate_sample(a, r["key"])
        assert res.exact, res.summary()

    # a build without its real shards (as published without them) cannot make them again, and says why
    bare = tmp_path / "bare"
    shutil.copytree(a, bare)
    import pyarrow.parquet as pq

    table = pq.read_table(bare / "index.parquet")
    pq.write_table(table.filter(table.column("is_synthetic")), bare / "index.parquet")
    with pytest.raises(FillupError, match="published without its real shards cannot regenerate"):
        regenerate_sample(bare, synthetic[0]["key"])


# ---------------------------------------------------------------- plan, preview, bench
@pytest.mark.parametrize("strategy,model", [("image_variation", VARIATION), ("reimagine", UNCLIP)])
def test_plan_preview_and_bench_run_for_the_image_strategies(strategy, model, tmp_path, capsys, fillup_cache):
    from fillup_data.cli import main
    from fillup_data.cost import bench_rates_path, this_device_kind

    args = [str(DEMO)]
    for s in ["source.max_images=8", "fill.target=8", "source.test_per_class=0", "generator.num_inference_steps=2",
              "generator.batch_size=2", "generator.prompt=''", f"generator.strategy={strategy}",
              f"generator.model={model}"]:
        args += ["--set", s]
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert f"strategy {strategy}" in out and "0 inversion class-steps" in out and "run `fillup-data bench" in out

    grid = tmp_path / "preview.png"
    assert main(["preview", *args, "--classes", "9", "--n", "2", "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] > 0 and "preview of 1 class(es)" in capsys.readouterr().out

    rates = bench_rates_path(load_recipe(DEMO, args[2::2]), this_device_kind())
    try:
        assert main(["bench", "--quick", *args, "--device", "cpu"]) == 0
        assert "generation (eager, batch 2)" in capsys.readouterr().out and rates.is_file()
    finally:
        rates.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_source_image_that_fails_mid_build_is_no_samples_source(tmp_path, monkeypatch):
    """An image the source cannot load when the real shard is written is skipped and reported there; the
    variations are then drawn from the images the real shards hold (not from the source again), so no
    sample names a source missing from the build and every sample still regenerates exactly."""
    from fillup_data.sources import ImageLoadError
    from fillup_data.demo.source import DemoSource

    from fillup_data.index import build_index

    out = tmp_path / "out"
    recipe = load_recipe(DEMO, SMALL + KINDS["image_variation"] + ["generator.strategy=image_variation"])
    index = build_index(recipe, workers=1)
    broken = [it for it in index.items["train"] if it.label == 0][1]  # class 0's second image breaks after indexing
    load = DemoSource.load

    def flaky(self, item):
        if item == broken:
            raise ImageLoadError("undecodable", "broke after indexing")
        return load(self, item)

    monkeypatch.setattr(DemoSource, "load", flaky)
    run_build(recipe, out, **QUIET)
    rows = read_index(out / "index.parquet")
    real0 = sorted(r["key"] for r in rows if r["label"] == 0 and not r["is_synthetic"] and r["split"] == "train")
    assert len(real0) == len([it for it in index.items["train"] if it.label == 0]) - 1
    synthetic0 = [r for r in rows if r["label"] == 0 and r["is_synthetic"]]
    assert synthetic0 and {r["source_key"] for r in synthetic0} <= set(real0)
    for r in synthetic0:  # still used evenly, over the images the build holds
        assert r["source_key"] == real0[int(r["key"].rsplit("-", 1)[1]) % len(real0)]
    monkeypatch.setattr(DemoSource, "load", load)
    assert regenerate_sample(out, synthetic0[-1]["key"]).exact
