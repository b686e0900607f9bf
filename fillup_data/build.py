"""One build: index -> plan -> {real shards, inversion groups} -> synthetic shards -> assemble.

The driver (or, with ``--rank``, whichever rank claims them) runs index, plan and assemble; the tasks
between (``fillup_data.stages``) run on an executor (``fillup_data.executors``).

State lives in ``OUT/.fillup/``: the index, a completion record per finished shard (written after
the shard is renamed into place), the fingerprint of the recipe that started the build, and the
lock that keeps a second build out of the folder while this one runs (ranks of one build share the
folder through task claims instead).  Relaunching the same command
runs only what is missing; a different recipe is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from fillup_data import __version__
from fillup_data.errors import FillupError
from fillup_data.executors import ExecutionReport, Executor
from fillup_data.index import SourceIndex
from fillup_data.plan import Plan, ShardPlan, make_plan
from fillup_data.progress import Ticker, attach_log, detach_log, duration, note, progress_bar, warn
from fillup_data.recipe import Recipe, fingerprint, model_revision
from fillup_data.shards.writer import remove_stale_temps
from fillup_data.stages.assemble import assemble, drop_mismatched_shards
from fillup_data.state import (LOCK_NAME, STATE_DIR, BuildLock, completed_shard, read_json_record, save_shard_record,
                               shard_record_path, write_json_atomic)

# Everything a build writes into OUT (README "Output"): ``--force`` deletes these and nothing else.
BUILD_OUTPUTS = ("data", "tokens", "prompts", "assets", "quality", STATE_DIR, "manifest.json", "index.parquet",
                 "README.md", "report.json")


@dataclass
class BuildSummary:
    out: Path
    classes: int
    real: int
    synthetic: int
    test: int
    shards: int
    skipped: dict[str, int]
    retries: int
    seconds: float
    shards_written: int = 0
    shards_reused: int = 0
    tokens_trained: int = 0
    shards_rewritten: int = 0  # recorded as done, but their bytes differed from the record
    extra: dict = field(default_factory=dict)

    def format(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in self.skipped.items()) or "none"
        rewritten = (f"; {self.shards_rewritten} of them differed from their completion records and were rewritten"
                     if self.shards_rewritten else "")
        return (
            f"build finished in {self.seconds:.1f}s: {self.classes} classes, {self.real:,} real train, "
            f"{self.synthetic:,} synthetic, {self.test:,} test images in {self.shards} shards "
            f"({self.shards_written} written, {self.shards_reused} reused from an earlier run{rewritten})\n"
            f"skipped images: {skipped}; regenerated black/non-finite images: {self.retries}\n"
            + "".join(f"task retried after its worker was lost: {task} ({why})\n"
                      for task, why in self.extra.get("task_retries", []))
            + "".join(f"note: {n}\n" for n in self.extra.get("executor_notes", []))
            + f"output: {self.out}  (manifest.json, index.parquet, README.md, report.json)"
        )


def _state(out: Path) -> Path:
    return out / STATE_DIR


# --------------------------------------------------------------------------- claiming OUT
def _protected_reason(out: Path, inputs: dict[str, Path]) -> str | None:
    """Why ``--force`` may not clear ``out`` (None: it may).  A slip of ``--out`` must not cost the
    user their home folder, their working folder or the data the build reads."""
    out = out.resolve()
    if out == Path(out.anchor):
        return "it is the filesystem root"
    for what, folder in (("your home folder", Path.home()), ("the current folder", Path.cwd())):
        folder = folder.resolve()
        if out == folder:
            return f"it is {what}"
        if out in folder.parents:
            return f"it contains {what} ({folder})"
    for what, path in inputs.items():
        path = path.resolve()
        if out == path or out in path.parents:
            return f"it contains the {what} ({path})"
    return None


def _input_paths(recipe: Recipe, recipe_path: str | os.PathLike | None) -> dict[str, Path]:
    """The files a build reads from disk: the recipe and the source's data root."""
    inputs = {"recipe": Path(recipe_path)} if recipe_path else {}
    src = recipe.source
    if getattr(src, "root", None):
        inputs["source.root"] = Path(src.root).expanduser()
    if src.kind == "hf_dataset" and Path(src.path).exists():  # a local dataset folder, not a hub id
        inputs["source.path"] = Path(src.path)
    return inputs


