"""``fillup-data bench --quick``: this machine's generation and inversion rates, for ``plan``.

Loads the recipe's model on this machine's device with the recipe's generator and inversion settings
and measures, in a couple of minutes:

* generation: a warm-up micro-batch (compile time, when compiling, is reported apart and kept out of
  the rates), then timed micro-batches at two step counts; the difference gives the UNet time per
  row-step, the rest is the per-image fixed part (text encoding, VAE decode, finishing the image);
* inversion: a few steps of ``invert_classes`` at the classes per pass the trainer resolves, timed
  from the step callbacks after two warm-up steps, on random images of the inversion resolution.

Generation runs with ``single_template`` prompts: a learned token costs the same text-encoder pass, and
the bench then needs no token files; the image-to-image strategies run as they are, on random source images. The rates are written to ``$FILLUP_CACHE/rates/`` keyed by model
and device kind, in the shipped rates' schema, so ``plan`` scales them to a recipe the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fillup_data import __version__
from fillup_data.cost import bench_rates_path, model_key
from fillup_data.errors import FillupError
from fillup_data.recipe import Recipe

BENCH_CLASSES = 4  # class names the generation prompts cycle through
LOW_STEPS, HIGH_STEPS = 2, 6  # denoising steps of the two timed micro-batch kinds
INVERSION_WARMUP_STEPS = 2


@dataclass
class BenchResult:
    path: Path
    rates: dict
    lines: list[str] = field(default_factory=list)

    def format(self) -> str:
        return "\n".join(self.lines + [f"rates written to {self.path} (`fillup-data plan` uses them for this model "
                                       "on this kind of device)"])


def _generator_for(pipe, cfg, names, context=None):
    from fillup_data.generation import SyntheticGenerator

    return SyntheticGenerator(pipe, cfg, names, context=context)  # resolves batch_size auto itself


def _random_sources(resolution: int):
    """For strategies that vary real images: one random image per bench class (a photo costs the image
    encoder the same; it runs once per source and worker, as in a build)."""
    import numpy as np
    from PIL import Image

    from fillup_data.generation.strategies import StrategyContext

    rng = np.random.default_rng(0)
    images = {f"bench-{c}": Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8))
              for c in range(BENCH_CLASSES)}
    return StrategyContext(real_keys=[[f"bench-{c}"] for c in range(BENCH_CLASSES)], load_real=images.__getitem__)


def _timed_batch(gen, specs, steps: int) -> float:
    gen.cfg = gen.cfg.model_copy(update={"num_inference_steps": steps})
    t0 = time.perf_counter()
    gen.generate(specs)
    return time.perf_counter() - t0


def measure_generation(pipe, recipe: Recipe, rounds: int) -> dict:
    """UNet seconds per row-step and fixed seconds per image, at the recipe's resolution and batch."""
    from fillup_data.generation import SampleSpec

    names = [f"bench class {i}" for i in range(BENCH_CLASSES)]
    from fillup_data.generation.strategies import strategy_class

    if strategy_class(recipe.generator.strategy).uses_real_images:  # the recipe's own strategy, on random sources
        cfg = recipe.generator.model_copy(update={"max_retries": 0})
        gen = _generator_for(pipe, cfg, names, _random_sources(cfg.resolution))
    else:
        cfg = recipe.generator.model_copy(update={"strategy": "single_template",
                                                  "prompt": "a photo of a {class_name}", "max_retries": 0})
        gen = _generator_for(pipe, cfg, names)
    batch = int(getattr(gen, "batch_size", None) or gen.cfg.batch_size)
    compiled = bool(getattr(gen, "compiled", False))
    specs = [SampleSpec(i % BENCH_CLASSES, 1000 + i) for i in range(batch)]
    warm = _timed_batch(gen, specs, LOW_STEPS)
    low, high = [], []
    for _ in range(rounds):
        low.append(_timed_batch(gen, specs, LOW_STEPS))
        high.append(_timed_batch(gen, specs, HIGH_STEPS))
    t_low, t_high = min(low), min(high)  # the least disturbed run of each
    rows = 2 if cfg.guidance_scale > 1 else 1
    unet = max(t_high - t_low, 1e-9) / ((HIGH_STEPS - LOW_STEPS) * batch * rows)
    fixed = max(t_low / batch - LOW_STEPS * rows * unet, 0.0)
    return {
        "resolution": cfg.resolution,
        "reference_batch_size": batch,
        "compiled" if compiled else "eager": {"unet_row_step_s": unet, "decode_image_s": fixed, "overhead_factor": 1.0},
        "warmup_s": warm,
        "compile_s": max(warm - t_low, 0.0) if compiled else 0.0,
    }


