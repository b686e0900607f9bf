"""Stage 6, assemble (one worker): verify every shard against its completion record, then write
``index.parquet``, ``manifest.json``, ``report.json``, the figures and the dataset card."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fillup_data import __version__
from fillup_data.errors import FillupError
from fillup_data.index import SourceIndex
from fillup_data.plan import Plan
from fillup_data.recipe import Recipe
from fillup_data.schema import sample as sample_schema
from fillup_data.schema.manifest import ClassEntry, Manifest, PromptsEntry, ShardEntry, TokenEntry
from fillup_data.shards.card import render_card
from fillup_data.shards.index_parquet import IndexWriter
from fillup_data.shards.writer import sha256_file
from fillup_data.state import completed_shard, forget_shard, verify_shard, write_json_atomic


def drop_mismatched_shards(out: Path, plan: Plan) -> list[str]:
    """Read every shard and compare its sha256 with its completion record; a shard that differs
    (overwritten by another process, damaged on disk) is not done: its record and tar go."""
    bad = []
    for s in plan.shards:
        rec = completed_shard(out, s)
        if rec is not None and not verify_shard(out, s, rec):
            forget_shard(out, s)
            bad.append(s.path)
    return bad


def prompts_entries(recipe: Recipe, plan: Plan, out: Path) -> list[PromptsEntry] | None:
    """Every class's ``prompts/NNNNN.json`` of an lm_prompts / captions build (None for other strategies)."""
    from fillup_data.generation.prompt_files import PROMPT_STRATEGIES, prompt_file_path

    if recipe.generator.strategy not in PROMPT_STRATEGIES:
        return None
    entries = []
    for c in plan.classes:
        p = prompt_file_path(out, c.index)
        if c.synthetic > 0 and not p.is_file():
            raise FillupError(f"{p}: missing; relaunch the build to make the prompts of class {c.index}")
        if p.is_file():
            entries.append(PromptsEntry(p.relative_to(out).as_posix(), c.index, p.stat().st_size, sha256_file(p)))
    return entries


def assemble(recipe: Recipe, plan: Plan, index: SourceIndex, out: Path, fp: str,
             rewritten: list[str] | None = None) -> dict:
    """One shard record in memory at a time: at iNaturalist's size the records' rows are millions of dicts."""
    counts: dict[tuple[str, bool], list[int]] = {}
    entries, skipped_in_shards, retries = [], [], 0
    with IndexWriter(out / "index.parquet") as writer:
        for s in plan.shards:
            rec = completed_shard(out, s)
            if rec is None:  # the writer is aborted: the old index.parquet (if any) stays
                raise FillupError(f"shard {s.path} is not complete; relaunch the build to finish it")
            for r in rec["rows"]:
                counts.setdefault((r["split"], r["is_synthetic"]), [0] * len(plan.classes))[r["label"]] += 1
            writer.write(rec["rows"])
            entries.append(ShardEntry(rec["path"], rec["split"], rec["origin"], rec["num_samples"], rec.get("num_bytes"),
                                      rec.get("sha256"), rec.get("pixel_setup")))
            skipped_in_shards += rec["skipped"]
            retries += rec.get("retries", 0)
    zero = [0] * len(plan.classes)
    real, syn, test = counts.get(("train", False), zero), counts.get(("train", True), zero), counts.get(("test", False), zero)
    classes = [
        ClassEntry(c.index, c.name, real[c.index], syn[c.index], test[c.index], c.group, list(c.token_steps))
        for c in plan.classes
    ]
    tokens = []
    for c in plan.classes:
        tp = out / "tokens" / f"{c.index:05d}.safetensors"
        if tp.is_file():
            tokens.append(TokenEntry(f"tokens/{c.index:05d}.safetensors", c.index, tp.stat().st_size, sha256_file(tp)))
            dp = out / "tokens" / "diffusers" / f"{c.index:05d}.safetensors"
            if dp.is_file():
                tokens.append(TokenEntry(f"tokens/diffusers/{c.index:05d}.safetensors", c.index, dp.stat().st_size,
                                         sha256_file(dp), format="diffusers"))
    skipped = index.skipped + skipped_in_shards
    prompts = prompts_entries(recipe, plan, out)
    record = Manifest(
        name=recipe.name,
        version=recipe.version,
        parent_version=recipe.parent_version,
        fingerprint=fp,
        package_version=__version__,
        model={"id": recipe.generator.model, "revision": recipe.generator.revision or "main"}
        if plan.strategy != "none" else None,
        recipe=recipe.resolved(),
        imbalance_factor=round(plan.imbalance_factor, 3),
        groups=recipe.groups.model_dump(),
        classes=classes,
        splits={
            "train": {"real": sum(real), "synthetic": sum(syn)},
            **({"test": {"real": sum(test)}} if "test" in index.items else {}),
        },
        shards=entries,
        sharding={name: {"shards": len([s for s in plan.shards if f"{s.split}-{s.origin}" == name]),
                         "multiple_of": m} for name, m in plan.shard_multiples.items()},
        tokens=tokens,
        prompts=prompts,
        skipped=len(skipped),
        sample_keys=list(sample_schema.METADATA_KEYS),
    )
    record.write(out / "manifest.json")
    manifest = record.to_dict()  # the card and figures read the manifest as published
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
