"""What a build costs before it starts: the work a plan implies and the GPU time it takes.

Work is exact (counted from the plan). Time is a cost model of the SD 1.5 architecture, scaled from
measured rates to the recipe's settings: a synthetic image costs ``steps x rows`` UNet row-steps plus
one VAE decode (``rows`` = 2 with guidance > 1: diffusers then runs the unconditional half too), both
scaled by pixels; an inversion class-step scales by its batch size and pixels. Pixel scaling is linear,
which understates attention's quadratic part at resolutions well above the measured one.

Rates come from ``fillup-data bench --quick`` on this machine (``$FILLUP_CACHE/rates/``, same model
and device kind) when present, else from the H100 figures shipped with the package when the model is
SD 1.5/2.x-sized; for any other model the planner prints the work and says to run the bench. Nothing
here loads a model or touches the network.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.plan import Plan
from fillup_data.recipe import Recipe

SHIPPED_RATES = "h100-sd15.json"
# UNet config fields that make a model "SD 1.5/2.x-sized": the same convolution widths and depth (SD 2.x
# differs only in the text width and head count, which cost little next to the convolutions).
SD_SIZED_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "in_channels": 4}
SD_SIZED_BUILTINS = {"builtin:sd15-random"}


# --------------------------------------------------------------------------- work
@dataclass(frozen=True)
class Work:
    synthetic_images: int
    inversion_class_steps: int
    token_classes: int
    real_images: int
    inversion_tasks: list[list[int]] = field(default_factory=list)  # per task: each class's steps
    generation_tasks: list[int] = field(default_factory=list)  # per synthetic shard: its image count


def work_of(recipe: Recipe, plan: Plan) -> Work:
    """Exact work of a plan: images to generate, TI class-steps (paper B.3 steps per class that gets a
    token, i.e. has synthetic images to make), real images to pack; and how it is cut into tasks."""
    from fillup_data.stages.invert import inversion_groups

    groups = inversion_groups(recipe, plan)  # the build's own tasks
    tasks = [[recipe.inversion.steps_for(plan.classes[c].real) for c in g] for g in groups]
    return Work(
        synthetic_images=plan.num_synthetic,
        inversion_class_steps=sum(map(sum, tasks)),
        token_classes=sum(map(len, groups)),
        real_images=sum(c.real + c.test for c in plan.classes),
        inversion_tasks=tasks,
        generation_tasks=[s.num_samples for s in plan.shards_of("train", "synthetic")],
    )


# --------------------------------------------------------------------------- rates
@dataclass(frozen=True)
class Rates:
    data: dict
    path: Path
    measured_here: bool  # True: written by ``fillup-data bench`` on a machine like this one

    def describe(self) -> str:
        d = self.data
        where = "measured here by `fillup-data bench`" if self.measured_here else "shipped with fillup-data"
        versions = f"torch {d.get('torch', '?')}, diffusers {d.get('diffusers', '?')}"
        at = f" at commit {d['commit']}" if d.get("commit") else (
            f" with fillup-data {d['fillup_version']}" if d.get("fillup_version") else "")
        return f"{where}: {d.get('device', '?')}, {d.get('measured', '?')}{at}, {versions} ({self.path})"


def read_rates(path: Path, measured_here: bool = False) -> Rates:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise FillupError(f"{path}: unreadable rates file ({err}); delete it or run `fillup-data bench --quick` again") from err
    if not isinstance(data, dict) or data.get("kind") != "fillup-data rates" or "generation" not in data:
        raise FillupError(f"{path}: not a fillup-data rates file; delete it or run `fillup-data bench --quick` again")
    return Rates(data, Path(path), measured_here)


def shipped_rates() -> Rates:
    path = resources.files("fillup_data") / "rates" / SHIPPED_RATES
    return read_rates(Path(str(path)))


def rates_dir() -> Path:
    """``$FILLUP_CACHE/rates`` or ``~/.cache/fillup-data/rates``."""
    from fillup_data.cache import cache_dir

    return cache_dir("rates")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def model_key(recipe: Recipe) -> str:
    g = recipe.generator
    return f"{g.model}@{g.revision or 'main'}"


def bench_rates_path(recipe: Recipe, device_kind: str) -> Path:
    """Where ``bench`` writes (and ``plan`` looks for) this model's rates on this kind of device."""
    return rates_dir() / f"{_slug(model_key(recipe))}--{_slug(device_kind)}.json"


def this_device_kind() -> str:
    from fillup_data.fastpath import device_description

    return device_description()


# --------------------------------------------------------------------------- architecture
def shipped_rates_apply(recipe: Recipe) -> tuple[bool, str]:
    """Whether the shipped SD 1.5 rates describe the recipe's model, and why (never downloads)."""
    model = recipe.generator.model
    if model in SD_SIZED_BUILTINS:
        return True, f"{model} is the SD 1.5 architecture"
    if model.startswith("builtin:"):
        return False, f"{model} is not SD 1.5/2.x-sized"
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _unet_config_applies(folder / "unet" / "config.json")
    cached = _cached_hub_unet_config(model, recipe.generator.revision)
    if cached is not None:
        return _unet_config_applies(cached)
    return True, f"{model} assumed SD 1.5/2.x-sized (its unet/config.json is not in the local cache, not checked)"