def _check_output(out: Path, force: bool, inputs: dict[str, Path]) -> None:
    """Refuse, before anything is written, an --out that is not ours to use or to clear."""
    if out.exists() and not out.is_dir():
        raise FillupError(f"--out {out}: is a file, not a folder; choose a folder")
    if force and (why := _protected_reason(out, inputs)):
        raise FillupError(f"--out {out}: refusing --force, {why}; drop --force or choose a folder of its own for --out")
    if out.is_dir() and not (_state(out) / "build.json").is_file():
        foreign = sorted(p.name for p in out.iterdir() if p.name != STATE_DIR)
        if foreign:
            raise FillupError(
                f"--out {out}: exists, holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and is not a fillup-data build "
                f"(no {STATE_DIR}/build.json); choose an empty or new folder{' (--force deletes only builds)' if force else ''}"
            )


def _clear_build_outputs(out: Path) -> None:
    """Delete what a build writes (BUILD_OUTPUTS) and nothing else; keep the lock we hold."""
    for name in BUILD_OUTPUTS:
        path = out / name
        if name == STATE_DIR:
            for child in path.iterdir():
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    left = sorted(p.name for p in out.iterdir() if p.name not in BUILD_OUTPUTS)
    if left:
        warn(f"--force: deleted the earlier build's files; left {len(left)} other entr{'y' if len(left) == 1 else 'ies'} "
            f"in {out} untouched: {', '.join(left[:10])}{', ...' if len(left) > 10 else ''}")


def _claim_output(recipe: Recipe, out: Path, fp: str, force: bool, log=note, remove_temps: bool = True) -> None:
    """Under the lock: resume a build of this recipe, refuse (or with --force clear) another one."""
    state = _state(out)
    record = state / "build.json"
    if record.is_file():
        old = read_json_record(record)
        old_fp = old.get("fingerprint") if old else None
        if old_fp != fp:
            if not force:
                what = (f"holds a build of a different recipe (fingerprint {str(old_fp)[:12]} != {fp[:12]})" if old
                        else f"holds a build whose record {record} is unreadable")
                raise FillupError(f"{out} {what}: use another --out, or --force to delete it and start over")
            _clear_build_outputs(out)
    (state / "shards").mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        write_json_atomic(record, {"fingerprint": fp, "package_version": __version__, "recipe": recipe.resolved()})
    stale = remove_stale_temps(out / "data") if remove_temps else []
    if stale:
        log(f"removed {len(stale)} partial shard file(s) a stopped build left: {', '.join(stale[:5])}")


def load_or_build_index(recipe: Recipe, out: Path, workers: int, log=note) -> SourceIndex:
    # reuses .fillup/index.json only while the source is what was indexed (else exit 2, saying what changed)
    from fillup_data.index import resume_or_build_index

    return resume_or_build_index(recipe, _state(out) / "index.json", workers, log)


# --------------------------------------------------------------------------- phase A/B through an executor
def shard_done(out: Path, shard: ShardPlan) -> dict | None:
    """A shard is done when its record is readable and the tar on disk has the recorded size."""
    return completed_shard(out, shard)


def run_real_shards_in_pool(recipe: Recipe, plan: Plan, out: Path, class_names: list[str], workers: int,
                            progress: bool) -> list[str]:
    """The local executor's fast path on CPU: real shards in a process pool (decoding is the cost),
    each the same task a worker would run. Returns the paths written."""
    from fillup_data.stages.real import write_real_shard

    todo = [s for s in plan.shards if s.origin == "real" and shard_done(out, s) is None]
    if not todo:
        return []
    bar = progress_bar(sum(s.num_samples for s in todo), "real shards", "img", enabled=progress)
    if workers <= 1 or len(todo) == 1:
        for s in todo:
            save_shard_record(out, s, write_real_shard(recipe, s, out, class_names))
            bar.update(s.num_samples)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(write_real_shard, recipe, s, out, class_names): s for s in todo}
            for fut in futures:  # submission order: deterministic records, progress as shards finish
                s = futures[fut]
                save_shard_record(out, s, fut.result())
                bar.update(s.num_samples)
    bar.close()
    return [s.path for s in todo]


