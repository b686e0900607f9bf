"""Stage 4b, prompts: the prompts of ``lm_prompts`` and ``captions``, made once per class before any image
(phase A, beside the real shards; the synthetic shards of phase B read them).

Groups are fixed slices of the plan's classes that get synthetic images (``CLASSES_PER_TASK`` each),
so a group's members never change. A group's task makes every class whose ``prompts/NNNNN.json`` is
missing or was made with other settings, writing each file atomically as soon as it is made -- a
killed build redoes only the classes it had not finished -- then writes the group's completion record
(``.fillup/prompts/gNNNNN.json``) last.
"""

from __future__ import annotations

from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.generation.prompt_files import PROMPT_STRATEGIES, ClassPrompts, prompt_file_path
from fillup_data.plan import Plan
from fillup_data.recipe import Recipe
from fillup_data.state import read_json_record, write_json_atomic

CLASSES_PER_TASK = 64


def prompt_groups(recipe: Recipe, plan: Plan) -> list[list[int]]:
    """The classes that need prompts, in plan order, in groups of ``CLASSES_PER_TASK`` ([] for other
    strategies). ``captions`` needs real images of every such class: refused here, before any task runs."""
    strategy = recipe.generator.strategy
    if strategy not in PROMPT_STRATEGIES:
        return []
    wanted = [c for c in plan.classes if c.synthetic > 0]
    if strategy == "captions":
        empty = [c for c in wanted if c.real == 0]
        if empty:
            shown = ", ".join(f"{c.index} {c.name!r}" for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise FillupError(f"generator.strategy captions: {len(empty)} class(es) with images to generate have no "
                              f"real training images to caption ({shown}); give them images, or use a strategy "
                              "that needs none (e.g. lm_prompts or clip_templates)")
    idx = [c.index for c in wanted]
    return [idx[i : i + CLASSES_PER_TASK] for i in range(0, len(idx), CLASSES_PER_TASK)]


def prompt_work_line(recipe: Recipe, plan: Plan) -> str | None:
    """What ``plan`` prints for the prompts stage (None for other strategies); its time is not estimated."""
    g = recipe.generator
    if g.strategy not in PROMPT_STRATEGIES:
        return None
    classes = [c for c in plan.classes if c.synthetic > 0]
    if g.strategy == "lm_prompts":
        lm = g.language_model
        return (f"prompts: {len(classes):,} classes x {lm.num_prompts} prompts from {lm.model} ({lm.decoding}), "
                "made once before generation (time not estimated)")
    return (f"prompts: {sum(c.real for c in classes):,} real images of {len(classes):,} classes captioned once by "
            f"{g.captioner.model} before generation (time not estimated)")


def group_record_path(out: Path, group: int) -> Path:
    return Path(out) / ".fillup" / "prompts" / f"g{group:05d}.json"


def expected_identity(recipe: Recipe) -> tuple[str, str, str, dict]:
    """(strategy, model, revision, settings) a class's prompts file must record to count as made."""
    from fillup_data.generation.prompt_making import captioner_settings, language_model_settings

    g = recipe.generator
    cfg = g.language_model if g.strategy == "lm_prompts" else g.captioner
    settings = language_model_settings(cfg) if g.strategy == "lm_prompts" else captioner_settings(cfg)
    return g.strategy, cfg.model, cfg.revision or "main", settings


def expected_sources(recipe: Recipe, plan: Plan, class_index: int) -> dict:
    """What a class's prompts were made from besides the model: its seed (lm_prompts) or the keys of the
    real images captioned (captions), compared with what the file records."""
    if recipe.generator.strategy == "lm_prompts":
        from fillup_data.generation.prompt_making import prompt_seed

        return {"seed": prompt_seed(recipe.seed, class_index)}
    keys = sorted(s.key for shard in plan.shards_of("train", "real") for s in shard.samples
                  if s.item.label == class_index)
    return {"source_keys": keys}


def _recorded_sources(stored: ClassPrompts) -> dict:
    if stored.strategy == "lm_prompts":
        return {"seed": stored.details.get("seed")}
    keys = [e["source_key"] for e in stored.prompts] + list(stored.details.get("empty_captions") or [])
    return {"source_keys": sorted(keys)}


def class_done(out: Path, recipe: Recipe, plan: Plan, class_index: int) -> bool:
    """The class's prompts file exists, reads, and was made with these settings from these sources (the
    same seed, or the same real images): otherwise it is made again."""
    path = prompt_file_path(out, class_index)
    if not path.is_file():
        return False
    try:
        stored = ClassPrompts.read(path, class_index, recipe.generator.strategy)
    except FillupError:
        return False  # damaged: made again
    return ((stored.strategy, stored.model, stored.revision, stored.settings) == expected_identity(recipe)
            and _recorded_sources(stored) == expected_sources(recipe, plan, class_index))


def group_done(out: Path, recipe: Recipe, plan: Plan, group: int, classes: list[int]) -> bool:
    rec = read_json_record(group_record_path(out, group))
    return rec is not None and rec.get("classes") == classes and all(class_done(out, recipe, plan, c)
                                                                     for c in classes)


class PromptMaker:
    """Makes one class's prompts file; loads its model (language model or captioner) on first use, on
    ``device``, and keeps it for the worker's next groups."""

    def __init__(self, recipe: Recipe, plan: Plan, device: str = "cpu"):
        self.recipe, self.plan, self.device = recipe, plan, device
        self._model = None
        self._real = None

    def model(self):
        if self._model is None:
            from fillup_data.models.prompt_models import load_captioner, load_language_model

            g = self.recipe.generator
            self._model = (load_language_model(g.language_model, self.device) if g.strategy == "lm_prompts"
                           else load_captioner(g.captioner, self.device))
        return self._model

    def make(self, class_index: int) -> ClassPrompts:
        from fillup_data.fastpath import device_description

        strategy, model_id, revision, settings = expected_identity(self.recipe)
        name = self.plan.classes[class_index].name
        model = self.model()
        if strategy == "lm_prompts":
            prompts, details = self._language_model_prompts(model, class_index, name)
        else:
            prompts, details = self._captions(model, class_index, name)
        details = {**details, "device": device_description(self.device), "dtype": model.dtype}
        return ClassPrompts(class_index, name, strategy, model_id, revision, settings, prompts, details)

    def _language_model_prompts(self, lm, class_index: int, name: str) -> tuple[list, dict]:
        from fillup_data.generation.prompt_making import language_model_prompts, prompt_seed

        seed = prompt_seed(self.recipe.seed, class_index)
        prompts, empty = language_model_prompts(lm, self.recipe.generator.language_model, name, seed)
        return prompts, {"seed": seed, "model_kind": lm.kind, "empty_outputs_skipped": empty}

    def _captions(self, captioner, class_index: int, name: str) -> tuple[list, dict]:
        from fillup_data.generation import real_images
        from fillup_data.generation.prompt_making import caption_images

        cfg = self.recipe.generator.captioner
        if self._real is None:  # the real training samples in plan order, loaded from the source
            self._real = real_images.from_source(self.recipe, self.plan)
        keys = self._real.real_keys_of(class_index, "captions")
        entries, empty = [], []
        for start in range(0, len(keys), cfg.batch_size):  # one batch of images in memory at a time
            chunk = keys[start : start + cfg.batch_size]
            captions = caption_images(captioner, cfg, [self._real.load_real(k) for k in chunk])
            for key, caption in zip(chunk, captions):
                if caption:
                    entries.append({"source_key": key, "caption": caption})
                else:
                    empty.append(key)
        if not entries:
            raise FillupError(f"generator.captioner.model: {cfg.model!r} gave an empty caption for every one of the "
                              f"{len(keys)} real images of class {class_index} {name!r}; check the model (an image "
                              "captioner?) and generator.captioner.max_new_tokens")
        return entries, {"empty_captions": empty}


def _remove_stale_temps(out: Path, classes: list[int]) -> None:
    """Temporary files of this group's classes a killed worker left (only this task writes them)."""
    folder = prompt_file_path(out, 0).parent
    if folder.is_dir():
        for c in classes:
            for tmp in folder.glob(f".{c:05d}.json.*.tmp"):
                tmp.unlink(missing_ok=True)


def run_prompts_group(recipe: Recipe, plan: Plan, out: Path, group: int, classes: list[int], load_maker,
                      progress: bool) -> dict:
    """The task: make the group's classes that are not made yet, each file written as soon as it is
    made, then the group's record (last). ``load_maker()`` gives the worker's PromptMaker."""
    if group_done(out, recipe, plan, group, classes):
        return {"skipped": True}
    made = make_prompts(recipe, plan, out, classes, load_maker, progress, desc=f"prompts g{group:05d}")
    write_json_atomic(group_record_path(out, group), {"group": group, "classes": classes})
    return {"classes_prompted": made}


def make_prompts(recipe: Recipe, plan: Plan, out: Path, classes: list[int], load_maker, progress: bool,
                 desc: str = "prompts") -> int:
    """Write ``prompts/NNNNN.json`` for each of ``classes`` not made yet (a build's task, or ``preview``
    for its classes); returns how many were made."""
    from fillup_data.progress import track

    _remove_stale_temps(out, classes)
    todo = [c for c in classes if not class_done(out, recipe, plan, c)]
    maker = load_maker() if todo else None
    for c in track(todo, desc=desc, unit="class", enabled=progress, leave=False):
        maker.make(c).write(prompt_file_path(out, c))
    return len(todo)