def _unet_config_applies(path: Path) -> tuple[bool, str]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        return False, f"{path}: cannot read the UNet config ({err.__class__.__name__})"
    differs = [k for k, v in SD_SIZED_UNET.items() if config.get(k) != v]
    if differs:
        shown = ", ".join(f"{k} {config.get(k)!r}" for k in differs)
        return False, f"{path}: UNet is not SD 1.5/2.x-sized ({shown})"
    return True, f"{path}: SD 1.5/2.x-sized UNet"


def _cached_hub_unet_config(model: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "unet/config.json", revision=revision)
    except Exception:  # an id the hub library rejects is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def choose_rates(recipe: Recipe, device_kind: str | None = None) -> tuple[Rates | None, str]:
    """Bench rates for this model and device kind if present, else the shipped ones if they apply.
    Returns ``(None, reason)`` when neither does."""
    # the device kind needs torch (half a gigabyte): asked only when this model has bench rates at all
    measured = device_kind is not None or any(rates_dir().glob(f"{_slug(model_key(recipe))}--*.json"))
    if measured:
        path = bench_rates_path(recipe, device_kind if device_kind is not None else this_device_kind())
        if path.is_file():
            return read_rates(path, measured_here=True), ""
    applies, why = shipped_rates_apply(recipe)
    if applies:
        return shipped_rates(), why
    return None, why


# --------------------------------------------------------------------------- time
@dataclass
class Estimate:
    rates: Rates
    inversion_s: float
    generation_s: float
    image_s: float  # seconds per synthetic image
    class_steps_per_s: dict[int, float]  # width -> class-steps/s used
    notes: list[str]
    inversion_task_s: list[float]
    generation_task_s: list[float]

    @property
    def total_s(self) -> float:
        return self.inversion_s + self.generation_s


def _compiled_wanted(setting, rates: Rates) -> bool:
    from fillup_data.fastpath import compile_enabled

    return compile_enabled(setting, "cuda" if str(rates.data.get("device", "")).startswith("cuda") else "cpu")


def _mode(section: dict, compiled: bool, what: str, notes: list[str]) -> dict:
    want = "compiled" if compiled else "eager"
    if want in section:
        return section[want]
    have = "eager" if want == "compiled" else "compiled"
    notes.append(f"{what}: no {want} rate measured, the {have} one is used")
    return section[have]