class _Borrowed(Executor):
    """Lends ``inner`` to one ``execute`` call without letting it close: the build runs several calls
    (plan, phases, assemble; a repair pass) on the same workers and closes them once, at its end."""

    def __init__(self, inner: Executor):
        self.inner = inner

    def bind(self, factory) -> None:
        self.inner.bind(factory)

    def run_phase(self, tasks, factory, state_dir, is_done):
        return self.inner.run_phase(tasks, factory, state_dir, is_done)

    @property
    def in_process(self) -> bool:
        return getattr(self.inner, "in_process", False)

    def notes(self) -> list[str]:
        return []  # the build reads them once, from the executor itself


def _raise_failures(report: ExecutionReport, out: Path) -> None:
    if report.failures:
        lines = [f"  {task}: {(err.strip().splitlines() or ['?'])[-1]}" for task, err in report.failures]
        raise FillupError(f"{len(report.failures)} task(s) failed (tracebacks in {_state(out) / 'failed'}); fix the "
                          f"cause and relaunch the same command to resume:\n" + "\n".join(lines))


def _run_tasks(recipe: Recipe, plan: Plan, out: Path, executor, progress: bool, log) -> ExecutionReport:
    """Phase A (real shards, inversion groups) then phase B (synthetic shards) on a copy of ``executor``."""
    from fillup_data.executors import execute
    from fillup_data.stages.tasks import BuildRunner, BuildRunnerFactory, build_phases

    phases = build_phases(recipe, plan)
    probe = BuildRunner(recipe, out, progress=False)  # the driver's cheap is_done: records on disk only
    probe._plan = plan
    log(f"[3-5/6] real shards + invert, then generate: {sum(len(p) for p in phases)} tasks in {len(phases)} "
        f"phase(s), {plan.num_synthetic:,} synthetic images")
    started = time.time()
    with Ticker(lambda: overall_line(out, plan, phases, probe.is_done, started)):
        report = execute(phases, BuildRunnerFactory(recipe.resolved(), str(out), progress), _state(out),
                         _Borrowed(executor), is_done=probe.is_done)
    _raise_failures(report, out)
    return report


def _phase_ab(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, executor, workers: int,
              progress: bool, log) -> tuple[set[str], ExecutionReport]:
    """Every real and synthetic shard not done yet, and every token. Returns (paths written, report)."""
    todo = {s.path for s in plan.shards if shard_done(out, s) is None}
    if getattr(executor, "in_process", False):
        log(f"[3/6] real shards in {workers} process(es)")
        run_real_shards_in_pool(recipe, plan, out, index.class_names, workers, progress)
    return todo, _run_tasks(recipe, plan, out, executor, progress, log)


# --------------------------------------------------------------------------- status
@dataclass
class BuildProgress:
    shards_done: int
    shards_total: int
    tokens_done: int
    tokens_total: int  # classes that need a Textual Inversion token (0 for other strategies)
    finished: bool

    def format(self, out: Path) -> str:
        tokens = f"; tokens {self.tokens_done}/{self.tokens_total} done" if self.tokens_total else ""
        return (f"{out}: {'finished' if self.finished else 'in progress'}; "
                f"shards {self.shards_done}/{self.shards_total} done{tokens}")


def read_progress(out: str | os.PathLike) -> BuildProgress:
    """How far the build in ``out`` has got, by the same tests a relaunch uses to skip work."""
    out = Path(out)
    state = _state(out)
    if not (state / "build.json").is_file():
        raise FillupError(f"{out}: not a fillup-data build (no {STATE_DIR}/build.json)")
    plan = read_json_record(state / "plan.json") or {}  # no plan yet: indexing has not finished
    shards = [SimpleNamespace(name=Path(p).stem, path=p) for p in plan.get("shards", [])]  # what records are keyed by
    done = sum(1 for s in shards if completed_shard(out, s) is not None)
    need_token = [c["index"] for c in plan.get("classes", []) if c.get("synthetic") and c.get("token_steps")]
    tokens = 0
    if need_token:
        from fillup_data.inversion.completion import is_complete
        from fillup_data.stages.invert import token_path

        tokens = sum(1 for c in need_token if is_complete(token_path(out, c)))
    finished = read_json_record(out / "manifest.json") is not None
    return BuildProgress(done, len(shards), tokens, len(need_token), finished)


