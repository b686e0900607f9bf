"""Whether a token file is finished, read from its header alone (no torch, no tensor data).

``status``, the build's overall progress line and every worker's "is this group done?" ask it for every
class: 8,142 times at iNaturalist's size, where reading whole token files (100 checkpoints each) is
gigabytes. The header says everything ``read_token_file`` checks but the values: the metadata and its
types, every checkpoint's tensor with a float dtype and one [num_vectors, dim] shape, and where the data
ends (a truncated file does not end there).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

FORMAT = "fillup-token-v1"
META_TYPES = {
    "class_index": int, "class_name": str, "n_images": int, "steps": int, "checkpoint_steps": list,
    "learning_rate": float, "weight_decay": float, "batch_size": int, "model_id": str, "model_revision": str,
    "init_word": str, "num_vectors": int, "seed": int, "resolution": int, "loss_curve": list,
}  # fmt: skip
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER = 64 << 20


def step_key(step: int) -> str:
    return f"step_{step:05d}"


def _typed(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def is_complete(path: Path) -> bool:
    """True when ``path`` is a whole, well-formed fillup token file holding its final checkpoint."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                return False
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
        meta = {k: json.loads(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        if meta.get("format") != FORMAT or not all(k in meta and _typed(meta[k], t) for k, t in META_TYPES.items()):
            return False
        steps = meta["checkpoint_steps"]
        if not steps or not all(_typed(s, int) for s in steps) or max(steps) != meta["steps"]:
            return False
        if not all(_typed(x, float) for x in meta["loss_curve"]) or not isinstance(meta.get("extra", {}), dict):
            return False
        shapes = set()
        for s in steps:
            t = header[step_key(s)]
            shape, (start, end) = t["shape"], t["data_offsets"]
            if t["dtype"] not in FLOAT_DTYPES or len(shape) != 2 or shape[0] != meta["num_vectors"] or min(shape) < 1:
                return False
            if end - start != math.prod(shape) * FLOAT_DTYPES[t["dtype"]]:
                return False
            shapes.add(tuple(shape))
        end = max(int(t["data_offsets"][1]) for t in header.values())
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, AttributeError):
        return False
    return len(shapes) == 1 and size == 8 + n + end
