"""Stable Diffusion component configs shipped with the package, and random-weight pipelines built from them.

No machine this project tests on reaches a model hub, so the tiny test model and the full-size
benchmark model are built here from JSON configs with seeded random weights and saved in the
``save_pretrained`` layout; they are then loaded through the same ``from_pretrained`` path a real
Stable Diffusion checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fillup_data.errors import FillupError

CONFIG_SETS = ("tiny", "sd15", "tiny_image_variation", "tiny_unclip")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "init", "image_encoder", "feature_extractor",
              "image_normalizer", "image_noising_scheduler")
# config set -> the diffusers pipeline class it builds (the image-to-image strategies' tiny models)
IMAGE_PIPELINE_SETS = {"tiny_image_variation": "StableDiffusionImageVariationPipeline",
                       "tiny_unclip": "StableUnCLIPImg2ImgPipeline"}
# Bump when the code that builds a random pipeline changes in a way the shipped configs do not show
# (initialisation, tokenizer construction): cached built-in models made by older code are rebuilt.
BUILDER_VERSION = 2
# Written last into a built-in model folder: who built it and the sha256 of every file it holds.
BUILTIN_RECORD = "fillup_builtin.json"


def load_component_config(config_set: str, component: str) -> dict[str, Any]:
    """One shipped JSON config (``configs/{config_set}_{component}.json``)."""
    if config_set not in CONFIG_SETS:
        raise FillupError(f"unknown model config set {config_set!r}; available: {', '.join(CONFIG_SETS)}")
    if component not in COMPONENTS:
        raise FillupError(f"unknown model component {component!r}; available: {', '.join(COMPONENTS)}")
    text = resources.files("fillup_data.models").joinpath("configs", f"{config_set}_{component}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if k != "_comment"}


def _merges_for(word: str) -> list[tuple[str, str]]:
    """Left-to-right BPE merges that make ``word</w>`` a single token."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = symbols[0]
    for nxt in symbols[1:]:
        merges.append((current, nxt))
        current = current + nxt
    return merges


