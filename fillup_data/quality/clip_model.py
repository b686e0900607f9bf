"""The CLIP model that scores a build: a hub id or folder through ``from_pretrained`` (no
``trust_remote_code``), or the offline alias ``builtin:tiny-clip`` (seeded random weights, saved once
under ``$FILLUP_CACHE/models`` and then loaded the same way a downloaded model is)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fillup_data.models.built_folder import folder_digests

from fillup_data.errors import FillupError

from fillup_data.schema.scores import DEFAULT_CLIP_MODEL, TINY_CLIP  # noqa: E402,F401  (defined once there)

# The tiny model's architecture: 32 px images, 32-dim features; bump the folder name when it changes.
TINY_CLIP_FOLDER = "tiny-clip-v1"
TINY_CLIP_SEED = 0
TINY_CLIP_CONFIG = {
    "projection_dim": 32,
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                    "max_position_embeddings": 77, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1, "projection_dim": 32},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                      "image_size": 32, "patch_size": 8, "projection_dim": 32},
}
TINY_CLIP_RECORD = "fillup_builtin.json"


def resolve_clip_model(model: str) -> str:
    """``builtin:tiny-clip`` -> its cached folder (built once, rebuilt when damaged); anything else as given."""
    if not model.startswith("builtin:"):
        return model
    if model != TINY_CLIP:
        raise FillupError(f"--clip-model: unknown built-in model {model!r}; available: {TINY_CLIP}")
    from fillup_data.models.pipeline import cache_dir

    dest = cache_dir() / TINY_CLIP_FOLDER
    if not _tiny_clip_is_intact(dest):
        _save_tiny_clip_atomically(dest)
    return str(dest)


def _builder_identity() -> str:
    return hashlib.sha256(json.dumps([TINY_CLIP_CONFIG, TINY_CLIP_SEED], sort_keys=True).encode()).hexdigest()


def _tiny_clip_is_intact(dest: Path) -> bool:
    from fillup_data.state import read_json_record

    record = read_json_record(dest / TINY_CLIP_RECORD)
    return bool(record) and record.get("builder") == _builder_identity() and record.get("files") == folder_digests(dest, TINY_CLIP_RECORD)


def _save_tiny_clip_atomically(dest: Path) -> None:
    """Build into a temporary sibling and rename it into place (a crash never leaves half a model)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fillup_data.models.architectures import build_clip_tokenizer, load_component_config
    from fillup_data.models.built_folder import install_built_folder

    def build_into(tmp: Path) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_CLIP_SEED)
            model = CLIPModel(CLIPConfig(**TINY_CLIP_CONFIG))
        size = TINY_CLIP_CONFIG["vision_config"]["image_size"]
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            tokenizer=build_clip_tokenizer(load_component_config("tiny", "tokenizer")))
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        return {"builder": _builder_identity()}

    install_built_folder(dest, build_into, TINY_CLIP_RECORD, _tiny_clip_is_intact)


def state_digest(module: torch.nn.Module, *extra: str) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and ``extra``: what the scores depend on, so a
    changed model, even one saved under the same name, recomputes them."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()


@dataclass
class ClipScorer:
    """A loaded CLIP model and its processor, on one device."""

    name: str
    model: object
    processor: object
    device: torch.device
    identity: str

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """L2-normalised float32 image embeddings, on the CPU."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        feats = _as_tensor(self.model.get_image_features(pixel_values=pixels)).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        enc = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        feats = _as_tensor(self.model.get_text_features(**enc)).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu()


def _as_tensor(out) -> torch.Tensor:
    """transformers 5 may return a model output whose ``pooler_output`` is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(model: str, device: str | torch.device) -> ClipScorer:
    from transformers import CLIPModel, CLIPProcessor

    path = resolve_clip_model(model)
    try:
        clip = CLIPModel.from_pretrained(path)
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        offline = " (HF_HUB_OFFLINE is set: only cached models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise FillupError(
            f"--clip-model: cannot load {model!r}{offline}: {err}. Give a hub id of a transformers CLIP model "
            f"(default {DEFAULT_CLIP_MODEL}), a local folder in the save_pretrained layout, or {TINY_CLIP} "
            "for the offline test model") from None
    clip.eval().to(device)
    processor_config = json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)
    return ClipScorer(model, clip, processor, torch.device(device), state_digest(clip, processor_config))
