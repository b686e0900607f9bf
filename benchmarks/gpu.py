"""GPU benchmark: the plain diffusers loop a user writes against our generator, inversion and shard writer,
side by side in one run, on the SD 1.5 architecture (``builtin:sd15-random``: full-size, random weights).

Rows (each warmed up once, then timed; compile time falls in the warm-up):

* plain diffusers ``pipe(prompt=[...] * 8)`` at batch 8 (the baseline a user writes);
* ``SyntheticGenerator`` eager (``compile: false``, batch 8), and with the defaults (compile auto, batch auto);
* Textual Inversion at 1 class per pass, at ``classes_per_pass: auto`` eager, and auto with compile
  (class-steps/s: the first pass's steps after two warm-up steps, ``fillup_data.bench``);
* shard writing alone (encode + ``ShardWriter``), images/s;
* a build end to end (``run_build``) of a small recipe: a few classes, a few images, few steps.

Images/s, TFLOP/s against the FLOPs of one image (counted with ``torch.utils.flop_counter`` on this
model and setting: 42.7 TFLOP for SD 1.5 at 512 px and 50 steps), peak GPU memory, retries. Results are
appended to ``benchmarks/RESULTS.md`` as a dated section (device, versions, commit, command), or to ``--out``.

    python benchmarks/gpu.py                 # on a GPU machine: SD 1.5 @ 512 px, DDIM 50, guidance 1.0
    python benchmarks/gpu.py --images 128    # more images per generation row
    python benchmarks/gpu.py --cpu --out /tmp/gpu-cpu.md   # same code paths, tiny model, CPU (smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from provenance import git_commit  # benchmarks/ is on sys.path when a script here runs

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from fillup_data.recipe import parse_recipe  # noqa: E402

PROMPT = "a photo of a {class_name}"
CLASS_NAMES = ["goldfish", "tabby cat", "school bus", "red fox", "volcano", "espresso", "lighthouse", "tulip"]


@dataclass
class Setting:
    device: str
    model: str
    resolution: int
    steps: int
    guidance: float
    images: int  # per generation row
    inversion_steps: int  # timed steps per inversion row
    build_steps: int  # denoising steps in the build row
    build_inversion_steps: int  # inversion steps per class in the build row


GPU = Setting("cuda", "builtin:sd15-random", 512, 50, 1.0, 64, 10, 10, 100)
CPU = Setting("cpu", "builtin:tiny-sd", 32, 4, 1.0, 16, 3, 3, 4)


@dataclass
class Row:
    what: str
    rate: float  # images/s or class-steps/s
    unit: str
    tflops: float | None
    peak_gib: float | None
    retries: int | None
    seconds: float
    warmup_s: float | None = None

    def markdown(self) -> str:
        tf = "-" if self.tflops is None else f"{self.tflops:.3g}"
        mem = "-" if self.peak_gib is None else f"{self.peak_gib:.1f}"
        ret = "-" if self.retries is None else str(self.retries)
        warm = "-" if self.warmup_s is None else f"{self.warmup_s:.1f}"
        return f"| {self.what} | {self.rate:.2f} {self.unit} | {tf} | {mem} | {ret} | {self.seconds:.1f} | {warm} |"


HEADER = ("| row | rate | TFLOP/s | peak GPU GiB | retries | timed s | warm-up s (incl. compile) |\n"
          "|---|---|---|---|---|---|---|")


# --------------------------------------------------------------------------- measurement helpers
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


@torch.no_grad()
def flop_per_image(pipe, s: Setting) -> float:
    """FLOPs of one image at this setting: steps x rows UNet forwards + one VAE decode (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    side = s.resolution // scale
    latents = torch.zeros(1, unet.config.in_channels, side, side, device=unet.device, dtype=unet.dtype)
    ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(unet.device)
    text = pipe.text_encoder(ids)[0].to(unet.dtype)
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor([10], device=unet.device), encoder_hidden_states=text)
    unet_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor)
    rows = 2 if s.guidance > 1 else 1
    return float(s.steps * rows * unet_flops + counter.get_total_flops())


def _recipe(s: Setting, **generator):
    g = {"model": s.model, "strategy": "single_template", "prompt": PROMPT, "resolution": s.resolution,
         "num_inference_steps": s.steps, "guidance_scale": s.guidance, "scheduler": "ddim"}
    g.update(generator)
    return parse_recipe({"name": "gpu-bench", "source": {"kind": "demo"}, "generator": g,
                         "inversion": {"batch_size": 2, "resolution": s.resolution}})


