"""The model side of a build, used by the invert and generate stages (``fillup_data.stages``), by
``preview`` and by ``regenerate``: inverting classes, exporting tokens, generating a synthetic shard,
and regenerating any synthetic sample from its metadata.

Resumable at two grains: a class whose token file is complete is not trained again (an interrupted
class resumes from its last checkpoint), and a synthetic shard with a completion record is not
generated again.  Images are generated in chunks and streamed into the shard writer, so memory
does not grow with the shard size.
"""

from __future__ import annotations

from pathlib import Path

from fillup_data.plan import Plan, ShardPlan
from fillup_data.recipe import Recipe
from fillup_data.shards.manifest import index_row
from fillup_data.shards.writer import ShardWriter, encode_image
from fillup_data.stages.invert import token_path

# Images generated per chunk before they are encoded into the shard: bounded memory per shard.
_CHUNK_BATCHES = 8


def synthetic_metadata(recipe: Recipe, class_index: int, class_name: str, prompt: str, seed: int, token_step: int) -> dict:
    g = recipe.generator
    return {
        "label": class_index,
        "class_name": class_name,
        "is_synthetic": True,
        "strategy": g.strategy,
        "prompt": prompt,
        "seed": seed,
        "token_step": token_step,
        "guidance_scale": g.guidance_scale,
        "num_inference_steps": g.num_inference_steps,
        "model": g.model,
        "source_path": "",
    }


def make_generator(recipe: Recipe, plan_classes: list, out: Path, pipe):
    from fillup_data.generation import SyntheticGenerator

    names = [c.name for c in plan_classes]
    tokens = None
    if recipe.generator.strategy == "textual_inversion":
        tokens = {c.index: token_path(out, c.index) for c in plan_classes if token_path(out, c.index).is_file()}
    return SyntheticGenerator(pipe, recipe.generator, names, tokens)


def write_synthetic_shard(recipe: Recipe, plan: Plan, shard: ShardPlan, out: Path, generator, bar) -> tuple[list, list, int, int, str]:
    from fillup_data.generation import SampleSpec

    writer = ShardWriter(out / shard.path, recipe.shards.image_format)
    metas, retries = [], []
    chunk = recipe.generator.batch_size * _CHUNK_BATCHES
    try:
        for start in range(0, len(shard.samples), chunk):
            part = shard.samples[start : start + chunk]
            specs = [SampleSpec(s.class_index, s.seed, s.token_step) for s in part]
            for s, g in zip(part, generator.generate(specs)):
                name = plan.classes[s.class_index].name
                meta = synthetic_metadata(recipe, s.class_index, name, g.prompt, g.seed, s.token_step)
                writer.write(s.key, s.class_index, encode_image(g.image, recipe.shards), meta)
                metas.append(meta)
                retries.append(g.retries)
            bar.update(len(part))
        num_bytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    rows = [index_row(rec, shard.path, shard.split, m, r) for rec, m, r in zip(writer.records, metas, retries)]
    return rows, metas, sum(retries), num_bytes, sha


# invert_all etc. live with the invert stage; regenerate in its own module (kept importable from here)
from fillup_data.regenerate import regenerate  # noqa: E402
from fillup_data.stages.invert import export_final_tokens, invert_all, load_class_images  # noqa: E402

__all__ = ["export_final_tokens", "invert_all", "load_class_images", "make_generator", "regenerate",
           "synthetic_metadata", "token_path", "write_synthetic_shard"]
