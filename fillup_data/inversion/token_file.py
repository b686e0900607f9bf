"""Token files: every checkpoint of one class's learned token, plus how it was learned.

``tokens/{class_index:05d}.safetensors`` holds tensors ``step_00100`` ... (``[num_vectors, dim]``
float32) and string metadata whose values are JSON. Files are written byte-reproducibly (the
safetensors library orders metadata keys at random, so the header is serialized here with sorted
keys) and atomically (temporary file, then rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fillup_data.errors import FillupError

FORMAT = "fillup-token-v1"

_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


def token_name(class_index: int) -> str:
    """The placeholder token of a class, as it appears in prompts and exported files."""
    return f"<fillup-{class_index:05d}>"


def serialize_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with a sorted, compact header: same input, same bytes, in every process."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} not supported")
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush to disk, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; FillupError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FillupError(f"{path}: no such file") from None
    except Exception as err:  # safetensors raises its own SafetensorError / OSError variants
        raise FillupError(f"{path}: not a readable safetensors file ({err}); delete it and rerun") from None
    return tensors, metadata


@dataclass
class TokenFile:
    """One class's learned token: every checkpoint and the settings that produced it."""

    class_index: int
    class_name: str
    checkpoints: dict[int, torch.Tensor]  # step -> [num_vectors, dim] float32
    n_images: int
    steps: int
    learning_rate: float
    weight_decay: float
    batch_size: int
    model_id: str
    model_revision: str
    init_word: str
    num_vectors: int
    seed: int
    resolution: int
    loss_curve: list[float] = field(default_factory=list)  # mean loss per checkpoint interval
    extra: dict = field(default_factory=dict)  # other settings (scale_lr, flip, templates, ...)

    @property
    def token_name(self) -> str:
        return token_name(self.class_index)

    @property
    def checkpoint_steps(self) -> list[int]:
        return sorted(self.checkpoints)

    def vectors(self, step: int) -> torch.Tensor:
        """The token at checkpoint ``step`` (``-1``: the last one)."""
        if step == -1:
            step = self.checkpoint_steps[-1]
        if step not in self.checkpoints:
            raise FillupError(
                f"token of class {self.class_index} ({self.class_name!r}) has no checkpoint at step {step}; "
                f"available: {self.checkpoint_steps[0]}..{self.checkpoint_steps[-1]} "
                f"every {self.checkpoint_steps[1] - self.checkpoint_steps[0] if len(self.checkpoints) > 1 else '-'}"
            )
        return self.checkpoints[step]


_META_KEYS = (
    "class_index", "class_name", "n_images", "steps", "checkpoint_steps", "learning_rate", "weight_decay",
    "batch_size", "model_id", "model_revision", "init_word", "num_vectors", "seed", "resolution", "loss_curve",
)  # fmt: skip


def _step_key(step: int) -> str:
    return f"step_{step:05d}"


def write_token_file(path: Path, token: TokenFile) -> Path:
    """Write ``token`` atomically and byte-reproducibly."""
    meta = {
        "format": FORMAT,
        "token_name": token.token_name,
        "class_index": token.class_index,
        "class_name": token.class_name,
        "n_images": token.n_images,
        "steps": token.steps,
        "checkpoint_steps": token.checkpoint_steps,
        "learning_rate": token.learning_rate,
        "weight_decay": token.weight_decay,
        "batch_size": token.batch_size,
        "model_id": token.model_id,
        "model_revision": token.model_revision,
        "init_word": token.init_word,
        "num_vectors": token.num_vectors,
        "seed": token.seed,
        "resolution": token.resolution,
        "loss_curve": token.loss_curve,
        "extra": token.extra,
    }
    tensors = {_step_key(s): v.detach().to(torch.float32).cpu() for s, v in token.checkpoints.items()}
    metadata = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
    atomic_write_bytes(Path(path), serialize_safetensors(tensors, metadata))
    return Path(path)