def _batch_efficiency(table: dict, batch: int) -> float:
    """Throughput relative to the reference batch, interpolated in log2(batch), clamped at the ends."""
    points = sorted((int(k), float(v)) for k, v in table.items())
    if not points:
        return 1.0
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, e0), (b1, e1) in zip(points, points[1:]):
        if batch <= b1:
            f = (math.log2(batch) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return e0 + f * (e1 - e0)
    return points[-1][1]


def seconds_per_image(recipe: Recipe, rates: Rates, notes: list[str]) -> float:
    g = recipe.generator
    gen = rates.data["generation"]
    m = _mode(gen, _compiled_wanted(g.compile, rates), "generation", notes)
    pixels = (g.resolution / gen["resolution"]) ** 2
    rows = 2 if g.guidance_scale > 1 else 1
    seconds = m["overhead_factor"] * pixels * (g.num_inference_steps * rows * m["unet_row_step_s"] + m["decode_image_s"])
    batch = gen["reference_batch_size"] if g.batch_size == "auto" else int(g.batch_size)
    efficiency = _batch_efficiency(gen.get("batch_efficiency", {}), batch) / _batch_efficiency(
        gen.get("batch_efficiency", {}), gen["reference_batch_size"])
    return seconds / efficiency


def class_steps_rate(recipe: Recipe, rates: Rates, width: int, notes: list[str]) -> float:
    """Class-steps/s at ``width`` classes per pass, scaled to the recipe's inversion batch and pixels."""
    inv = rates.data["inversion"]
    compiled = _compiled_wanted(recipe.inversion.compile, rates)
    table = _mode(inv, compiled, "inversion", notes)["class_steps_per_s"]
    if not any(int(k) <= width for k in table):
        other = inv.get("eager" if compiled else "compiled", {}).get("class_steps_per_s", {})
        if any(int(k) <= width for k in other):
            notes.append(f"inversion: no {'compiled' if compiled else 'eager'} rate measured at {width} or fewer "
                         f"classes per pass, the {'eager' if compiled else 'compiled'} one is used")
            table = other
    measured = sorted(int(k) for k in table)
    below = [w for w in measured if w <= width]
    used = below[-1] if below else measured[0]
    if used != width:
        notes.append(f"inversion: {width} classes per pass estimated from the rate measured at {used}")
    rate = float(table[str(used)])
    res = recipe.inversion.resolution or recipe.generator.resolution
    scale = (recipe.inversion.batch_size / inv["batch_size"]) * (res / inv["resolution"]) ** 2
    return rate / scale


def estimate(recipe: Recipe, work: Work, rates: Rates) -> Estimate:
    notes: list[str] = []
    image_s = seconds_per_image(recipe, rates, notes) if work.synthetic_images else 0.0
    inv = rates.data.get("inversion")
    cpp = recipe.inversion.classes_per_pass
    width = int(inv.get("auto_classes_per_pass", 1)) if (cpp == "auto" and inv) else (1 if cpp == "auto" else int(cpp))
    used_rates: dict[int, float] = {}
    task_s = []
    if work.inversion_tasks:
        if not inv:
            raise FillupError(f"{rates.path}: has no inversion rates; run `fillup-data bench --quick` with this recipe")
        for steps in work.inversion_tasks:
            w = min(width, len(steps))
            if w not in used_rates:
                used_rates[w] = class_steps_rate(recipe, rates, w, notes)
            task_s.append(sum(steps) / used_rates[w])
    gen_task_s = [n * image_s for n in work.generation_tasks]
    return Estimate(rates, sum(task_s), work.synthetic_images * image_s, image_s, used_rates,
                    sorted(set(notes)), task_s, gen_task_s)


def wall_clock(task_seconds: list[float], gpus: int) -> float:
    """Longest-first greedy schedule of tasks on ``gpus`` workers: the finish time of the last one."""
    if not task_seconds:
        return 0.0
    loads = [0.0] * max(1, gpus)
    heapq.heapify(loads)
    for t in sorted(task_seconds, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


# --------------------------------------------------------------------------- output
def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 96 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_work(work: Work) -> str:
    tokens = f"{work.inversion_class_steps:,} inversion class-steps ({work.token_classes:,} classes get a token)"
    return (f"work: {work.synthetic_images:,} synthetic images to generate, {tokens}, "
            f"{work.real_images:,} real images to pack (CPU)")


def format_cost(recipe: Recipe, work: Work, rates: Rates | None, why: str, gpus: int | None = None) -> str:
    lines = [format_work(work)]
    if not work.synthetic_images and not work.inversion_class_steps:
        lines.append("GPU time: none (nothing to generate)")
        return "\n".join(lines)
    if rates is None:
        lines.append(f"GPU time: the shipped H100 rates do not apply ({why}); "
                     "run `fillup-data bench --quick RECIPE` on the build machine, then plan again")
        return "\n".join(lines)
    try:
        est = estimate(recipe, work, rates)
    except FillupError as err:  # e.g. bench rates of a run without inversion, for a recipe with it
        lines.append(f"GPU time: not estimated: {err}")
        return "\n".join(lines)
    device = str(rates.data.get("device", "?")).removeprefix("cuda:").removeprefix("cpu:")
    lines.append(f"rates: {rates.describe()}")
    one = f"one {device}" if rates.data.get("device", "").startswith("cuda") else f"this {device} CPU"
    lines.append(f"estimated GPU-hours on {one}:")
    if work.inversion_class_steps:
        per = ", ".join(f"{r:.1f} class-steps/s at {w} per pass" for w, r in sorted(est.class_steps_per_s.items()))
        lines.append(f"  inversion   {est.inversion_s / 3600:10.2f}  ({human_duration(est.inversion_s)}; {per})")
    if work.synthetic_images:
        lines.append(f"  generation  {est.generation_s / 3600:10.2f}  ({human_duration(est.generation_s)}; "
                     f"{1 / est.image_s:.2f} images/s)")
    lines.append(f"  total       {est.total_s / 3600:10.2f}  ({human_duration(est.total_s)})")
    for note in est.notes:
        lines.append(f"  note: {note}")
    if gpus is not None:
        inv_wall = wall_clock(est.inversion_task_s, gpus)
        gen_wall = wall_clock(est.generation_task_s, gpus)
        limits = []
        for what, tasks, wall, total, knob in (
                ("inversion", est.inversion_task_s, inv_wall, est.inversion_s, "inversion.classes_per_task"),
                ("generation", est.generation_task_s, gen_wall, est.generation_s, "shards.max_samples")):
            if tasks and wall > 1.05 * total / gpus:
                limits.append(f"{what} is {len(tasks)} task(s), the longest {human_duration(max(tasks))} "
                              f"(an even split would take {human_duration(total / gpus)}; {knob} sets the task size)")
        workers = "GPUs" if rates.data.get("device", "").startswith("cuda") else "workers like this machine"
        lines.append(f"on {gpus} {workers}: about {human_duration(inv_wall + gen_wall)} wall-clock "
                     f"(inversion {human_duration(inv_wall)}, then generation {human_duration(gen_wall)})")
        for limit in limits:
            lines.append(f"  limited by task granularity: {limit}")
    return "\n".join(lines)
