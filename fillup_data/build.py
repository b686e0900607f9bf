"""One build: index -> plan -> invert -> generate -> assemble, each stage idempotent and resumable.

State lives in ``OUT/.fillup/``: the index, a completion record per finished shard (written after
the shard is renamed into place), and the fingerprint of the recipe that started the build.
Relaunching the same command runs only what is missing; a different recipe is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fillup_data import __version__
from fillup_data.errors import FillupError
from fillup_data.index import SourceIndex, build_index
from fillup_data.plan import Plan, RealSample, ShardPlan, make_plan
from fillup_data.recipe import Recipe, fingerprint, model_revision
from fillup_data.shards.card import render_card
from fillup_data.shards.manifest import index_row, write_index, write_json_atomic
from fillup_data.shards.writer import ShardWriter, encode_image, real_metadata
from fillup_data.sources import ImageLoadError, open_source

STATE_DIR = ".fillup"


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
    extra: dict = field(default_factory=dict)

    def format(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in self.skipped.items()) or "none"
        return (
            f"build finished in {self.seconds:.1f}s: {self.classes} classes, {self.real:,} real train, "
            f"{self.synthetic:,} synthetic, {self.test:,} test images in {self.shards} shards "
            f"({self.shards_written} written, {self.shards_reused} reused from an earlier run)\n"
            f"skipped images: {skipped}; regenerated black/non-finite images: {self.retries}\n"
            f"output: {self.out}  (manifest.json, index.parquet, README.md, report.json)"
        )


def _state(out: Path) -> Path:
    return out / STATE_DIR


def _claim_output(recipe: Recipe, out: Path, fp: str, force: bool) -> None:
    state = _state(out)
    record = state / "build.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("fingerprint") != fp:
            if not force:
                raise FillupError(
                    f"{out} holds a build of a different recipe (fingerprint {old.get('fingerprint', '?')[:12]} != "
                    f"{fp[:12]}): use another --out, or --force to delete it and start over"
                )
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not force:
        raise FillupError(f"{out} exists and is not a fillup-data build: choose an empty or new --out folder")
    elif out.exists() and force:
        shutil.rmtree(out)
    (state / "shards").mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        write_json_atomic(record, {"fingerprint": fp, "package_version": __version__, "recipe": recipe.resolved()})


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
    return _shard_record(shard, len(rows), num_bytes, sha, rows, skipped)


def _shard_record(shard: ShardPlan, n: int, num_bytes: int, sha: str, rows: list[dict], skipped: list, retries: int = 0) -> dict:
    return {
        "path": shard.path, "split": shard.split, "origin": shard.origin, "num_samples": n,
        "num_bytes": num_bytes, "sha256": sha, "rows": rows, "skipped": skipped, "retries": retries,
    }


def _record_path(out: Path, shard: ShardPlan) -> Path:
    return _state(out) / "shards" / f"{shard.name}.json"


def shard_done(out: Path, shard: ShardPlan) -> dict | None:
    """A shard is done when its record exists and the tar on disk has the recorded size."""
    rec_path = _record_path(out, shard)
    if not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    tar = out / shard.path
    if not tar.is_file() or tar.stat().st_size != rec["num_bytes"]:
        return None
    return rec


def _save_record(out: Path, shard: ShardPlan, rec: dict) -> None:
    write_json_atomic(_record_path(out, shard), rec)


def run_real_shards(recipe: Recipe, plan: Plan, out: Path, class_names: list[str], workers: int, progress: bool) -> tuple[int, int]:
    todo = [s for s in plan.shards if s.origin == "real" and shard_done(out, s) is None]
    reused = sum(1 for s in plan.shards if s.origin == "real") - len(todo)
    if not todo:
        return 0, reused
    total = sum(len(s.samples) for s in todo)
    bar = tqdm(total=total, desc="real shards", unit="img", disable=not progress)
    if workers <= 1 or len(todo) == 1:
        for s in todo:
            _save_record(out, s, write_real_shard(recipe, s, out, class_names))
            bar.update(len(s.samples))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(write_real_shard, recipe, s, out, class_names): s for s in todo}
            for fut in futures:  # submission order: deterministic records, progress as shards finish
                s = futures[fut]
                _save_record(out, s, fut.result())
                bar.update(len(s.samples))
    bar.close()
    return len(todo), reused


# --------------------------------------------------------------------------- synthetic shards
def run_synthetic(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, progress: bool) -> tuple[int, int, int]:
    """Invert every class (textual_inversion), then generate each synthetic shard. Returns
    (shards written, shards reused, tokens trained)."""
    shards = [s for s in plan.shards if s.origin == "synthetic"]
    if not shards:
        return 0, 0, 0
    from fillup_data import synthesis  # torch and diffusers only when there is something to generate

    return synthesis.run(recipe, plan, index, out, shards, shard_done, _save_record, _shard_record, progress)


# --------------------------------------------------------------------------- assemble
def assemble(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, fp: str) -> dict:
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


def run_build(recipe: Recipe, out: str | os.PathLike, *, workers: int | None = None, force: bool = False,
              progress: bool = True, log=print) -> BuildSummary:
    t0 = time.time()
    out = Path(out)
    workers = workers or min(8, os.cpu_count() or 1)
    fp = fingerprint(recipe, model_revision(recipe))
    _claim_output(recipe, out, fp, force)

    log(f"[1/5] index   {recipe.source.kind} source")
    index = load_or_build_index(recipe, out, workers)
    log(f"[2/5] plan    {len(index.class_names)} classes, fill {recipe.fill.policy}, strategy {recipe.generator.strategy}")
    plan = make_plan(recipe, index)
    write_json_atomic(_state(out) / "plan.json", {"classes": [c.__dict__ for c in plan.classes],
                                                   "shards": [s.path for s in plan.shards]})
    log("[3/5] real shards")
    written, reused = run_real_shards(recipe, plan, out, index.class_names, workers, progress)
    log(f"[4/5] invert + generate ({plan.num_synthetic:,} synthetic images)")
    sw, sr, tokens = run_synthetic(recipe, plan, index, out, progress)
    log("[5/5] assemble  manifest, index.parquet, dataset card")
    manifest = assemble(recipe, plan, index, out, fp)
    report = json.loads((out / "report.json").read_text())
    return BuildSummary(
        out=out, classes=len(plan.classes), real=manifest["splits"]["train"]["real"],
        synthetic=manifest["splits"]["train"]["synthetic"],
        test=manifest["splits"].get("test", {}).get("real", 0), shards=len(manifest["shards"]),
        skipped=report["skipped_by_reason"], retries=report["regenerated_images"], seconds=time.time() - t0,
        shards_written=written + sw, shards_reused=reused + sr, tokens_trained=tokens,
    )