def phase_lines(out: str | os.PathLike) -> list[str]:
    """Per phase of a running or stopped build (any executor): done/total, tasks running now (rank
    claims), failed tasks with their error, and for the synthetic phase images/s and an ETA, all read
    from the build folder."""
    from fillup_data.executors import read_status
    from fillup_data.recipe import parse_stored_recipe
    from fillup_data.stages.tasks import BuildRunner, build_phases

    out = Path(out)
    state = _state(out)
    record = read_json_record(state / "build.json")
    index = SourceIndex.read(state / "index.json")
    if record is None or index is None or read_json_record(state / "plan.json") is None:
        return ["phases: not planned yet (index and plan run first)"]
    recipe = parse_stored_recipe(record["recipe"], str(state / "build.json"))
    plan = make_plan(recipe, index)
    probe = BuildRunner(recipe, out, progress=False)
    probe._index, probe._plan = index, plan
    phases = build_phases(recipe, plan)
    names = {"real": "real shards", "invert": "inversion groups", "prompts": "prompt groups",
             "synthetic": "synthetic shards"}
    lines = []
    for k, (phase, status) in enumerate(zip(phases, read_status(state, phases, probe.is_done))):
        kinds = sorted({t.id.split("/", 1)[0] for t in phase}, key=list(names).index)
        line = f"phase {'AB'[k]} ({' + '.join(names[x] for x in kinds)}): {status.done}/{status.total} tasks done"
        if kinds == ["synthetic"]:
            line += _generation_rate(out, plan)
        lines.append(line)
        for claim in status.running:
            owner = claim.get("owner", {})
            lines.append(f"  running {claim.get('task')}: rank {owner.get('rank', '?')} on {owner.get('host', '?')} "
                         f"(pid {owner.get('pid', '?')})")
        for failure in status.failed:
            lines.append(f"  FAILED {failure.get('task')}: {failure.get('error', '?')} "
                         f"(traceback in {state / 'failed'})")
    return lines


def _generation_rate(out: Path, plan: Plan) -> str:
    synthetic = [s for s in plan.shards if s.origin == "synthetic"]
    done = [(shard_record_path(out, s.name).stat().st_mtime, s.num_samples) for s in synthetic
            if shard_done(out, s) is not None]
    return rate_and_eta(done, sum(s.num_samples for s in synthetic))


def overall_line(out: Path, plan: Plan, phases, is_done, started: float) -> str:
    """The build's one progress line for a log (every ``FILLUP_PROGRESS_INTERVAL`` seconds while tasks
    run): each phase's tasks done, and for generation the images made, the rate and an ETA, all read from
    the build folder, so it holds on any executor."""
    parts = []
    for k, phase in enumerate(phases):
        done = sum(1 for t in phase if is_done(t.id))
        parts.append(f"phase {'AB'[k]} {done}/{len(phase)} tasks")
    text = f"build {out.name}: " + ", ".join(parts)
    if plan.num_synthetic:
        text += _generation_rate(out, plan).replace(", ", "; generation ", 1)
    return text + f"; {duration(time.time() - started)} so far"


def rate_and_eta(done: list[tuple[float, int]], total: int) -> str:
    """``done``: (record time, images) per finished shard. Images/s from the first record to the last
    (the first shard's images were made before the clock starts), and an ETA at that rate."""
    made = sum(n for _, n in done)
    text = f", {made:,}/{total:,} images"
    if len(done) >= 2:
        done = sorted(done)
        span = done[-1][0] - done[0][0]
        if span > 0:
            rate = (made - done[0][1]) / span
            text += f", {rate:.2f} images/s"
            if made < total and rate > 0:
                text += f", ETA {duration((total - made) / rate)}"
    return text


