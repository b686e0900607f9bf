"""Assemble the trained parts into the shipped diffusers pipeline folder (``fillup_data/demo/toyworld/pipeline``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from fillup_data.demo import world
from fillup_data.errors import FillupError
from fillup_data.demo.toyworld import model as tw

INFO_NAME = "fillup_toyworld.json"


def default_pipeline_dir() -> Path:
    """The package's pipeline folder (``builtin:toyworld`` resolves here)."""
    from fillup_data.models.pipeline import TOYWORLD_DIR

    return TOYWORLD_DIR


def reproduce_command(config: dict, steps: int) -> str:
    """The ``scripts/train_toyworld.py`` command that trains this generator, every setting that shapes it
    spelled out (defaults change; a recorded command must not). ``--device cuda`` gives the same data
    stream; its float sums differ, so weights of the same quality, not the same bytes."""
    cmd = (f"python scripts/train_toyworld.py all --work build/toyworld-train --steps {steps}"
           f" --autoencoder {config.get('autoencoder', 'trained')} --unet {config.get('unet', 'base')}")
    cmd += f" --hard-fraction {config.get('hard_fraction', 0.0):g}"  # always: the default changed once
    cmd += f" --batch-size {config.get('batch_size', 64)}"  # always: the default changed once
    if config.get("seed", 0):
        cmd += f" --seed {config['seed']}"
    return cmd


def export_pipeline(work_dir, cfg, out: str | Path | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the pipeline (EMA UNet + text encoder, autoencoder, tokenizer, DDIM scheduler) to ``out``.

    The autoencoder is the one the training state records (``cfg.autoencoder`` must name the same):
    the trained VAE from ``work_dir/vae``, or the exact space-to-depth, which has no weights and needs
    no VAE stage. UNet and VAE saved in float16 (half the bytes; trained in float32, loaded back into
    float32 by a plain ``from_pretrained``). Written to a temporary sibling folder and renamed into place.
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from fillup_data.demo.toyworld.train import latent_channels_for, recorded_config

    work = Path(work_dir)
    state_path = work / "generator" / "state.json"
    vae_dir = work / "vae"
    if not state_path.is_file():
        raise FillupError(f"{state_path}: no generator training state; run `scripts/train_toyworld.py generator` first")
    state = json.loads(state_path.read_text())
    recorded = recorded_config(state)
    autoencoder = recorded["autoencoder"]
    if cfg is not None and cfg.autoencoder != autoencoder:
        raise FillupError(
            f"{state_path}: the generator was trained for --autoencoder {autoencoder}, not {cfg.autoencoder}; "
            f"export with --autoencoder {autoencoder}"
        )
    if autoencoder == "trained" and not (vae_dir / "config.json").is_file():
        raise FillupError(f"{vae_dir}: no trained VAE; run `scripts/train_toyworld.py vae` first")
    tensors = load_file(str(work / "generator" / "weights.safetensors"))
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    tokenizer = tw.build_tokenizer()
    unet = tw.build_unet(latent_channels_for(autoencoder), recorded["unet"])
    text_encoder = tw.build_text_encoder(tokenizer)
    # parameters from the EMA; buffers (the text encoder's position ids) from the raw state dict
    for module, prefix in ((unet, "unet."), (text_encoder, "text_encoder.")):
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        sd.update({k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)})
        module.load_state_dict(sd)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)) if autoencoder == "trained" else tw.build_exact_autoencoder()
    pipe = tw.build_pipeline(unet, vae, text_encoder, tokenizer)
    # UNet and VAE in ``dtype`` (diffusers loads them into float32 unless asked otherwise); the text
    # encoder stays float32 (0.6 MB): transformers 5 loads a checkpoint in its stored dtype by
    # default, and a float16 text encoder beside a float32 UNet fails in a plain from_pretrained
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)
    out = Path(out) if out else default_pipeline_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if autoencoder == "exact":
            from fillup_data.demo.toyworld.vae import measure_vae

            vae_quality = measure_vae(vae, n=64)  # lossless: mse 0, so the PSNR is measure_vae's cap (168 dB)
        else:
            vae_quality = json.loads((vae_dir / "quality.json").read_text()) if (vae_dir / "quality.json").is_file() else {}
        info = {
            "name": "toyworld",
            "description": "fillup-data's small text-to-image model of the procedural world (fillup_data.demo.world)",
            "resolution": tw.RESOLUTION,
            "held_out_combinations": [list(p) for p in world.HELD_OUT],
            "generator_training": {"steps_done": state["step"], "config": state["config"], "final_log": state["log"][-5:]},
            "autoencoder": autoencoder,
            "vae_quality": vae_quality,
            "weights_dtype": {"unet": str(dtype).removeprefix("torch."),
                              "vae": str(dtype).removeprefix("torch.") if autoencoder == "trained" else "none (no weights)",
                              "text_encoder": "float32"},
            "reproduce": reproduce_command(recorded, recorded["steps"])
            + ("" if state["step"] >= recorded["steps"] else f"  (these weights: stopped at step {state['step']})"),
        }
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