def measure_inversion(pipe, recipe: Recipe, timed_steps: int, device: str) -> dict:
    """Class-steps/s of the trainer at the classes per pass it resolves (first pass only)."""
    import numpy as np
    from PIL import Image

    from fillup_data.fastpath import compile_enabled
    from fillup_data.inversion import InversionJob, invert_classes
    from fillup_data.inversion.trainer import resolve_classes_per_pass

    inv = recipe.inversion
    res = inv.resolution or recipe.generator.resolution
    total = INVERSION_WARMUP_STEPS + timed_steps
    cfg = inv.model_copy(update={"min_steps": total, "max_steps": total, "checkpoint_every": total})
    # K jobs of equal length: every pass is full, as in the middle of a real task
    width = resolve_classes_per_pass(pipe, inv, resolution=res)
    cfg = cfg.model_copy(update={"classes_per_pass": width})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)) for _ in range(2)]
    marks: dict[int, float] = {}  # step -> time the pass's last class reported it

    def on_step(class_index: int, step: int, loss: float) -> None:
        marks[step] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fillup-bench-") as tmp:
        jobs = [InversionJob(c, f"bench class {c}", images, Path(tmp) / f"{c:05d}.safetensors") for c in range(width)]
        t0 = time.perf_counter()
        invert_classes(pipe, jobs, cfg=cfg, resolution=res, seed=0, model_id=recipe.generator.model,
                       model_revision=recipe.generator.revision or "", progress=False, step_callback=on_step)
    warm_end, end = marks[INVERSION_WARMUP_STEPS], marks[total]
    rate = width * timed_steps / max(end - warm_end, 1e-9)
    compiled = compile_enabled(inv.compile, device)
    return {
        "resolution": res,
        "batch_size": inv.batch_size,
        "auto_classes_per_pass": width,
        "compiled" if compiled else "eager": {"class_steps_per_s": {str(width): rate}},
        "warmup_s": warm_end - t0,
    }


def run_bench(recipe: Recipe, device: str | None = None, quick: bool = True) -> BenchResult:
    import diffusers
    import torch

    from fillup_data.fastpath import configure_compile_cache, device_description
    from fillup_data.generation.strategies import strategy_class
    from fillup_data.models import default_device

    if recipe.generator.strategy == "none":
        raise FillupError("generator.strategy is none: a build of this recipe uses no model, there is nothing to bench")
    device = device or default_device()
    configure_compile_cache()
    t0 = time.perf_counter()
    pipe = strategy_class(recipe.generator.strategy).load_pipeline(recipe.generator, device=device)
    load_s = time.perf_counter() - t0
    kind = device_description(device)
    rounds, timed_steps = (2, 4) if quick else (5, 12)
    g = recipe.generator
    lines = [f"bench of {model_key(recipe)} on {kind} ({g.resolution} px, guidance {g.guidance_scale}, "
             f"compile {g.compile}, batch {g.batch_size}); model loaded in {load_s:.1f}s"]
    rates = {
        "kind": "fillup-data rates",
        "source": "fillup-data bench" + (" --quick" if quick else ""),
        "device": kind,
        "model": model_key(recipe),
        "measured": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "fillup_version": __version__,
        "settings": {"generator": g.model_dump(mode="json"), "inversion": recipe.inversion.model_dump(mode="json")},
    }
    gen = measure_generation(pipe, recipe, rounds)
    rates["generation"] = gen
    m = gen.get("compiled") or gen["eager"]
    per_image = g.num_inference_steps * (2 if g.guidance_scale > 1 else 1) * m["unet_row_step_s"] + m["decode_image_s"]
    lines.append(f"generation ({'compiled' if 'compiled' in gen else 'eager'}, batch {gen['reference_batch_size']}): "
                 f"UNet {m['unet_row_step_s'] * 1000:.2f} ms per row-step, {m['decode_image_s'] * 1000:.1f} ms per "
                 f"image outside the loop -> {1 / per_image:.2f} images/s at {g.num_inference_steps} steps "
                 f"(warm-up {gen['warmup_s']:.1f}s, compile {gen['compile_s']:.1f}s, excluded)")
    if g.strategy == "textual_inversion":
        inv = measure_inversion(pipe, recipe, timed_steps, device)
        rates["inversion"] = inv
        mode = "compiled" if "compiled" in inv else "eager"
        (width, rate), = inv[mode]["class_steps_per_s"].items()
        lines.append(f"inversion ({mode}, {width} classes per pass, batch {inv['batch_size']}, {inv['resolution']} px): "
                     f"{rate:.2f} class-steps/s (warm-up incl. compile {inv['warmup_s']:.1f}s, excluded)")
    path = bench_rates_path(recipe, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rates, indent=2) + "\n")
    os.replace(tmp, path)
    return BenchResult(path, rates, lines)
