"""Stage 4, invert: Textual Inversion of one group of classes (one task), by continuous batching.

Groups are a pure function of the recipe and the plan (``inversion_groups``: tasks of equal cost, or fixed
slices of ``inversion.classes_per_task`` classes), so a group's members never change after a partial run. Within a task the trainer runs K =
``inversion.classes_per_pass`` slots; ``auto`` is resolved once per build and pinned
(``.fillup/pinned/inversion.classes_per_pass.json``), so every worker and resume uses the same K. With
``inversion.pad_passes`` (auto: on when compiled, i.e. on CUDA) every pass has the fixed shape K x
``batch_size`` rows, so on a fixed device, dtype and compile setting a class's token bytes do not depend on the grouping, on its neighbours, on when it entered a slot or on
a resume (tested); they do depend on K, the device kind, dtype and compile setting (recorded in each
token file). Without padding (eager, e.g. the CPU demo) they match to float rounding. A group also exports its classes' last checkpoint in the diffusers format, then writes
its completion record.
"""

from __future__ import annotations

import heapq
import math
from functools import partial
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.index import SourceIndex
from fillup_data.plan import Plan
from fillup_data.recipe import Recipe, model_revision
from fillup_data.sources import ImageLoadError, SourceItem, open_source
from fillup_data.state import read_json_record, write_json_atomic


def token_path(out: Path, class_index: int) -> Path:
    return Path(out) / "tokens" / f"{class_index:05d}.safetensors"


def load_class_images(recipe: Recipe, items: list[SourceItem], source=None) -> list:
    """The class's readable real images (a file that broke since indexing is skipped). ``source``: the opened
    source, when several classes are loaded (opening one parses its list files: iNaturalist's take 0.4 s)."""
    source = source or open_source(recipe)
    images = []
    for it in items:
        try:
            images.append(source.load(it))
        except ImageLoadError:
            continue
    return images


def invert_all(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, pipe, progress: bool,
               classes: list[int] | None = None, step_callback=None) -> int:
    """Train the token of every class with synthetic images to make; returns how many were trained."""
    from fillup_data.fastpath import pin_setting
    from fillup_data.inversion import InversionJob, invert_classes, is_complete
    from fillup_data.inversion.trainer import resolve_classes_per_pass

    wanted = classes if classes is not None else [c.index for c in plan.classes if c.synthetic > 0]
    todo = [c for c in wanted if not is_complete(token_path(out, c))]
    if not todo:
        return 0
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    by_class: dict[int, list[SourceItem]] = {}
    for it in index.items["train"]:
        by_class.setdefault(it.label, []).append(it)
    resolution = recipe.inversion.resolution or recipe.generator.resolution
    per_pass = recipe.inversion.classes_per_pass
    if per_pass == "auto":
        per_pass = pin_setting(out, "inversion.classes_per_pass",
                               lambda: resolve_classes_per_pass(pipe, recipe.inversion, resolution=resolution))
    source = open_source(recipe)
    # each class's images are loaded when it enters a slot and dropped once encoded (see InversionJob)
    jobs = [InversionJob(c, plan.classes[c].name, partial(load_class_images, recipe, by_class.get(c, []), source),
                         token_path(out, c), num_images=len(by_class.get(c, []))) for c in todo]
    # all of them in one call: the trainer's slots take the next class as soon as one finishes
    invert_classes(pipe, jobs, cfg=recipe.inversion, resolution=resolution, seed=recipe.seed,
                   model_id=recipe.generator.model, model_revision=model_revision(recipe),
                   progress=progress, step_callback=step_callback, classes_per_pass=int(per_pass))
    return len(todo)


