"""Issue 12, generation fast path: our denoising loop equals diffusers' pipeline bit for bit, images
finished on the device as on the host, micro-batch sizing (auto, pinned per build), compile, and the
background shard writer (errors from either thread stop both; same bytes as a serial write)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fillup_data import fastpath
from fillup_data.generation import SampleSpec, SyntheticGenerator, is_bad_image
from fillup_data.generation.generator import to_uint8
from fillup_data.generation.sampler import DenoisingSampler, auto_batch_size, finish_images
from fillup_data.recipe import GeneratorConfig
from tests.test_generation import _count_unet_calls  # UNet rows per call

CLASSES = ["red disc", "blue square", "green star"]


def _cfg(**kw) -> GeneratorConfig:
    base = dict(model="builtin:tiny-sd", resolution=32, num_inference_steps=3, batch_size=4, guidance_scale=1.0,
                strategy="single_template", prompt="a photo of a {class_name}")
    base.update(kw)
    return GeneratorConfig(**base)


def _pipe(scheduler: str):
    from fillup_data.models import load_pipeline

    return load_pipeline("builtin:tiny-sd", device="cpu", scheduler=scheduler)


def _embeds(pipe, rows: int) -> torch.Tensor:
    gen = SyntheticGenerator(pipe, _cfg(batch_size=rows, compile=False), CLASSES)
    return gen.encode([SampleSpec(c % 3, 0) for c in range(rows)])


def _reference(pipe, embeds, seeds, **kw):
    """What diffusers' own pipeline call gives, through the host-side is_bad_image / to_uint8."""
    out = pipe(prompt_embeds=embeds, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
               output_type="np", height=32, width=32, **kw).images
    return np.stack([to_uint8(im) for im in out]), np.array([is_bad_image(im) for im in out])


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler"])
def test_our_loop_is_bit_identical_to_the_pipeline(tiny_model_cache, scheduler):
    pipe = _pipe(scheduler)
    sampler = DenoisingSampler(pipe)
    embeds = _embeds(pipe, 3)
    seeds = [5, 6, 7]
    for guidance in (1.0, 3.0):
        for eta in (0.0, 0.5):
            kw = dict(guidance_scale=guidance, num_inference_steps=3, eta=eta)
            ours = sampler.images(embeds, [torch.Generator("cpu").manual_seed(s) for s in seeds], height=32, width=32,
                                  **kw)
            pixels, bad = _reference(pipe, embeds, seeds, **kw)
            assert ours.pixels.dtype == np.uint8 and ours.pixels.shape == (3, 32, 32, 3)
            assert np.array_equal(ours.pixels, pixels), (scheduler, guidance, eta)
            assert np.array_equal(ours.bad, bad) and not bad.any()
    # eta is a DDIM argument: it changes DDIM's images and no other scheduler's
    eta0, eta1 = (sampler.images(embeds, [torch.Generator("cpu").manual_seed(s) for s in seeds], height=32, width=32,
                                 guidance_scale=1.0, num_inference_steps=3, eta=e).pixels for e in (0.0, 0.5))
    assert np.array_equal(eta0, eta1) == (scheduler != "ddim")


def test_images_are_finished_on_the_device_as_on_the_host():
    g = torch.Generator().manual_seed(0)
    decoded = torch.rand(7, 3, 8, 8, generator=g) * 2.4 - 1.2  # decoder output, partly outside [-1, 1]
    # values whose uint8 rounding sits on a boundary: (v*0.5+0.5)*255 = k + 0.5 exactly or nearly
    edges = torch.tensor([(k + 0.5) / 255 for k in range(0, 255, 7)]) * 2 - 1
    decoded[0, 0, 0, : len(edges[:8])] = edges[:8]
    decoded[1] = -1.0  # black
    decoded[2, 1, 2, 3] = float("nan")
    decoded[3] = -0.999  # every pixel just below 2/255 after denormalizing: black
    decoded[4] = -0.98  # just above: not black
    decoded[5] = 0.0  # what a triggered safety checker returns: grey if denormalized, black if left as it is
    for denormalize in (None, [True, True, True, True, True, False, False]):
        got = finish_images(decoded, denormalize)
        host = decoded.clone()
        for i in range(7):
            if denormalize is None or denormalize[i]:
                host[i] = (host[i] * 0.5 + 0.5).clamp(0, 1)
        host = host.permute(0, 2, 3, 1).float().numpy()
        assert list(got.bad) == [is_bad_image(im) for im in host]
        assert list(got.bad) == [False, True, True, True, False, denormalize is not None, False]
        for i in (0, 1, 3, 4, 5, 6):  # row 6 left as it is (outside [0, 1]): clipped as to_uint8 clips
            assert np.array_equal(got.pixels[i], to_uint8(host[i])), i