def read_token_file(path: Path) -> TokenFile:
    """Read a token file written by ``write_token_file``; FillupError naming what is wrong."""
    path = Path(path)
    tensors, raw = load_safetensors(path)
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise FillupError(f"{path}: metadata is not JSON ({err}); delete the file and rerun the invert stage") from None
    if meta.get("format") != FORMAT:
        raise FillupError(
            f"{path}: not a fillup token file (format {meta.get('format')!r}, expected {FORMAT!r}); "
            "for diffusers/A1111 embeddings use read_embedding"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise FillupError(f"{path}: metadata lacks {', '.join(missing)}; delete the file and rerun the invert stage")
    checkpoints = {}
    for step in meta["checkpoint_steps"]:
        key = _step_key(int(step))
        if key not in tensors:
            raise FillupError(f"{path}: checkpoint tensor {key} is missing; delete the file and rerun the invert stage")
        checkpoints[int(step)] = tensors[key]
    return TokenFile(
        class_index=int(meta["class_index"]),
        class_name=str(meta["class_name"]),
        checkpoints=checkpoints,
        n_images=int(meta["n_images"]),
        steps=int(meta["steps"]),
        learning_rate=float(meta["learning_rate"]),
        weight_decay=float(meta["weight_decay"]),
        batch_size=int(meta["batch_size"]),
        model_id=str(meta["model_id"]),
        model_revision=str(meta["model_revision"]),
        init_word=str(meta["init_word"]),
        num_vectors=int(meta["num_vectors"]),
        seed=int(meta["seed"]),
        resolution=int(meta["resolution"]),
        loss_curve=[float(x) for x in meta["loss_curve"]],
        extra=dict(meta.get("extra", {})),
    )


def is_complete(path: Path) -> bool:
    """True when ``path`` is a whole, readable token file with its final checkpoint (resume skips it)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        token = read_token_file(path)
    except FillupError:
        return False
    return bool(token.checkpoints) and token.checkpoint_steps[-1] == token.steps


def export_diffusers(token_file: Path | TokenFile, step: int, out_path: Path, token_name: str | None = None) -> Path:
    """Write checkpoint ``step`` (``-1``: last) as ``{token: tensor[num_vectors, dim]}``, the file
    ``StableDiffusionPipeline.load_textual_inversion(out_path)`` reads."""
    token = token_file if isinstance(token_file, TokenFile) else read_token_file(Path(token_file))
    name = token_name or token.token_name
    vectors = token.vectors(step).to(torch.float32).contiguous()
    atomic_write_bytes(Path(out_path), serialize_safetensors({name: vectors}))
    return Path(out_path)


def _from_mapping(data: dict, where: str) -> tuple[str | None, torch.Tensor]:
    if "string_to_param" in data:
        # A1111 (.pt: name, string_to_param {'*': tensor}, step, ...) and rinongal
        # (string_to_token, string_to_param) share the parameter layout; only A1111 names the token
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise FillupError(f"{where}: string_to_param is empty")
        vec = params.get("*", next(iter(params.values())))
        name = data.get("name") if isinstance(data.get("name"), str) else None
        return name, vec
    if "emb_params" in data:  # A1111 safetensors
        return None, data["emb_params"]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {token: tensor}
        name, vec = next(iter(tensors.items()))
        return name, vec
    raise FillupError(
        f"{where}: not a textual inversion embedding (expected a diffusers file with one tensor, "
        f"an A1111 file with string_to_param, or a rinongal file); keys: {sorted(data)[:8]}"
    )


def read_embedding(path: Path, step: int = -1) -> tuple[str | None, torch.Tensor]:
    """(token name or None, vectors ``[num_vectors, dim]`` float32) from a diffusers, A1111,
    rinongal or fillup token file. ``.pt``/``.bin`` are read with ``weights_only=True`` only."""
    path = Path(path)
    if not path.is_file():
        raise FillupError(f"{path}: no such embedding file")
    if path.suffix == ".safetensors":
        tensors, meta = load_safetensors(path)
        if meta.get("format") == json.dumps(FORMAT):
            token = read_token_file(path)
            return token.token_name, token.vectors(step).to(torch.float32)
        nested: dict = dict(tensors)
        flat_params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("string_to_param.")}
        if flat_params:
            nested = {"string_to_param": flat_params}
        name, vec = _from_mapping(nested, str(path))
    elif path.suffix in (".pt", ".bin", ".ckpt"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise FillupError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({err}); "
                "convert it to safetensors (arbitrary pickles are not loaded)"
            ) from None
        if isinstance(data, torch.Tensor):
            name, vec = None, data
        elif isinstance(data, dict):
            name, vec = _from_mapping(data, str(path))
        else:
            raise FillupError(f"{path}: unexpected content {type(data).__name__}")
    else:
        raise FillupError(f"{path}: unknown embedding file type {path.suffix!r}; use .safetensors, .pt or .bin")
    vec = vec.detach().to(torch.float32)
    if vec.ndim == 1:
        vec = vec[None]
    if vec.ndim != 2:
        raise FillupError(f"{path}: embedding has shape {tuple(vec.shape)}, expected [num_vectors, dim]")
    return name, vec


def losses_to_curve(losses: list[float], checkpoint_steps: list[int]) -> list[float]:
    """Mean loss over each checkpoint interval (step ``s`` is ``losses[s - 1]``)."""
    curve, start = [], 0
    for end in checkpoint_steps:
        chunk = losses[start:end]
        curve.append(float(np.mean(chunk)) if chunk else float("nan"))
        start = end
    return curve