def export_final_tokens(out: Path, classes: list[int]) -> None:
    """``tokens/diffusers/NNNNN.safetensors``: the last checkpoint in the one-key diffusers format, so
    ``pipe.load_textual_inversion(path)`` takes a class token without our reader."""
    from fillup_data.inversion import export_diffusers, read_token_file

    for c in classes:
        dest = out / "tokens" / "diffusers" / f"{c:05d}.safetensors"
        if not dest.is_file():
            token = read_token_file(token_path(out, c))
            dest.parent.mkdir(parents=True, exist_ok=True)
            export_diffusers(token, token.checkpoint_steps[-1], dest)




#: ``classes_per_task: auto``: about this many classes per task (continuous batching keeps K <= 32 slots
#: full while a task has classes waiting), and at least AUTO_MIN_CLASSES when the count is rounded to a multiple of 8
AUTO_CLASSES_PER_TASK = 64
AUTO_MIN_CLASSES = 32


def inversion_groups(recipe: Recipe, plan: Plan) -> list[list[int]]:
    """The classes that need a token cut into groups (tasks), each group in plan order; a pure function of
    the recipe and the plan (never of the machine or the pass width K), so every worker and relaunch agrees.

    An integer ``classes_per_task``: fixed slices of the plan's class order. ``auto``: tasks of equal cost.
    Paper B.3 gives a class min(max(100 n, 2000), 10000) steps, so slices of 64 classes in class order
    differ in cost by a lot (ImageNet-LT: 16 slices on 8 GPUs took 4.1 h where an even split takes 3.6 h).
    Classes are dealt largest-first onto the cheapest task (LPT), to about 64 classes per task, and the task
    count is a multiple of 8 when that leaves each task 32 classes or more, so 8, 16, 32... GPUs share the
    phase evenly."""
    if recipe.generator.strategy != "textual_inversion":
        return []
    wanted = [c.index for c in plan.classes if c.synthetic > 0]
    per = recipe.inversion.classes_per_task
    if per != "auto":
        return [wanted[i : i + per] for i in range(0, len(wanted), per)]
    if not wanted:
        return []
    tasks = math.ceil(len(wanted) / AUTO_CLASSES_PER_TASK)
    rounded = math.ceil(tasks / 8) * 8
    if len(wanted) / rounded >= AUTO_MIN_CLASSES:
        tasks = rounded
    cost = {c: recipe.inversion.steps_for(plan.classes[c].real) for c in wanted}
    loads = [(0, 0, t) for t in range(tasks)]  # (class-steps, classes, task): the cheapest, then the emptiest
    heapq.heapify(loads)
    groups: list[list[int]] = [[] for _ in range(tasks)]
    for c in sorted(wanted, key=lambda c: (-cost[c], c)):
        steps, count, t = heapq.heappop(loads)
        groups[t].append(c)
        heapq.heappush(loads, (steps + cost[c], count + 1, t))
    return [sorted(g) for g in groups]


def group_record_path(out: Path, group: int) -> Path:
    return Path(out) / ".fillup" / "invert" / f"g{group:05d}.json"


def group_done(out: Path, group: int, classes: list[int]) -> bool:
    from fillup_data.inversion import is_complete

    rec = read_json_record(group_record_path(out, group))
    return (rec is not None and rec.get("classes") == classes
            and all(is_complete(token_path(out, c)) for c in classes)
            and all(diffusers_token_path(out, c).is_file() for c in classes))


def diffusers_token_path(out: Path, class_index: int) -> Path:
    return Path(out) / "tokens" / "diffusers" / f"{class_index:05d}.safetensors"


def run_inversion_group(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, group: int, classes: list[int],
                        load_pipe, progress: bool) -> dict:
    """The task: train the group's unfinished classes (resuming a class from its last checkpoint),
    export their diffusers tokens, then write the group's record (last). ``load_pipe()`` gives the
    worker's pipeline, loaded on first use (a group that is already done loads nothing)."""
    if group_done(out, group, classes):
        return {"skipped": True}
    trained = invert_all(recipe, plan, index, out, load_pipe(), progress, classes=classes)
    export_final_tokens(out, classes)
    write_json_atomic(group_record_path(out, group), {"group": group, "classes": classes})
    return {"classes_trained": trained}