def run_build(recipe: Recipe, out: str | os.PathLike, *, workers: int | None = None, force: bool = False,
              progress: bool = True, log=note, recipe_path: str | os.PathLike | None = None,
              executor=None) -> BuildSummary:
    """Run or resume a build in ``out``.  ``recipe_path`` (the recipe's file) is never deleted by --force.

    ``executor``: a ``fillup_data.executors`` executor, kept (workers, loaded pipelines) across the
    build's phases and closed at its end.
    Default ``LocalExecutor()``: one worker per visible GPU, in-process on CPU. A ``RankExecutor`` runs
    this process's share of the build alongside the other ranks."""
    from fillup_data.executors import LocalExecutor

    t0 = time.time()
    out = Path(out)
    workers = workers or min(8, os.cpu_count() or 1)
    executor = executor or LocalExecutor()
    try:
        return _run_build(recipe, out, executor, workers, force, progress, log, recipe_path, t0)
    finally:
        executor.close()


def _run_build(recipe: Recipe, out: Path, executor: Executor, workers: int, force: bool, progress: bool, log,
               recipe_path, t0: float) -> BuildSummary:
    from fillup_data.executors import RankExecutor

    fp = fingerprint(recipe, model_revision(recipe))
    if isinstance(executor, RankExecutor):
        if force:
            raise FillupError("--force cannot be used with --rank: clear the folder once, before starting the ranks")
        _check_output(out, False, _input_paths(recipe, recipe_path))
        return _run_build_as_rank(recipe, out, fp, executor, workers, progress, log, t0)
    _check_output(out, force, _input_paths(recipe, recipe_path))
    with BuildLock.acquire(_state(out)):
        _claim_output(recipe, out, fp, force, log)
        index, plan = _index_and_plan(recipe, out, workers, log)
        written, report = _phase_ab(recipe, plan, index, out, executor, workers, progress, log)
        _drop_dead_temps(out, log)  # every task is done and we hold the lock: a temp left is a lost worker's
        log("[6/6] assemble  verify every shard's sha256, then manifest, index.parquet, dataset card")
        rewritten = drop_mismatched_shards(out, plan)
        if rewritten:  # the lock keeps other builds out, so this is damage on disk: one more pass repairs it
            log(f"{len(rewritten)} shard(s) differ from their completion records and are not done: "
                f"{', '.join(rewritten)}; rewriting them")
            again, _ = _phase_ab(recipe, plan, index, out, executor, workers, progress, log)
            written |= again
            still = drop_mismatched_shards(out, plan)
            if still:
                raise FillupError(f"{', '.join(still)}: changed again right after being rewritten; is another "
                                  f"process writing into {out}? Stop it and relaunch")
        manifest = assemble(recipe, plan, index, out, fp, rewritten)
    return _summary(out, plan, manifest, written, report, rewritten, t0, executor.notes())


def _drop_dead_temps(out: Path, log, idle_seconds: float | None = None) -> None:
    dead = remove_stale_temps(out / "data", idle_seconds)
    if dead:
        log(f"removed {len(dead)} partial shard file(s) of workers lost mid-shard: {', '.join(dead[:5])}")


def _index_and_plan(recipe: Recipe, out: Path, workers: int, log) -> tuple[SourceIndex, Plan]:
    log(f"[1/6] index   {recipe.source.kind} source")
    index = load_or_build_index(recipe, out, workers, log)
    log(f"[2/6] plan    {len(index.class_names)} classes, fill {recipe.fill.policy}, strategy {recipe.generator.strategy}")
    plan = make_plan(recipe, index)
    write_json_atomic(_state(out) / "plan.json", {"classes": [c.__dict__ for c in plan.classes],
                                                   "shards": [s.path for s in plan.shards]})
    return index, plan


def _summary(out: Path, plan: Plan, manifest: dict, written: set[str], report: ExecutionReport | None,
             rewritten: list[str], t0: float, notes: list[str] | None = None) -> BuildSummary:
    rep = json.loads((out / "report.json").read_text())
    tokens = sum(s.get("classes_trained", 0) for s in (report.summaries.values() if report else []))
    return BuildSummary(
        out=out, classes=len(plan.classes), real=manifest["splits"]["train"]["real"],
        synthetic=manifest["splits"]["train"]["synthetic"],
        test=manifest["splits"].get("test", {}).get("real", 0), shards=len(manifest["shards"]),
        skipped=rep["skipped_by_reason"], retries=rep["regenerated_images"], seconds=time.time() - t0,
        shards_written=len(written), shards_reused=len(plan.shards) - len(written), tokens_trained=tokens,
        shards_rewritten=len(rewritten),
        extra={"task_retries": list(report.retries) if report else [], "executor_notes": notes or []},
    )


