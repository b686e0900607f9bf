"""Token files: every checkpoint of one class's learned token, plus how it was learned.

``tokens/{class_index:05d}.safetensors`` holds tensors ``step_00100`` ... (``[num_vectors, dim]``
float32) and string metadata whose values are JSON. Files are written byte-reproducibly (the
safetensors library orders metadata keys at random, so the header is serialized here with sorted
keys) and atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fillup_data.errors import FillupError
from fillup_data.inversion.completion import FORMAT, META_TYPES, is_complete, step_key  # noqa: F401  (is_complete: header only)
from fillup_data.state import write_bytes_durably

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
                f"available steps: {describe_steps(self.checkpoint_steps)}"
            )
        return self.checkpoints[step]


def describe_steps(steps: list[int]) -> str:
    """``100, 200, 300`` or, for many, ``100, 200, ..., 9900, 10000 (100 checkpoints)``."""
    if len(steps) <= 8:
        return ", ".join(str(s) for s in steps)
    return f"{steps[0]}, {steps[1]}, ..., {steps[-2]}, {steps[-1]} ({len(steps)} checkpoints)"


_META_KEYS = tuple(META_TYPES)


def _step_key(step: int) -> str:
    return step_key(step)


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
    write_bytes_durably(Path(path), serialize_safetensors(tensors, metadata))
    return Path(path)


_RERUN = "delete the file and rerun the invert stage"


def _meta_value(meta: dict, key: str, kind: type, path: Path):
    """``meta[key]`` if it has the type ``kind`` (an int passes as a float), else a FillupError naming the field."""
    value = meta[key]
    if kind is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    if not ok:
        raise FillupError(f"{path}: metadata field {key} is {value!r}, expected {kind.__name__}; {_RERUN}")
    return kind(value)


def check_vectors(vec: object, where: str, num_vectors: int | None = None, dim: int | None = None) -> torch.Tensor:
    """A token's vectors as ``[num_vectors, dim]`` float32, or a FillupError naming ``where`` and the problem.

    ``dim`` is the text encoder's embedding width: a token learned on another model does not fit."""
    if not isinstance(vec, torch.Tensor):
        raise FillupError(f"{where}: expected a tensor of token vectors, got {type(vec).__name__}")
    if not (vec.is_floating_point() and vec.ndim == 2 and vec.shape[0] >= 1 and vec.shape[1] >= 1):
        raise FillupError(
            f"{where}: token vectors have shape {list(vec.shape)} and dtype {str(vec.dtype).removeprefix('torch.')}; "
            "expected a float tensor [num_vectors, dim]"
        )
    if num_vectors is not None and vec.shape[0] != num_vectors:
        raise FillupError(f"{where}: {vec.shape[0]} token vectors, but the file says num_vectors = {num_vectors}")
    if dim is not None and vec.shape[1] != dim:
        raise FillupError(
            f"{where}: token vectors have dimension {vec.shape[1]} but the text encoder has {dim}; "
            "the token was learned on another model"
        )
    return vec.detach().to(torch.float32)


