"""Regenerate any synthetic sample of a build from its metadata, the build's manifest and its tokens.

A sample's metadata holds its class, seed, token checkpoint and prompt; the manifest holds the rest:
the recipe (scheduler, eta, resolution) and, per synthetic shard, the ``pixel_setup`` it was made with
(device kind, dtype, compile, micro-batch rows, torch/diffusers versions, CPU threads). Regeneration
reuses the recorded dtype, compile and micro-batch; on the same device kind and versions it gives the
same pixels. Elsewhere it still regenerates and ``regenerate_sample`` reports how far the image is from
the stored one (PSNR) and which recorded settings differ, instead of passing silently.
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fillup_data.errors import FillupError
from fillup_data.schema.manifest import Manifest
from fillup_data.schema import sample as sample_schema


@dataclass
class Regenerated:
    image: object  # PIL.Image
    key: str
    recorded_setup: dict | None
    current_setup: dict
    differences: list[str] = field(default_factory=list)  # recorded -> current pixel-deciding settings
    exact: bool = False  # the re-encoded image has the stored bytes
    psnr: float = math.inf  # dB, stored image vs the regenerated one through the same encoder

    def summary(self) -> str:
        if self.exact:
            return "pixel-exact: the stored image's bytes are reproduced"
        where = ("same recorded setup" if not self.differences
                 else "setup differs from the recorded one: " + "; ".join(self.differences))
        return f"NOT pixel-exact ({where}); PSNR against the stored image {self.psnr:.2f} dB"


def shard_setup(manifest: Manifest, shard_path: str | None) -> dict | None:
    """The pixel setup recorded for ``shard_path``; with no path, the build's one setup (None when the
    build predates the record or its synthetic shards were made on several setups)."""
    setups = {s.path: s.pixel_setup for s in manifest.shards if s.origin == "synthetic"}
    if shard_path is not None:
        return setups.get(shard_path)
    distinct = {repr(sorted(s.items())) for s in setups.values() if s}
    if len(distinct) == 1:
        return next(s for s in setups.values() if s)
    return None


def generator_config(recipe, metadata: dict, setup: dict | None):
    """The recipe's generator settings with the sample's recorded fields and the shard's recorded
    pixel setup (a build made before setups were recorded ran eager at the recipe's batch size)."""
    update = {"strategy": metadata["strategy"], "guidance_scale": metadata["guidance_scale"],
              "num_inference_steps": metadata["num_inference_steps"], "model": metadata["model"]}
    if setup:
        update.update({"batch_size": int(setup["micro_batch"]), "compile": bool(setup["compile"]),
                       "dtype": setup["dtype"] if setup["dtype"] in ("float32", "float16", "bfloat16") else "auto"})
    else:
        update["compile"] = False
        if recipe.generator.batch_size == "auto":
            raise FillupError("the manifest records no pixel setup for this sample's shard and the recipe's "
                              "generator.batch_size is auto: the micro-batch it ran at is unknown")
    return recipe.generator.model_copy(update=update)


@contextmanager
def _cpu_threads(setup: dict | None, device: str):
    """On CPU, run at the recorded intra-op thread count (it decides the last bits)."""
    import torch

    wanted = (setup or {}).get("cpu_threads")
    if not device.startswith("cpu") or not wanted:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(wanted))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_for(setup: dict | None) -> str:
    import torch

    if setup and str(setup.get("device", "")).startswith("cuda") and torch.cuda.is_available():
        return "cuda"
    if setup and str(setup.get("device", "")).startswith("cpu"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _regenerate(build: Path, manifest: Manifest, metadata: dict, setup: dict | None, pipe):
    from fillup_data.generation import SampleSpec, SyntheticGenerator, real_images
    from fillup_data.generation.strategies import Condition, StrategyContext, strategy_class
    from fillup_data.recipe import parse_stored_recipe
    from fillup_data.stages.invert import token_path

    recipe = parse_stored_recipe(manifest.recipe, str(build / "manifest.json"))
    if not metadata.get("is_synthetic"):
        raise FillupError(f"sample of class {metadata.get('label')} is real: nothing to regenerate")
    gen_cfg = generator_config(recipe, metadata, setup)
    strategy = strategy_class(gen_cfg.strategy)
    device = str(pipe.unet.device) if pipe is not None else _device_for(setup)
    with _cpu_threads(setup, device):
        pipe = pipe or strategy.load_pipeline(gen_cfg, device=device)
        names = [c.name for c in sorted(manifest.classes, key=lambda c: c.index)]
        c = int(metadata["label"])
        tokens = {c: token_path(build, c)} if strategy.inverts else {}
        if strategy.uses_real_images:
            context = real_images.from_build(build, len(names), tokens)
        else:
            context = StrategyContext(out=build, token_files=tokens)
        generator = SyntheticGenerator(pipe, gen_cfg, names, context=context)
        # what the sample was conditioned on, as recorded (its prompt and source); the recorded seed
        # is the one that gave a good image: no retry needed
        recorded = Condition(metadata["prompt"], metadata["source_key"])
        spec = SampleSpec(c, int(metadata["seed"]), int(metadata["token_step"]))
        condition = generator.condition(spec) if strategy.inverts else recorded
        sample = generator.regenerate(spec, condition)
        current = generator.pixel_setup()
    if sample.prompt != metadata["prompt"]:
        raise FillupError(f"prompt {sample.prompt!r} differs from the recorded {metadata['prompt']!r}")
    return sample.image, recipe, current


def regenerate(build: str | Path, metadata: dict, pipe=None, setup: dict | None = None):
    """The synthetic image of ``metadata`` (a sample's ``json``), made again with the build's recorded
    settings; ``setup`` defaults to the build's one recorded pixel setup (see ``regenerate_sample`` to
    name the sample by key, which finds its shard's setup and compares with the stored image).
    The metadata of a build made before a key was added (``source_key``) is read as it is."""
    build = Path(build)
    manifest = Manifest.read(build / "manifest.json")
    setup = setup if setup is not None else shard_setup(manifest, None)
    return _regenerate(build, manifest, sample_schema.as_current(metadata), setup, pipe)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    if a.shape != b.shape:
        raise FillupError(f"images differ in size: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def regenerate_sample(build: str | Path, key: str, pipe=None) -> Regenerated:
    """Regenerate the synthetic sample ``key`` with its shard's recorded setup and compare it with the
    stored image: ``exact`` when re-encoding gives the stored bytes, else the PSNR between the stored
    image and the regenerated one passed through the same encoder, with the settings that differ."""
    from PIL import Image

    from fillup_data.fastpath import setup_differences
    from fillup_data.shards.index_parquet import read_index
    from fillup_data.shards.writer import encode_image

    build = Path(build)
    rows = read_index(build / "index.parquet", filters=[("key", "=", key)])
    if not rows:
        raise FillupError(f"{build / 'index.parquet'}: no sample with key {key!r}")
    row = rows[0]
    manifest = Manifest.read(build / "manifest.json")
    setup = shard_setup(manifest, row["shard"])
    metadata = {k: row[k] for k in sample_schema.METADATA_KEYS}
    image, recipe, current = _regenerate(build, manifest, metadata, setup, pipe)
    try:
        with open(build / row["shard"], "rb") as f:
            f.seek(row["image_offset"])
            stored = f.read(row["image_size"])
    except OSError as err:
        raise FillupError(f"{build / row['shard']}: cannot read the stored image of {key} ({err})") from err
    encoded = encode_image(image, recipe.shards)
    exact = encoded == stored
    if exact:
        value = math.inf
    else:
        try:
            a = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any decoder error: the stored image is damaged
            raise FillupError(f"{build / row['shard']}: the stored image of {key} does not decode ({err})") from err
        b = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        value = psnr(a, b)
    return Regenerated(image, key, setup, current, setup_differences(setup, current) if setup else
                       ["no pixel setup recorded (a build made before fillup-data recorded it)"], exact, value)