def row_plain_diffusers(pipe, s: Setting, flop: float) -> Row:
    """What a user writes: the pipeline called with a list of 8 prompts."""
    prompts = [PROMPT.format(class_name=CLASS_NAMES[i % len(CLASS_NAMES)]) for i in range(8)]

    def call():
        pipe(prompt=prompts, num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.resolution,
             width=s.resolution, output_type="pil")

    _reset_peak(s.device)
    t0 = time.perf_counter()
    call()
    warm = time.perf_counter() - t0
    batches = max(1, s.images // 8)
    t0 = time.perf_counter()
    for _ in range(batches):
        call()
    _sync(s.device)
    sec = time.perf_counter() - t0
    rate = batches * 8 / sec
    return Row("plain diffusers `pipe(prompt=[...] * 8)`, batch 8", rate, "img/s", rate * flop / 1e12,
               _peak_gib(s.device), None, sec, warm)


def row_generator(pipe, s: Setting, flop: float, label: str, **generator) -> Row:
    from fillup_data.bench import _generator_for
    from fillup_data.generation import SampleSpec

    recipe = _recipe(s, **generator)
    _reset_peak(s.device)
    t0 = time.perf_counter()
    gen = _generator_for(pipe, recipe.generator, CLASS_NAMES)
    batch = int(getattr(gen, "batch_size", None) or gen.cfg.batch_size)
    compiled = bool(getattr(gen, "compiled", False))
    gen.generate([SampleSpec(i % len(CLASS_NAMES), 10_000 + i) for i in range(batch)])  # warm-up (+ compile)
    warm = time.perf_counter() - t0
    n = max(s.images, batch)
    t0 = time.perf_counter()
    out = gen.generate([SampleSpec(i % len(CLASS_NAMES), i) for i in range(n)])
    sec = time.perf_counter() - t0
    rate = n / sec
    return Row(f"{label} (compile {'on' if compiled else 'off'}, batch {batch})", rate, "img/s",
               rate * flop / 1e12, _peak_gib(s.device), sum(g.retries for g in out), sec, warm)


def row_inversion(pipe, s: Setting, label: str, **inversion) -> Row:
    from fillup_data.bench import measure_inversion

    recipe = _recipe(s)
    recipe = recipe.model_copy(update={"inversion": recipe.inversion.model_copy(update=inversion)})
    _reset_peak(s.device)
    t0 = time.perf_counter()
    result = measure_inversion(pipe, recipe, s.inversion_steps, s.device)
    total = time.perf_counter() - t0
    mode = "compiled" if "compiled" in result else "eager"
    (width, rate), = result[mode]["class_steps_per_s"].items()
    return Row(f"{label} ({width} per pass, {mode}, batch 2)", rate, "class-steps/s", None, _peak_gib(s.device),
               None, total - result["warmup_s"], result["warmup_s"])


def row_shard_writing(s: Setting, n: int) -> Row:
    """Encode (JPEG q95) and write ``n`` generated-size images through ShardWriter: the CPU side of a shard."""
    from PIL import Image

    from fillup_data.shards.writer import ShardWriter, encode_image
    from fillup_data.synthesis import synthetic_metadata

    recipe = _recipe(s)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (max(1, s.resolution // 8), max(1, s.resolution // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((s.resolution, s.resolution), Image.BILINEAR)  # photo-like file sizes
    with tempfile.TemporaryDirectory(prefix="fillup-gpu-bench-") as tmp:
        writer = ShardWriter(Path(tmp) / "train-synthetic-00000.tar", recipe.shards.image_format)
        t0 = time.perf_counter()
        for i in range(n):
            meta = synthetic_metadata(recipe, i % 8, CLASS_NAMES[i % 8], "a photo", i, -1)
            writer.write(f"train-synthetic-{i % 8:05d}-{i:06d}", i % 8, encode_image(image, recipe.shards), meta)
        writer.close()
        sec = time.perf_counter() - t0
    return Row(f"shard writing alone ({recipe.shards.image_format} q{recipe.shards.quality}, {s.resolution} px)",
               n / sec, "img/s", None, None, None, sec)


def row_build(s: Setting) -> Row:
    """A small build end to end: index, Textual Inversion of the tail classes, generation, shards, manifest."""
    from fillup_data.build import run_build

    recipe = parse_recipe({
        "name": "gpu-bench-build",
        "source": {"kind": "demo", "num_classes": 10, "max_images": 12, "min_images": 5, "test_per_class": 0,
                   "image_size": 32},
        "fill": {"policy": "fill_to", "target": 7},
        "generator": {"model": s.model, "strategy": "textual_inversion", "resolution": s.resolution,
                      "num_inference_steps": s.build_steps, "guidance_scale": s.guidance},
        "inversion": {"steps_per_image": 1, "min_steps": s.build_inversion_steps,
                      "max_steps": s.build_inversion_steps, "checkpoint_every": s.build_inversion_steps},
        "shards": {"image_format": "jpg", "max_samples": 100},
    })
    _reset_peak(s.device)
    with tempfile.TemporaryDirectory(prefix="fillup-gpu-bench-build-") as tmp:
        t0 = time.perf_counter()
        summary = run_build(recipe, Path(tmp) / "out", progress=False, log=lambda *a, **k: None)
        sec = time.perf_counter() - t0
    return Row(f"build end to end ({summary.synthetic} synthetic images, {s.build_steps} steps, "
               f"{s.build_inversion_steps} inversion steps per class; incl. model load, inversion, compile)", summary.synthetic / sec, "img/s", None,
               _peak_gib(s.device), None, sec)


# --------------------------------------------------------------------------- report
def provenance(s: Setting) -> list[str]:
    import diffusers

    commit = git_commit()
    device = torch.cuda.get_device_name() if s.device.startswith("cuda") else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- device: {device}",
            f"- torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}",
            f"- commit: {commit}",
            f"- command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`",
            f"- setting: {s.model}, {s.resolution} px, DDIM {s.steps} steps, guidance {s.guidance}, "
            f"{s.images} images per generation row, {s.inversion_steps} timed inversion steps per row"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny model on CPU: the same code paths, a smoke test")
    ap.add_argument("--images", type=int, default=None, help="images per generation row")
    ap.add_argument("--out", default=None, help="markdown file to append the section to (default benchmarks/RESULTS.md)")
    args = ap.parse_args(argv)
    s = CPU if args.cpu else GPU
    if args.images:
        s.images = args.images
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or use --cpu for the smoke test", file=sys.stderr)
        return 2
    from fillup_data.fastpath import configure_compile_cache
    from fillup_data.models import load_pipeline

    configure_compile_cache()
    lines = provenance(s)
    print("\n".join(lines), flush=True)
    pipe = load_pipeline(s.model, device=s.device, scheduler="ddim")
    flop = flop_per_image(pipe, s)
    lines.append(f"- FLOPs per image (counted): {flop / 1e12:.3f} TFLOP")
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(row.markdown(), flush=True)

    print(HEADER, flush=True)
    # eager rows first, on one pipeline; each compiled row gets a fresh pipeline (compile wraps modules)
    add(plain := row_plain_diffusers(pipe, s, flop))
    add(row_generator(pipe, s, flop, "ours, eager", compile=False, batch_size=8))
    add(row_inversion(pipe, s, "inversion, 1 class per pass", classes_per_pass=1, compile=False))
    add(row_inversion(pipe, s, "inversion, auto", classes_per_pass="auto", compile=False))
    add(fast := row_generator(pipe, s, flop, "ours, defaults"))
    del pipe
    pipe = load_pipeline(s.model, device=s.device, scheduler="ddim")
    add(row_inversion(pipe, s, "inversion, auto + compile auto", classes_per_pass="auto", compile="auto"))
    del pipe
    add(row_shard_writing(s, 4 * s.images))
    add(row_build(s))

    lines.append(f"- ours with the defaults / plain diffusers batch 8: {fast.rate / plain.rate:.2f}x")
    section = "\n".join([f"\n## GPU benchmark ({'CPU smoke run' if args.cpu else 'GPU'}), "
                         f"{datetime.date.today().isoformat()}\n", *lines, "", HEADER, *[r.markdown() for r in rows], ""])
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "RESULTS.md"
    with open(out, "a", encoding="utf-8") as f:
        f.write(section)
    print(f"\n{lines[-1][2:]}\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