def read_token_file(path: Path, dim: int | None = None) -> TokenFile:
    """Read a token file written by ``write_token_file``; FillupError naming the file and what is wrong.

    ``dim``: the text encoder's embedding width, checked against every checkpoint when given."""
    path = Path(path)
    tensors, raw = load_safetensors(path)
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise FillupError(f"{path}: metadata is not JSON ({err}); {_RERUN}") from None
    if meta.get("format") != FORMAT:
        raise FillupError(
            f"{path}: not a fillup token file (format {meta.get('format')!r}, expected {FORMAT!r}; "
            f"tensors: {', '.join(sorted(tensors)[:5]) or 'none'}); for diffusers/A1111 embeddings use read_embedding"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise FillupError(f"{path}: metadata lacks {', '.join(missing)}; {_RERUN}")
    steps = meta["checkpoint_steps"]
    if not (isinstance(steps, list) and steps and all(isinstance(s, int) and not isinstance(s, bool) for s in steps)):
        raise FillupError(f"{path}: metadata field checkpoint_steps is {steps!r}, expected a list of steps; {_RERUN}")
    num_vectors = _meta_value(meta, "num_vectors", int, path)
    checkpoints: dict[int, torch.Tensor] = {}
    for step in steps:
        key = _step_key(step)
        if key not in tensors:
            raise FillupError(f"{path}: checkpoint tensor {key} is missing; {_RERUN}")
        vec = check_vectors(tensors[key], f"{path}: checkpoint {key}", num_vectors, dim)
        if checkpoints and vec.shape != next(iter(checkpoints.values())).shape:
            raise FillupError(f"{path}: checkpoint {key} has shape {list(vec.shape)}, unlike the others; {_RERUN}")
        checkpoints[step] = vec
    curve, extra = meta["loss_curve"], meta.get("extra", {})
    if not (isinstance(curve, list) and all(isinstance(x, (int, float)) for x in curve)):
        raise FillupError(f"{path}: metadata field loss_curve is {curve!r}, expected a list of numbers; {_RERUN}")
    if not isinstance(extra, dict):
        raise FillupError(f"{path}: metadata field extra is {extra!r}, expected a mapping; {_RERUN}")
    return TokenFile(
        class_index=_meta_value(meta, "class_index", int, path),
        class_name=_meta_value(meta, "class_name", str, path),
        checkpoints=checkpoints,
        n_images=_meta_value(meta, "n_images", int, path),
        steps=_meta_value(meta, "steps", int, path),
        learning_rate=_meta_value(meta, "learning_rate", float, path),
        weight_decay=_meta_value(meta, "weight_decay", float, path),
        batch_size=_meta_value(meta, "batch_size", int, path),
        model_id=_meta_value(meta, "model_id", str, path),
        model_revision=_meta_value(meta, "model_revision", str, path),
        init_word=_meta_value(meta, "init_word", str, path),
        num_vectors=num_vectors,
        seed=_meta_value(meta, "seed", int, path),
        resolution=_meta_value(meta, "resolution", int, path),
        loss_curve=[float(x) for x in curve],
        extra=dict(extra),
    )


def export_diffusers(token_file: Path | TokenFile, step: int, out_path: Path, token_name: str | None = None) -> Path:
    """Write checkpoint ``step`` (``-1``: last) as ``{token: tensor[num_vectors, dim]}``, the file
    ``StableDiffusionPipeline.load_textual_inversion(out_path)`` reads (A1111 reads it too, as a
    one-tensor "diffusers concept" named after the file)."""
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise FillupError(
            f"{out_path}: token files are written as .safetensors only (diffusers and A1111 read them); "
            "pickled .pt/.bin files are not written"
        )
    token = token_file if isinstance(token_file, TokenFile) else read_token_file(Path(token_file))
    name = token_name or token.token_name
    vectors = token.vectors(step).to(torch.float32).contiguous()
    write_bytes_durably(out_path, serialize_safetensors({name: vectors}))
    return out_path


# The one class a rinongal/textual_inversion file holds besides tensors and dicts: its
# EmbeddingManager.save() pickles ``string_to_param`` as an nn.ParameterDict.
_PICKLED_CLASSES = {"torch.nn.modules.container.ParameterDict": torch.nn.ParameterDict}


def _load_pickled_embedding(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``, allowing nn.ParameterDict and nothing else."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (legacy or damaged): the restricted load below decides
        found = []
    other = sorted(set(found) - set(_PICKLED_CLASSES))
    if other:
        raise FillupError(
            f"{path}: holds Python objects that no embedding file contains ({', '.join(other[:5])}); "
            "refusing to unpickle it (only tensors, dicts and nn.ParameterDict are read, with "
            "torch.load weights_only=True). Convert the embedding to safetensors where it was made."
        )
    try:
        with torch.serialization.safe_globals(list(_PICKLED_CLASSES.values())):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FillupError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({first_line}); "
            "the file is damaged, or holds more than tensors: convert it to safetensors (arbitrary pickles are not loaded)"
        ) from None


def _string_to_param(params: object, where: str) -> torch.Tensor:
    """The one placeholder's vectors from A1111's dict or rinongal's nn.ParameterDict."""
    if isinstance(params, torch.nn.ParameterDict):
        # Read the parameters themselves, as A1111 does: a ParameterDict pickled by torch < 1.13
        # has no ``_keys`` and its mapping methods fail in newer torch.
        params = params.__dict__.get("_parameters")
    if not isinstance(params, dict) or not params:
        raise FillupError(f"{where}: string_to_param is empty or not a mapping; the embedding holds no vectors")
    if "*" in params:
        return params["*"]
    if len(params) == 1:
        return next(iter(params.values()))
    raise FillupError(
        f"{where}: string_to_param holds {len(params)} placeholders ({', '.join(map(str, list(params)[:8]))}) "
        "and none is '*'; export the one you want on its own"
    )


def _from_mapping(data: dict, where: str) -> tuple[str | None, object]:
    if "string_to_param" in data:
        # A1111 (.pt: name, string_to_token, string_to_param {'*': tensor}, step, sd_checkpoint, ...) and
        # rinongal (string_to_token, string_to_param as nn.ParameterDict); only A1111 names the token
        name = data.get("name") if isinstance(data.get("name"), str) else None
        return name, _string_to_param(data["string_to_param"], where)
    if "emb_params" in data:  # kohya sd-scripts safetensors, which A1111 reads too
        return None, data["emb_params"]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1 and len(data) == 1:  # diffusers: {token: tensor}
        name, vec = next(iter(tensors.items()))
        return str(name), vec
    raise FillupError(
        f"{where}: not a textual inversion embedding (expected a diffusers file with one tensor, an A1111 "
        f"or rinongal file with string_to_param, or emb_params; SDXL clip_l/clip_g files are not supported); "
        f"keys: {', '.join(map(str, sorted(data, key=str)[:8])) or 'none'}"
    )


def read_embedding(path: Path, step: int = -1, dim: int | None = None) -> tuple[str | None, torch.Tensor]:
    """(token name or None, vectors ``[num_vectors, dim]`` float32) from a diffusers, A1111,
    rinongal or fillup token file; FillupError naming the file and what is wrong.

    ``.pt``/``.bin``/``.ckpt`` are read with ``weights_only=True``, allowing only nn.ParameterDict
    besides tensors and containers. ``dim``: the text encoder's embedding width, checked when given."""
    path = Path(path)
    if not path.is_file():
        raise FillupError(f"{path}: no such embedding file")
    if path.suffix == ".safetensors":
        tensors, meta = load_safetensors(path)
        if meta.get("format") == json.dumps(FORMAT):
            token = read_token_file(path, dim)
            return token.token_name, token.vectors(step)
        nested: dict = dict(tensors)
        flat_params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("string_to_param.")}
        if flat_params:
            nested = {"string_to_param": flat_params}
        name, vec = _from_mapping(nested, str(path))
    elif path.suffix in (".pt", ".bin", ".ckpt"):
        data = _load_pickled_embedding(path)
        if isinstance(data, torch.Tensor):
            name, vec = None, data
        elif isinstance(data, dict):
            name, vec = _from_mapping(data, str(path))
        else:
            raise FillupError(f"{path}: holds a {type(data).__name__}, not a textual inversion embedding")
    else:
        raise FillupError(f"{path}: unknown embedding file type {path.suffix!r}; use .safetensors, .pt or .bin")
    if isinstance(vec, torch.Tensor) and vec.ndim == 1:
        vec = vec[None]
    return name, check_vectors(vec, str(path), dim=dim)


def losses_to_curve(losses: list[float], checkpoint_steps: list[int]) -> list[float]:
    """Mean loss over each checkpoint interval (step ``s`` is ``losses[s - 1]``)."""
    curve, start = [], 0
    for end in checkpoint_steps:
        chunk = losses[start:end]
        curve.append(float(np.mean(chunk)) if chunk else float("nan"))
        start = end
    return curve
