"""Stage 5, generate: one synthetic shard, batches mixing classes and checkpoints, streamed into
the shard writer (memory does not grow with the shard), then its completion record."""

from __future__ import annotations

from pathlib import Path

from fillup_data.plan import Plan, ShardPlan
from fillup_data.recipe import Recipe
from fillup_data.state import completed_shard, save_shard_record, shard_record


def run_synthetic_shard(recipe: Recipe, plan: Plan, shard: ShardPlan, out: Path, load_generator,
                        progress: bool) -> dict:
    """The task: skip when done; ``load_generator()`` gives the worker's SyntheticGenerator, built on first use."""
    from fillup_data import synthesis

    if completed_shard(out, shard) is not None:
        return {"skipped": True}
    from fillup_data.progress import progress_bar

    bar = progress_bar(shard.num_samples, f"generate {shard.name}", "img", enabled=progress, leave=False)
    generator = load_generator()
    rows, _, retries, num_bytes, sha = synthesis.write_synthetic_shard(recipe, plan, shard, out, generator, bar)
    bar.close()
    # what decided the pixels besides the metadata (device kind, dtype, compile, micro-batch, versions)
    save_shard_record(out, shard, shard_record(shard, len(rows), num_bytes, sha, rows, [], retries,
                                               pixel_setup=generator.pixel_setup()))
    return {"images": len(rows), "retries": retries}
