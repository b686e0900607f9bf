"""Stage 4, invert: Textual Inversion of one group of classes, trained jointly in one UNet pass.

Groups are fixed slices of the plan's class order (``inversion.classes_per_pass`` classes each), so a
group's members never change after a partial run; each class's trajectory is independent of its
neighbours (tested), so the token bytes do not depend on the grouping either. A group also exports its
classes' last checkpoint in the diffusers format, then writes its completion record.
"""

from __future__ import annotations

from pathlib import Path

from fillup_data.index import SourceIndex
from fillup_data.plan import Plan
from fillup_data.recipe import Recipe
from fillup_data.state import read_json_record, write_json_atomic


def inversion_groups(recipe: Recipe, plan: Plan) -> list[list[int]]:
    """The classes that need a token, in plan order, cut into groups of ``classes_per_pass``."""
    if recipe.generator.strategy != "textual_inversion":
        return []
    wanted = [c.index for c in plan.classes if c.synthetic > 0]
    per = recipe.inversion.classes_per_pass
    return [wanted[i : i + per] for i in range(0, len(wanted), per)]


def group_record_path(out: Path, group: int) -> Path:
    return Path(out) / ".fillup" / "invert" / f"g{group:05d}.json"


def group_done(out: Path, group: int, classes: list[int]) -> bool:
    from fillup_data.inversion import is_complete
    from fillup_data.synthesis import token_path

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
    from fillup_data import synthesis

    if group_done(out, group, classes):
        return {"skipped": True}
    trained = synthesis.invert_all(recipe, plan, index, out, load_pipe(), progress, classes=classes)
    synthesis.export_final_tokens(out, classes)
    write_json_atomic(group_record_path(out, group), {"group": group, "classes": classes})
    return {"classes_trained": trained}