def test_safety_checker_black_rows_stay_black_and_are_retried(fresh_tiny_pipe, monkeypatch):
    """A triggered checker returns a black image that diffusers leaves undenormalized: bad, retried
    with the next seed, as with the pipeline call."""
    pipe = fresh_tiny_pipe
    calls = []

    def flag_first_row_once(image, device, dtype):
        calls.append(image.shape[0])
        if len(calls) in (1, 3):  # our first micro-batch, and the pipeline call below
            image = image.clone()
            image[0] = 0.0
            return image, [True] + [False] * (image.shape[0] - 1)
        return image, [False] * image.shape[0]

    monkeypatch.setattr(pipe, "run_safety_checker", flag_first_row_once)
    gen = SyntheticGenerator(pipe, _cfg(batch_size=2), CLASSES)
    got = gen.generate([SampleSpec(1, 40), SampleSpec(2, 50)])
    assert [(s.seed, s.retries) for s in got] == [(41, 1), (50, 0)]
    assert calls == [2, 2]
    # the pipeline gives the same pixels for the same checker verdicts
    pixels, bad = _reference(pipe, gen.encode([SampleSpec(1, 40), SampleSpec(2, 50)]), [40, 50], guidance_scale=1.0,
                             num_inference_steps=3)
    assert list(bad) == [True, False] and (pixels[0] == 0).all()
    assert np.array_equal(np.asarray(got[1].image), pixels[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler"])
def test_no_host_sync_inside_the_denoising_loop_on_cuda(tiny_model_cache, scheduler, monkeypatch):
    """From the first UNet call to the decode, torch raises on any synchronising call."""
    from fillup_data.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd", device="cuda", dtype="float32", scheduler=scheduler)
    unet_forward, decode = pipe.unet.forward, pipe.vae.decode

    def forward(*a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        return unet_forward(*a, **kw)

    def decode_after_loop(*a, **kw):
        torch.cuda.set_sync_debug_mode("default")
        return decode(*a, **kw)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    monkeypatch.setattr(pipe.vae, "decode", decode_after_loop)
    try:
        embeds = _embeds(pipe, 2)
        batch = DenoisingSampler(pipe).images(embeds, [torch.Generator("cpu").manual_seed(s) for s in (1, 2)],
                                              guidance_scale=3.0, num_inference_steps=3, eta=0.5, height=32, width=32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.pixels.shape == (2, 32, 32, 3)


# ---------------------------------------------------------------------------- micro-batch sizing
def test_auto_batch_size_on_cpu_is_the_fixed_cpu_value(tiny_pipe):
    gen = SyntheticGenerator(tiny_pipe, _cfg(batch_size="auto"), CLASSES)
    assert gen.batch_size == fastpath.CPU_GENERATION_BATCH and gen.compiled is False
    setup = gen.pixel_setup()
    assert setup["micro_batch"] == fastpath.CPU_GENERATION_BATCH and setup["compile"] is False
    assert setup["dtype"] == "float32" and setup["device"].startswith("cpu:")


def test_auto_batch_size_on_cuda_fits_the_measured_peak_in_free_memory(tiny_pipe, monkeypatch):
    """The CUDA branch with the memory functions faked: the probe runs the real step + decode."""
    gib = 1 << 30
    probed = []
    calls = _count_unet_calls(tiny_pipe, monkeypatch)

    def fake_peak_of(device, run):
        assert str(device) == "cuda:0"

        def peak_of(n):
            run(n)
            probed.append(n)
            return 2 * gib + n * gib // 2  # 2 GiB fixed + 0.5 GiB per row

        return peak_of

    monkeypatch.setattr(fastpath, "cuda_peak_of", fake_peak_of)
    monkeypatch.setattr(fastpath, "cuda_free_bytes", lambda device: 20 * gib)
    sampler = DenoisingSampler(tiny_pipe)

    def run_rows(n):
        sampler.probe(n, guidance_scale=3.0, height=32, width=32)

    # 0.85 * 20 GiB = 17 GiB: 2 + 0.5 n <= 17 -> n <= 30 -> 24 of the candidates
    assert auto_batch_size("cuda:0", run_rows) == 24
    assert probed == [1, 2] and calls == [2, 4]  # one step each, guidance doubles the rows
    monkeypatch.setattr(fastpath, "cuda_free_bytes", lambda device: 2 * gib)
    assert auto_batch_size("cuda:0", run_rows) == 1  # not even one row fits the budget: 1, it may still run
    assert auto_batch_size("cpu", run_rows) == fastpath.CPU_GENERATION_BATCH


def _recipe(*overrides):
    from pathlib import Path

    from fillup_data.recipe import load_recipe

    demo = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    return load_recipe(demo, ["generator.model=builtin:tiny-sd", "generator.strategy=single_template",
                              "generator.prompt=a photo of a {class_name}", "generator.num_inference_steps=2",
                              "generator.guidance_scale=1.0", *overrides])


CLASS_PLAN = [SimpleNamespace(index=i, name=n) for i, n in enumerate(CLASSES)]


def test_make_generator_pins_auto_batch_size_once_per_build(tiny_pipe, tmp_path):
    from fillup_data.synthesis import make_generator

    out = tmp_path / "build"
    gen = make_generator(_recipe("generator.batch_size=auto"), CLASS_PLAN, out, tiny_pipe)
    pinned = fastpath.pinned_path(out, "generator.batch_size")
    assert gen.batch_size == fastpath.CPU_GENERATION_BATCH
    assert json.loads(pinned.read_text())["value"] == fastpath.CPU_GENERATION_BATCH
    # a resume (or another worker) reads the pinned value, whatever it would resolve to now
    pinned.write_text(json.dumps({"name": "generator.batch_size", "value": 3}))
    assert make_generator(_recipe("generator.batch_size=auto"), CLASS_PLAN, out, tiny_pipe).batch_size == 3
    # an explicit size is used as given and not pinned
    other = tmp_path / "explicit"
    assert make_generator(_recipe("generator.batch_size=5"), CLASS_PLAN, other, tiny_pipe).batch_size == 5
    assert not fastpath.pinned_path(other, "generator.batch_size").exists()


# ---------------------------------------------------------------------------- compile
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


MIXED = [SampleSpec(0, 11), SampleSpec(2, 12), SampleSpec(1, 13), SampleSpec(0, 14), SampleSpec(2, 15)]


@pytest.mark.slow  # compiling the tiny UNet and decoder takes about a minute on 2 cores
def test_compiled_sample_alone_equals_it_in_a_mixed_batch(tiny_model_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    pipe = _pipe("ddim")
    cfg = _cfg(num_inference_steps=2, compile=True)
    compiled = SyntheticGenerator(pipe, cfg, CLASSES)
    assert compiled.compiled and compiled.pixel_setup()["compile"] is True
    batch = compiled.generate(MIXED)  # a full micro-batch of 4 and a padded one
    for spec, sample in zip(MIXED, batch):
        alone = compiled.regenerate(spec)
        assert np.array_equal(np.asarray(alone.image), np.asarray(sample.image)), spec
    assert any(p.is_file() for p in (tmp_path / "inductor").rglob("*"))  # inductor did compile
    eager = SyntheticGenerator(pipe, cfg.model_copy(update={"compile": False}), CLASSES).generate(MIXED)
    psnr = min(_psnr(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(batch, eager))
    with capsys.disabled():
        print(f"\n[compile] eager vs compiled, lowest PSNR over {len(MIXED)} samples: {psnr:.1f} dB")
    assert psnr > 35


# ---------------------------------------------------------------------------- background shard writer
def _shard_setup(n: int, **overrides):
    from fillup_data.plan import ClassPlan, Plan, ShardPlan, SyntheticSample

    recipe = _recipe("generator.batch_size=2", "shards.image_format=png", *overrides)
    classes = [ClassPlan(i, name, 1, 0, n, "few", ()) for i, name in enumerate(CLASSES)]
    samples = [SyntheticSample(f"train-synthetic-{k % 3:05d}-{k:06d}", k % 3, k, 1000 + k, -1) for k in range(n)]
    shard = ShardPlan("train", "synthetic", 0, samples)
    return recipe, Plan(classes, [shard], "single_template"), shard


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def _serial_shard(recipe, plan, shard, out, generator):
    """The shard as the serial code wrote it: generate everything, then write in order, one thread."""
    from fillup_data.shards.writer import ShardWriter, encode_image
    from fillup_data.synthesis import synthetic_metadata

    writer = ShardWriter(out / shard.path, recipe.shards.image_format)
    made = generator.generate([SampleSpec(s.class_index, s.seed, s.token_step) for s in shard.samples])
    for s, g in zip(shard.samples, made):
        meta = synthetic_metadata(recipe, s.class_index, plan.classes[s.class_index].name, g.prompt, g.seed, s.token_step)
        writer.write(s.key, s.class_index, encode_image(g.image, recipe.shards), meta)
    return writer.close()


def test_background_writer_gives_the_bytes_of_a_serial_write(tiny_pipe, tmp_path, monkeypatch):
    import threading

    import fillup_data.synthesis as synthesis
    from fillup_data.shards.writer import ShardWriter

    recipe, plan, shard = _shard_setup(37)  # 3 chunks of 16 (8 micro-batches of 2), the last one partial
    gen = synthesis.make_generator(recipe, plan.classes, tmp_path / "a", tiny_pipe)
    second_chunk = threading.Event()
    calls = []
    original_generate = gen.generate

    def generate(specs, **kw):
        calls.append(len(specs))
        if len(calls) == 2:
            second_chunk.set()
        return original_generate(specs, **kw)

    writers = []

    class OverlapCheckingWriter(ShardWriter):
        """The first chunk's samples are written off the main thread, while the second is generated."""

        def write(self, key, *a, **kw):
            writers.append(threading.current_thread() is threading.main_thread())
            if len(self.records) == 0:
                assert second_chunk.wait(timeout=60), "chunk 2 was not generated while chunk 1 was written"
            super().write(key, *a, **kw)

    monkeypatch.setattr(gen, "generate", generate)
    monkeypatch.setattr(synthesis, "ShardWriter", OverlapCheckingWriter)
    bar = _Bar()
    rows, metas, retries, num_bytes, sha = synthesis.write_synthetic_shard(recipe, plan, shard, tmp_path / "a", gen, bar)
    assert calls == [16, 16, 5] and bar.n == 37 and retries == 0
    assert len(writers) == 37 and not any(writers)
    assert [r["key"] for r in rows] == [s.key for s in shard.samples] and [m["seed"] for m in metas] == [
        s.seed for s in shard.samples]
    serial = _serial_shard(recipe, plan, shard, tmp_path / "b", SyntheticGenerator(tiny_pipe, recipe.generator, CLASSES))
    assert (num_bytes, sha) == serial
    assert (tmp_path / "a" / shard.path).read_bytes() == (tmp_path / "b" / shard.path).read_bytes()


def _threads_named_write():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("write ")]


def test_writer_thread_error_stops_the_shard_and_surfaces(tiny_pipe, tmp_path, monkeypatch):
    import errno

    import fillup_data.synthesis as synthesis
    from fillup_data.shards.writer import ShardWriter

    recipe, plan, shard = _shard_setup(40)
    out = tmp_path / "out"
    gen = synthesis.make_generator(recipe, plan.classes, out, tiny_pipe)
    calls = []
    original_generate = gen.generate
    monkeypatch.setattr(gen, "generate", lambda specs, **kw: calls.append(1) or original_generate(specs, **kw))

    class DiskFull(ShardWriter):
        def write(self, key, *a, **kw):
            if len(self.records) == 5:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
            super().write(key, *a, **kw)

    monkeypatch.setattr(synthesis, "ShardWriter", DiskFull)
    with pytest.raises(OSError, match="No space left on device"):
        synthesis.write_synthetic_shard(recipe, plan, shard, out, gen, _Bar())
    assert sorted(p.name for p in (out / "data").iterdir()) == []  # no partial temp file, no shard
    assert len(calls) < 3  # generation stopped: the last chunk was never made
    assert not _threads_named_write()


def test_main_thread_interrupt_stops_the_writer_thread(tiny_pipe, tmp_path, monkeypatch):
    import fillup_data.synthesis as synthesis
    from fillup_data.shards.writer import ShardWriter

    recipe, plan, shard = _shard_setup(40)
    out = tmp_path / "out"
    gen = synthesis.make_generator(recipe, plan.classes, out, tiny_pipe)
    calls = []
    original_generate = gen.generate

    def interrupted(specs, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("Ctrl-C while generating chunk 2")
        return original_generate(specs, **kw)

    written = []

    class Recording(ShardWriter):
        def write(self, key, *a, **kw):
            super().write(key, *a, **kw)
            written.append(key)

    monkeypatch.setattr(gen, "generate", interrupted)
    monkeypatch.setattr(synthesis, "ShardWriter", Recording)
    with pytest.raises(KeyboardInterrupt, match="chunk 2"):
        synthesis.write_synthetic_shard(recipe, plan, shard, out, gen, _Bar())
    assert sorted(p.name for p in (out / "data").iterdir()) == []
    assert len(written) <= 16 and not _threads_named_write()
