"""One build: index -> plan -> invert -> generate -> assemble, each stage idempotent and resumable.

State lives in ``OUT/.fillup/``: the index, a completion record per finished shard (written after
the shard is renamed into place), the fingerprint of the recipe that started the build, and the
lock that keeps a second build out of the folder while this one runs.  Relaunching the same command
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

from tqdm.auto import tqdm

from fillup_data import __version__
from fillup_data.errors import FillupError
from fillup_data.index import SourceIndex, build_index
from fillup_data.plan import Plan, RealSample, ShardPlan, make_plan
from fillup_data.recipe import Recipe, fingerprint, model_revision
from fillup_data.shards.card import render_card
from fillup_data.shards.manifest import index_row, write_index
from fillup_data.shards.writer import ShardWriter, encode_image, real_metadata, remove_stale_temps
from fillup_data.sources import ImageLoadError, open_source
from fillup_data.state import (LOCK_NAME, STATE_DIR, BuildLock, completed_shard, forget_shard, read_json_record,
                               save_shard_record, shard_record, verify_shard, write_json_atomic)

# Everything a build writes into OUT (README "Output"): ``--force`` deletes these and nothing else.
BUILD_OUTPUTS = ("data", "tokens", "assets", STATE_DIR, "manifest.json", "index.parquet", "README.md", "report.json")


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
            f"output: {self.out}  (manifest.json, index.parquet, README.md, report.json)"
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


def _clear_build_outputs(out: Path, log) -> None:
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
        log(f"--force: deleted the earlier build's files; left {len(left)} other entr{'y' if len(left) == 1 else 'ies'} "
            f"in {out} untouched: {', '.join(left[:10])}{', ...' if len(left) > 10 else ''}")


def _claim_output(recipe: Recipe, out: Path, fp: str, force: bool, log=print) -> None:
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
            _clear_build_outputs(out, log)
    (state / "shards").mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        write_json_atomic(record, {"fingerprint": fp, "package_version": __version__, "recipe": recipe.resolved()})
    stale = remove_stale_temps(out / "data")
    if stale:
        log(f"removed {len(stale)} partial shard file(s) a stopped build left: {', '.join(stale[:5])}")


def load_or_build_index(recipe: Recipe, out: Path, workers: int) -> SourceIndex:
    # reuses .fillup/index.json only while the source is what was indexed (else exit 2, saying what changed)
    from fillup_data.index import resume_or_build_index

    return resume_or_build_index(recipe, _state(out) / "index.json", workers)


# --------------------------------------------------------------------------- real shards
def write_real_shard(recipe: Recipe, shard: ShardPlan, out: Path, class_names: list[str]) -> dict:
    """Decode, re-encode and write one real shard; returns its completion record."""
    source = open_source(recipe)
    writer = ShardWriter(out / shard.path, recipe.shards.image_format)
    rows, skipped, metas = [], [], []
    try:
        for s in shard.samples:
            assert isinstance(s, RealSample)
            try:
                img = source.load(s.item)
            except ImageLoadError as err:  # changed on disk since indexing: report, never lose silently
                skipped.append({"split": shard.split, "label": s.item.label, "source_path": s.item.source_path,
                                "where": s.item.where, "reason": err.reason, "detail": err.detail})
                continue
            meta = real_metadata(s.item.label, class_names[s.item.label], s.item.source_path)
            writer.write(s.key, s.item.label, encode_image(img, recipe.shards), meta)
            metas.append(meta)
        num_bytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    for rec, meta in zip(writer.records, metas):
        rows.append(index_row(rec, shard.path, shard.split, meta))
    return shard_record(shard, len(rows), num_bytes, sha, rows, skipped)


def shard_done(out: Path, shard: ShardPlan) -> dict | None:
    """A shard is done when its record is readable and the tar on disk has the recorded size."""
    return completed_shard(out, shard)


def run_real_shards(recipe: Recipe, plan: Plan, out: Path, class_names: list[str], workers: int,
                    progress: bool) -> list[str]:
    """Write every real shard not done yet; returns the paths written."""
    todo = [s for s in plan.shards if s.origin == "real" and shard_done(out, s) is None]
    if not todo:
        return []
    total = sum(len(s.samples) for s in todo)
    bar = tqdm(total=total, desc="real shards", unit="img", disable=not progress)
    if workers <= 1 or len(todo) == 1:
        for s in todo:
            save_shard_record(out, s, write_real_shard(recipe, s, out, class_names))
            bar.update(len(s.samples))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(write_real_shard, recipe, s, out, class_names): s for s in todo}
            for fut in futures:  # submission order: deterministic records, progress as shards finish
                s = futures[fut]
                save_shard_record(out, s, fut.result())
                bar.update(len(s.samples))
    bar.close()
    return [s.path for s in todo]


# --------------------------------------------------------------------------- synthetic shards
def run_synthetic(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, progress: bool) -> tuple[list[str], int]:
    """Invert every class (textual_inversion), then generate each synthetic shard not done yet.
    Returns (paths written, tokens trained)."""
    shards = [s for s in plan.shards if s.origin == "synthetic"]
    if not shards:
        return [], 0
    from fillup_data import synthesis  # torch and diffusers only when there is something to generate

    return synthesis.run(recipe, plan, index, out, shards, progress)


def _write_missing_shards(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, workers: int,
                          progress: bool, log) -> tuple[set[str], int]:
    log("[3/5] real shards")
    written = run_real_shards(recipe, plan, out, index.class_names, workers, progress)
    log(f"[4/5] invert + generate ({plan.num_synthetic:,} synthetic images)")
    synthetic, tokens = run_synthetic(recipe, plan, index, out, progress)
    return set(written) | set(synthetic), tokens


def drop_mismatched_shards(out: Path, plan: Plan) -> list[str]:
    """Read every shard and compare its sha256 with its completion record; a shard that differs
    (overwritten by another process, damaged on disk) is not done: its record and tar go."""
    bad = []
    for s in plan.shards:
        rec = shard_done(out, s)
        if rec is not None and not verify_shard(out, s, rec):
            forget_shard(out, s)
            bad.append(s.path)
    return bad


# --------------------------------------------------------------------------- assemble
def assemble(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, fp: str,
             rewritten: list[str] | None = None) -> dict:
    records = []
    for s in plan.shards:
        rec = shard_done(out, s)
        if rec is None:
            raise FillupError(f"shard {s.path} is not complete; relaunch the build to finish it")
        records.append(rec)
    rows = [r for rec in records for r in rec["rows"]]
    write_index(out / "index.parquet", rows)

    counts: dict[tuple[str, bool], list[int]] = {}
    for r in rows:
        counts.setdefault((r["split"], r["is_synthetic"]), [0] * len(plan.classes))[r["label"]] += 1
    zero = [0] * len(plan.classes)
    real, syn, test = counts.get(("train", False), zero), counts.get(("train", True), zero), counts.get(("test", False), zero)
    classes = [
        {"index": c.index, "name": c.name, "real": real[c.index], "synthetic": syn[c.index], "test": test[c.index],
         "group": c.group, "token_steps": list(c.token_steps)}
        for c in plan.classes
    ]
    tokens = []
    for c in plan.classes:
        tp = out / "tokens" / f"{c.index:05d}.safetensors"
        if tp.is_file():
            from fillup_data.shards.writer import sha256_file

            tokens.append({"path": f"tokens/{c.index:05d}.safetensors", "class_index": c.index,
                           "num_bytes": tp.stat().st_size, "sha256": sha256_file(tp)})
            dp = out / "tokens" / "diffusers" / f"{c.index:05d}.safetensors"
            if dp.is_file():
                tokens.append({"path": f"tokens/diffusers/{c.index:05d}.safetensors", "class_index": c.index,
                               "num_bytes": dp.stat().st_size, "sha256": sha256_file(dp), "format": "diffusers"})
    skipped = index.skipped + [x for rec in records for x in rec["skipped"]]
    retries = sum(rec.get("retries", 0) for rec in records)
    manifest = {
        "name": recipe.name,
        "version": recipe.version,
        "parent_version": recipe.parent_version,
        "fingerprint": fp,
        "package_version": __version__,
        "model": {"id": recipe.generator.model, "revision": recipe.generator.revision or "main"}
        if plan.strategy != "none" else None,
        "recipe": recipe.resolved(),
        "imbalance_factor": round(plan.imbalance_factor, 3),
        "groups": recipe.groups.model_dump(),
        "classes": classes,
        "splits": {
            "train": {"real": sum(real), "synthetic": sum(syn)},
            **({"test": {"real": sum(test)}} if "test" in index.items else {}),
        },
        "shards": [{k: rec[k] for k in ("path", "split", "origin", "num_samples", "num_bytes", "sha256")} for rec in records],
        "tokens": tokens,
        "skipped": len(skipped),
    }
    write_json_atomic(out / "manifest.json", manifest)
    from collections import Counter

    report = {
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "regenerated_images": retries,
        "rewritten_shards": [{"path": p, "reason": "sha256 on disk differed from its completion record"}
                             for p in rewritten or []],
    }
    write_json_atomic(out / "report.json", report)
    from fillup_data.shards.figures import (DISTRIBUTION_PNG, SAMPLES_PNG, SYNTHETIC_SAMPLES_PNG, plot_distribution,
                                            sample_grid)

    plot_distribution(manifest, out / DISTRIBUTION_PNG)
    sample_grid(out, manifest, out / SAMPLES_PNG)
    if plan.num_synthetic:
        sample_grid(out, manifest, out / SYNTHETIC_SAMPLES_PNG, include_real=False)
    (out / "README.md").write_text(render_card(manifest, include_real=True), encoding="utf-8")
    return manifest


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
        from fillup_data.inversion import is_complete
        from fillup_data.synthesis import token_path

        tokens = sum(1 for c in need_token if is_complete(token_path(out, c)))
    finished = read_json_record(out / "manifest.json") is not None
    return BuildProgress(done, len(shards), tokens, len(need_token), finished)


def run_build(recipe: Recipe, out: str | os.PathLike, *, workers: int | None = None, force: bool = False,
              progress: bool = True, log=print, recipe_path: str | os.PathLike | None = None) -> BuildSummary:
    """Run or resume a build in ``out``.  ``recipe_path`` (the recipe's file) is never deleted by --force."""
    t0 = time.time()
    out = Path(out)
    workers = workers or min(8, os.cpu_count() or 1)
    fp = fingerprint(recipe, model_revision(recipe))
    _check_output(out, force, _input_paths(recipe, recipe_path))
    with BuildLock.acquire(_state(out)):
        _claim_output(recipe, out, fp, force, log)

        log(f"[1/5] index   {recipe.source.kind} source")
        index = load_or_build_index(recipe, out, workers)
        log(f"[2/5] plan    {len(index.class_names)} classes, fill {recipe.fill.policy}, strategy {recipe.generator.strategy}")
        plan = make_plan(recipe, index)
        write_json_atomic(_state(out) / "plan.json", {"classes": [c.__dict__ for c in plan.classes],
                                                       "shards": [s.path for s in plan.shards]})
        written, tokens = _write_missing_shards(recipe, plan, index, out, workers, progress, log)
        log("[5/5] assemble  verify every shard's sha256, then manifest, index.parquet, dataset card")
        rewritten = drop_mismatched_shards(out, plan)
        if rewritten:  # the lock keeps other builds out, so this is damage on disk: one more pass repairs it
            log(f"{len(rewritten)} shard(s) differ from their completion records and are not done: "
                f"{', '.join(rewritten)}; rewriting them")
            again, more_tokens = _write_missing_shards(recipe, plan, index, out, workers, progress, log)
            written |= again
            tokens += more_tokens
            still = drop_mismatched_shards(out, plan)
            if still:
                raise FillupError(f"{', '.join(still)}: changed again right after being rewritten; is another "
                                  f"process writing into {out}? Stop it and relaunch")
        manifest = assemble(recipe, plan, index, out, fp, rewritten)
    report = json.loads((out / "report.json").read_text())
    return BuildSummary(
        out=out, classes=len(plan.classes), real=manifest["splits"]["train"]["real"],
        synthetic=manifest["splits"]["train"]["synthetic"],
        test=manifest["splits"].get("test", {}).get("real", 0), shards=len(manifest["shards"]),
        skipped=report["skipped_by_reason"], retries=report["regenerated_images"], seconds=time.time() - t0,
        shards_written=len(written), shards_reused=len(plan.shards) - len(written), tokens_trained=tokens,
        shards_rewritten=len(rewritten),
    )
