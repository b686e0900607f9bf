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

from tqdm.auto import tqdm

from fillup_data.errors import FillupError
from fillup_data.index import SourceIndex
from fillup_data.plan import Plan, ShardPlan
from fillup_data.recipe import Recipe, model_revision
from fillup_data.shards.manifest import index_row
from fillup_data.shards.writer import ShardWriter, encode_image
from fillup_data.sources import ImageLoadError, SourceItem, open_source

# Images generated per chunk before they are encoded into the shard: bounded memory per shard.
_CHUNK_BATCHES = 8


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
    from fillup_data.inversion import InversionJob, invert_classes, is_complete

    wanted = classes if classes is not None else [c.index for c in plan.classes if c.synthetic > 0]
    todo = [c for c in wanted if not is_complete(token_path(out, c))]
    if not todo:
        return 0
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    by_class: dict[int, list[SourceItem]] = {}
    for it in index.items["train"]:
        by_class.setdefault(it.label, []).append(it)
    per_pass = recipe.inversion.classes_per_pass
    resolution = recipe.inversion.resolution or recipe.generator.resolution
    bar = tqdm(total=len(todo), desc="invert classes", unit="class", disable=not progress or len(todo) < 2)
    for start in range(0, len(todo), per_pass):
        group = todo[start : start + per_pass]
        jobs = []
        for c in group:
            images = load_class_images(recipe, by_class.get(c, []))
            if not images:
                raise FillupError(f"class {c} {plan.classes[c].name!r}: no readable training images left to invert")
            jobs.append(InversionJob(c, plan.classes[c].name, images, token_path(out, c)))
        invert_classes(pipe, jobs, cfg=recipe.inversion, resolution=resolution, seed=recipe.seed,
                       model_id=recipe.generator.model, model_revision=model_revision(recipe),
                       progress=progress, step_callback=step_callback)
        bar.update(len(group))
    bar.close()
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


# --------------------------------------------------------------------------- regenerate
def regenerate(build: str | Path, metadata: dict, pipe=None):
    """Regenerate one synthetic image from its ``json`` metadata and the build's manifest + tokens.

    The manifest's recipe supplies what a sample's metadata does not repeat (scheduler, eta,
    resolution, batch size: CPU kernels differ by batch size, so the micro-batch is kept)."""
    from fillup_data.generation import SampleSpec, SyntheticGenerator
    from fillup_data.models import load_pipeline_for
    from fillup_data.recipe import parse_stored_recipe
    from fillup_data.shards.manifest import read_manifest

    build = Path(build)
    manifest = read_manifest(build)
    recipe = parse_stored_recipe(manifest["recipe"], str(build / "manifest.json"))
    if not metadata.get("is_synthetic"):
        raise FillupError(f"sample of class {metadata.get('label')} is real: nothing to regenerate")
    gen_cfg = recipe.generator.model_copy(update={
        "strategy": metadata["strategy"], "guidance_scale": metadata["guidance_scale"],
        "num_inference_steps": metadata["num_inference_steps"], "model": metadata["model"]})
    pipe = pipe or load_pipeline_for(gen_cfg)
    names = [c["name"] for c in manifest["classes"]]
    c = int(metadata["label"])
    tokens = {c: token_path(build, c)} if gen_cfg.strategy == "textual_inversion" else None
    generator = SyntheticGenerator(pipe, gen_cfg, names, tokens)
    # the recorded seed is the one that gave a good image: no retry needed
    sample = generator.regenerate(SampleSpec(c, int(metadata["seed"]), int(metadata["token_step"])))
    if sample.prompt != metadata["prompt"]:
        raise FillupError(f"prompt {sample.prompt!r} differs from the recorded {metadata['prompt']!r}")
    return sample.image
