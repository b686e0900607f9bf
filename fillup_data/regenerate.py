"""Regenerate any synthetic sample of a build from its metadata, the build's manifest and its tokens."""

from __future__ import annotations

from pathlib import Path

from fillup_data.errors import FillupError


def regenerate(build: str | Path, metadata: dict, pipe=None):
    """Regenerate one synthetic image from its ``json`` metadata and the build's manifest + tokens.

    The manifest's recipe supplies what a sample's metadata does not repeat (scheduler, eta,
    resolution, batch size: CPU kernels differ by batch size, so the micro-batch is kept)."""
    from fillup_data.generation import SampleSpec, SyntheticGenerator
    from fillup_data.synthesis import token_path
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