def merges_for_words(words: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that make each of ``words`` one token (no duplicates, first use kept)."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        for pair in _merges_for(word):
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
    return merges


def build_clip_tokenizer(tok_cfg: dict[str, Any], merges: list[tuple[str, str]] | None = None):
    """A CLIP BPE tokenizer built from code (no vocab.json download); the one builder of the package
    (the tiny test models, the CLIP scorer's tiny model and toyworld, which passes its trained merges).

    The vocabulary is the 256 byte-level symbols, each also with ``</w>`` (so any text tokenizes),
    then one token per merge (default: merges that make each of ``tok_cfg["words"]`` one token -- the TI
    init word "object" must be a single token), then ``<|startoftext|>``/``<|endoftext|>`` last, as in CLIP.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for sym in alphabet:
        vocab[sym] = len(vocab)
    for sym in alphabet:
        vocab[sym + "</w>"] = len(vocab)
    if merges is None:
        merges = merges_for_words(tok_cfg.get("words", []))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=tok_cfg["bos_token"],
        eos_token=tok_cfg["eos_token"],
        unk_token=tok_cfg["unk_token"],
        pad_token=tok_cfg["pad_token"],
        model_max_length=tok_cfg["model_max_length"],
    )


def _build_modules(config_set: str):
    """Instantiate UNet, VAE and text encoder from the shipped configs (weights from the current RNG)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(load_component_config(config_set, "unet"))
    vae = AutoencoderKL.from_config(load_component_config(config_set, "vae"))
    te_cfg = {k: v for k, v in load_component_config(config_set, "text_encoder").items() if k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    if config_set == "tiny":
        init = load_component_config(config_set, "init")
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2"):  # cross-attention (attn1 is self-attention)
                    module.to_k.weight.mul_(init["cross_attention_key_scale"])
                    module.to_v.weight.mul_(init["cross_attention_value_scale"])
    return unet, vae, text_encoder


def count_parameters(config_set: str) -> dict[str, int]:
    """Parameter count per module, built on the ``meta`` device (no memory, no init time)."""
    with torch.device("meta"):
        unet, vae, text_encoder = _build_modules(config_set)
    return {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }


def assemble_text_to_image(unet, vae, text_encoder, tokenizer, scheduler):
    """A stock ``StableDiffusionPipeline`` of these modules with no safety checker: the one assembler of
    the package's own text-to-image pipelines (the random tiny/SD 1.5 ones here, toyworld's)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_random_pipeline(config_set: str = "sd15", path: str | os.PathLike | None = None, seed: int = 0):
    """A StableDiffusionPipeline of the ``config_set`` architecture with seeded random weights.

    ``sd15`` has the real model's cost (UNet ~860M, VAE ~84M, CLIP-L text ~123M parameters) for
    GPU benchmarks; ``tiny`` is the test/demo model. With ``path`` the pipeline is also saved there
    (``save_pretrained`` layout). The caller's global RNG state is left untouched.
    """
    from diffusers import PNDMScheduler

    if config_set in IMAGE_PIPELINE_SETS:
        return _build_image_pipeline(config_set, path, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = _build_modules(config_set)
    tokenizer = build_clip_tokenizer(load_component_config(config_set, "tokenizer"))
    # from_config, like from_pretrained, keeps keys other schedulers use (clip_sample for DDIM)
    scheduler = PNDMScheduler.from_config(load_component_config(config_set, "scheduler"))
    pipe = assemble_text_to_image(unet, vae, text_encoder, tokenizer, scheduler)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def _build_image_pipeline(config_set: str, path, seed: int):
    """The tiny StableDiffusionImageVariationPipeline / StableUnCLIPImg2ImgPipeline (the configs of
    diffusers' own fast tests of those pipelines, shrunk), random weights from ``seed``."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    def cfg(component):
        return load_component_config(config_set, component)

    def scheduler(component):
        c = cfg(component)
        return getattr(diffusers, c["_class_name"]).from_config(c)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel.from_config(cfg("unet"))
        vae = diffusers.AutoencoderKL.from_config(cfg("vae"))
        vision = {k: v for k, v in cfg("image_encoder").items() if k != "architectures"}
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).eval()
        if config_set == "tiny_unclip":
            from transformers import CLIPTextConfig, CLIPTextModel

            text = {k: v for k, v in cfg("text_encoder").items() if k != "architectures"}
            text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    feature_extractor = CLIPImageProcessor(**cfg("feature_extractor"))
    if config_set == "tiny_image_variation":
        pipe = diffusers.StableDiffusionImageVariationPipeline(
            vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler("scheduler"), safety_checker=None,
            feature_extractor=feature_extractor, requires_safety_checker=False)
    else:
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

        pipe = diffusers.StableUnCLIPImg2ImgPipeline(
            feature_extractor=feature_extractor, image_encoder=image_encoder,
            image_normalizer=StableUnCLIPImageNormalizer(**cfg("image_normalizer")),
            image_noising_scheduler=scheduler("image_noising_scheduler"),
            tokenizer=build_clip_tokenizer(cfg("tokenizer")), text_encoder=text_encoder, unet=unet,
            scheduler=scheduler("scheduler"), vae=vae)
    if path is not None:
        pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def builder_identity(config_set: str) -> str:
    """sha256 of the builder version and every shipped config of ``config_set``: changes exactly
    when a rebuild would give other files."""
    h = hashlib.sha256(f"builder {BUILDER_VERSION}\n".encode())
    for component in COMPONENTS:
        res = resources.files("fillup_data.models").joinpath("configs", f"{config_set}_{component}.json")
        if res.is_file():
            h.update(f"{component}\n".encode() + res.read_bytes())
    return h.hexdigest()


def builtin_folder_is_intact(dest: Path, config_set: str, seed: int) -> bool:
    """True when ``dest`` was built by this builder from these configs and seed, and every file it
    recorded still has its recorded sha256 (a truncated or corrupted weight file fails)."""
    from fillup_data.shards.writer import sha256_file
    from fillup_data.state import read_json_record

    record = read_json_record(Path(dest) / BUILTIN_RECORD)
    if record is None or not isinstance(record.get("files"), dict) or not record["files"]:
        return False
    if (record.get("config_set"), record.get("seed"), record.get("builder")) != (config_set, seed,
                                                                                builder_identity(config_set)):
        return False
    for rel, digest in record["files"].items():
        path = Path(dest) / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def save_random_pipeline_atomically(config_set: str, dest: Path, seed: int) -> Path:
    """Build into a temporary sibling folder and rename it into place, so a crash or a concurrent
    builder never leaves a half-written model where ``from_pretrained`` would find it.  A folder
    already at ``dest`` (stale or damaged) is moved aside first and deleted."""
    from fillup_data import __version__
    from fillup_data.models.built_folder import install_built_folder

    def build_into(tmp: Path) -> dict:
        build_random_pipeline(config_set, tmp, seed)
        return {"config_set": config_set, "seed": seed, "builder": builder_identity(config_set),
                "builder_version": BUILDER_VERSION, "package_version": __version__}

    return install_built_folder(Path(dest), build_into, BUILTIN_RECORD,
                                lambda d: builtin_folder_is_intact(d, config_set, seed))
