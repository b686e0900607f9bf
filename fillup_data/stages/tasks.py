"""The tasks of one build, and the runner a worker uses to do them.

Task ids: ``real/<shard>``, ``invert/g00003``, ``prompts/g00003``, ``synthetic/<shard>``. Phase A holds the
real shards, the inversion groups and the prompt groups, phase B the synthetic shards (they need every
token and every class's prompts); index and plan run before,
assemble after, each on one worker. The runner is made once per worker and keeps the loaded pipeline
for all the tasks it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.executors import TaskSpec, WorkerInfo
from fillup_data.index import SourceIndex
from fillup_data.plan import Plan, make_plan
from fillup_data.recipe import Recipe, parse_stored_recipe
from fillup_data.stages.invert import group_done, inversion_groups, run_inversion_group
from fillup_data.stages.prompts import PromptMaker, prompt_groups, run_prompts_group
from fillup_data.stages.prompts import group_done as prompts_group_done
from fillup_data.state import completed_shard

STATE_DIR = ".fillup"


def index_path(out: Path) -> Path:
    return Path(out) / STATE_DIR / "index.json"


def build_phases(recipe: Recipe, plan: Plan) -> list[list[TaskSpec]]:
    """[phase A: real shards + inversion groups + prompt groups, phase B: synthetic shards] (empty phases dropped)."""
    a = [TaskSpec(f"real/{s.name}") for s in plan.shards if s.origin == "real"]
    a += [TaskSpec(f"invert/g{g:05d}", uses_model=True) for g in range(len(inversion_groups(recipe, plan)))]
    a += [TaskSpec(f"prompts/g{g:05d}", uses_model=True) for g in range(len(prompt_groups(recipe, plan)))]
    b = [TaskSpec(f"synthetic/{s.name}", uses_model=True) for s in plan.shards if s.origin == "synthetic"]
    return [p for p in (a, b) if p]


@dataclass
class BuildRunnerFactory:
    """Plain data, so it crosses processes and Ray: the resolved recipe and the build folder."""

    recipe: dict
    out: str
    progress: bool = True

    def __call__(self, worker: WorkerInfo) -> "BuildRunner":
        return BuildRunner(parse_stored_recipe(self.recipe, f"{self.out}/.fillup/build.json"), Path(self.out),
                           worker, self.progress)


class BuildRunner:
    """Does any task of one build. Reads the index and recomputes the plan (a pure function of the
    two); loads the pipeline on the first task that needs it."""

    def __init__(self, recipe: Recipe, out: Path, worker: WorkerInfo | None = None, progress: bool = True):
        self.recipe, self.out, self.progress = recipe, Path(out), progress
        self.worker = worker or WorkerInfo(0, 1)
        self._plan: Plan | None = None
        self._inversion_groups: list[list[int]] | None = None
        self._index: SourceIndex | None = None
        self._pipe = None
        self._generator = None
        self._prompt_maker: PromptMaker | None = None
        if self.worker.count > 1 or self.worker.device != "cpu":  # workers sharing cores split the threads
            import torch

            torch.set_num_threads(max(1, self.worker.num_threads))

    # ------------------------------------------------------------------ what the tasks read
    @property
    def index(self) -> SourceIndex:
        if self._index is None:
            self._index = SourceIndex.read(index_path(self.out))
            if self._index is None:  # e.g. a worker on a node that does not see the driver's build folder
                raise FillupError(f"{index_path(self.out)} is missing or unreadable on this worker: every worker "
                                  f"must see the build folder (a shared file system across machines)")
        return self._index

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = make_plan(self.recipe, self.index)
        return self._plan

    @property
    def inversion_groups(self) -> list[list[int]]:
        if self._inversion_groups is None:  # dealt by cost: computed once, asked for every task
            self._inversion_groups = inversion_groups(self.recipe, self.plan)
        return self._inversion_groups

    def pipe(self):
        if self._pipe is None:
            from fillup_data.generation.strategies import strategy_class

            cfg = self.recipe.generator
            self._pipe = strategy_class(cfg.strategy).load_pipeline(cfg, device=self.worker.device)
        return self._pipe

    def prompt_maker(self) -> PromptMaker:
        if self._prompt_maker is None:
            self._prompt_maker = PromptMaker(self.recipe, self.plan, device=self.worker.device)
        return self._prompt_maker

    def generator(self):
        if self._generator is None:  # made after phase A, when every token file exists
            self._prompt_maker = None  # phase A is over: its language model or captioner can go
            from fillup_data.synthesis import make_generator

            self._generator = make_generator(self.recipe, self.plan.classes, self.out, self.pipe(), plan=self.plan)
        return self._generator

    def _shard(self, name: str):
        for s in self.plan.shards:
            if s.name == name:
                return s
        raise KeyError(f"no shard {name!r} in the plan of {self.out}")

    # ------------------------------------------------------------------ the TaskRunner protocol
    def is_done(self, task_id: str) -> bool:
        kind, _, name = task_id.partition("/")
        if kind in ("real", "synthetic"):
            return completed_shard(self.out, self._shard(name)) is not None
        if kind == "invert":
            g = int(name[1:])
            return group_done(self.out, g, self.inversion_groups[g])
        if kind == "prompts":
            g = int(name[1:])
            return prompts_group_done(self.out, self.recipe, self.plan, g, prompt_groups(self.recipe, self.plan)[g])
        raise KeyError(f"unknown task {task_id!r}")

    def run(self, task_id: str) -> dict:
        from fillup_data.stages.generate import run_synthetic_shard
        from fillup_data.stages.real import run_real_shard

        kind, _, name = task_id.partition("/")
        if kind == "real":
            return run_real_shard(self.recipe, self._shard(name), self.out, self.index.class_names)
        if kind == "invert":
            g = int(name[1:])
            return run_inversion_group(self.recipe, self.plan, self.index, self.out, g,
                                       self.inversion_groups[g], self.pipe, self.progress)
        if kind == "prompts":
            g = int(name[1:])
            return run_prompts_group(self.recipe, self.plan, self.out, g, prompt_groups(self.recipe, self.plan)[g],
                                     self.prompt_maker, self.progress)
        if kind == "synthetic":
            return run_synthetic_shard(self.recipe, self.plan, self._shard(name), self.out, self.generator,
                                       self.progress)
        raise KeyError(f"unknown task {task_id!r}")
