"""Stage 4, invert: Textual Inversion of one group of classes (one task), by continuous batching.

Groups are fixed slices of the plan's class order (``inversion.classes_per_task`` classes each), so a
group's members never change after a partial run. Within a task the trainer runs K =
``inversion.classes_per_pass`` slots; ``auto`` is resolved once per build and pinned
(``.fillup/pinned/inversion.classes_per_pass.json``), so every worker and resume uses the same K. With
``inversion.pad_passes`` (auto: on when compiled, i.e. on CUDA) every pass has the fixed shape K x
``batch_size`` rows, so on a fixed device, dtype and compile setting a class's token bytes do not depend on the grouping, on its neighbours, on when it entered a slot or on
a resume (tested); they do depend on K, the device kind, dtype and compile setting (recorded in each
token file). Without padding (eager, e.g. the CPU demo) they match to float rounding. A group also exports its classes' last checkpoint in the diffusers format, then writes
its completion record.
"""

from __future__ import annotations

from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.index import SourceIndex
from fillup_data.plan import Plan
from fillup_data.recipe import Recipe, model_revision
from fillup_data.sources import ImageLoadError, SourceItem, open_source
from fillup_data.state import read_json_record, write_json_atomic


def token_path(out: Path, class_index: int) -> Path:
    return Path(out) / "tokens" / f"{class_index:05d}.safetensors"


def load_class_images(recipe: Recipe, items: list[SourceItem]) -> list:
    """The class's readable real images (a file that broke since indexing is skipped)."""
    source = open_source(recipe)
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
    jobs = []
    for c in todo:
        images = load_class_images(recipe, by_class.get(c, []))
        if not images:
            raise FillupError(f"class {c} {plan.classes[c].name!r}: no readable training images left to invert")
        jobs.append(InversionJob(c, plan.classes[c].name, images, token_path(out, c)))
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




def inversion_groups(recipe: Recipe, plan: Plan) -> list[list[int]]:
    """The classes that need a token, in plan order, cut into groups (tasks) of ``classes_per_task``
    (independent of the pass width K, so the task list does not depend on the machine)."""
    if recipe.generator.strategy != "textual_inversion":
        return []
    wanted = [c.index for c in plan.classes if c.synthetic > 0]
    per = recipe.inversion.classes_per_task
    return [wanted[i : i + per] for i in range(0, len(wanted), per)]


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