@dataclass
class _OnceTasks:
    """The tasks that run once in a rank build ("plan", "assemble"), as a runner factory + runner."""

    recipe: dict
    out: str
    fingerprint: str
    workers: int
    lease_seconds: float

    def __call__(self, worker=None) -> "_OnceTasks":
        return self

    def _recipe(self) -> Recipe:
        from fillup_data.recipe import parse_stored_recipe

        return parse_stored_recipe(self.recipe, f"{self.out}/{STATE_DIR}/build.json")

    def is_done(self, task_id: str) -> bool:
        out = Path(self.out)
        if task_id == "plan":
            rec = read_json_record(_state(out) / "build.json")
            return (rec is not None and rec.get("fingerprint") == self.fingerprint
                    and read_json_record(_state(out) / "plan.json") is not None)
        manifest = read_json_record(out / "manifest.json")
        return manifest is not None and manifest.get("fingerprint") == self.fingerprint

    def run(self, task_id: str) -> dict:
        recipe, out = self._recipe(), Path(self.out)
        if task_id == "plan":
            _claim_output(recipe, out, self.fingerprint, False, note, remove_temps=False)  # others may be writing
            _index_and_plan(recipe, out, self.workers, print)
            return {}
        if task_id != "assemble":
            raise KeyError(f"{task_id!r} is not a task of its own: only plan and assemble run once")
        index = load_or_build_index(recipe, out, self.workers)
        plan = make_plan(recipe, index)
        # a temp nobody has written to for a lease belongs to a rank that died mid-shard
        _drop_dead_temps(out, note, self.lease_seconds)
        bad = drop_mismatched_shards(out, plan)
        if bad:
            raise FillupError(f"{', '.join(bad)}: differed from their completion records and were dropped; "
                              f"relaunch the ranks to rewrite them")
        assemble(recipe, plan, index, out, self.fingerprint, [])
        return {}


def _run_build_as_rank(recipe: Recipe, out: Path, fp: str, executor, workers: int, progress: bool, log,
                       t0: float) -> BuildSummary:
    """One rank of W: plan and assemble run once (whichever rank claims them), the rest is shared
    through claims in the build folder; a rank that stops is taken over when its claims expire."""
    from fillup_data.executors import RankExecutor, TaskSpec, execute

    _state(out).mkdir(parents=True, exist_ok=True)
    # every rank keeps its own log in the build folder (its progress, notes and warnings), whatever its console
    log_file = attach_log(rank_log_path(out, executor.rank))
    try:
        return _run_rank(recipe, out, fp, executor, workers, progress, log, t0)
    finally:
        detach_log(log_file)


def rank_log_path(out: Path, rank: int) -> Path:
    return _state(out) / "logs" / f"rank-{rank:05d}.log"


def _run_rank(recipe: Recipe, out: Path, fp: str, executor, workers: int, progress: bool, log, t0: float) -> BuildSummary:
    from fillup_data.executors import RankExecutor, TaskSpec, execute

    once = _OnceTasks(recipe.resolved(), str(out), fp, workers, executor.lease_seconds)
    # plan and assemble get an executor of their own: an executor's workers hold one factory's runner
    once_executor = RankExecutor(executor.rank, executor.world_size, lease_seconds=executor.lease_seconds,
                                 poll_seconds=executor.poll_seconds, device="cpu", num_threads=1)
    try:
        _raise_failures(execute([[TaskSpec("plan")]], once, _state(out), _Borrowed(once_executor)), out)
        index = load_or_build_index(recipe, out, workers)
        plan = make_plan(recipe, index)
        todo = {s.path for s in plan.shards if shard_done(out, s) is None}
        report = _run_tasks(recipe, plan, out, executor, progress, log)
        log("[6/6] assemble (one rank)")
        _raise_failures(execute([[TaskSpec("assemble")]], once, _state(out), _Borrowed(once_executor)), out)
    finally:
        once_executor.close()
    manifest = read_json_record(out / "manifest.json")
    return _summary(out, plan, manifest, todo, report, [], t0, executor.notes())
