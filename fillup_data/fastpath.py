"""What the GPU fast paths share: resolving ``auto`` settings, sizing passes from free memory, pinning a
resolved value once per build, the compile cache, and the record of what decides a sample's pixels.

Pixel-deciding settings (device kind, dtype, compile on/off, micro-batch rows, torch/diffusers
versions, and on CPU torch's thread count) are recorded with every synthetic shard; ``regenerate``
reuses them, and is pixel-exact only where they match (otherwise it reports the PSNR).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Callable

from fillup_data.errors import FillupError

# CPU values of ``auto``: fixed, because on CPU the micro-batch shape decides the last bits.
CPU_GENERATION_BATCH = 8
CPU_CLASSES_PER_PASS = 1
# Candidates tried from the largest down; above these throughput gains are small (GPU_BASELINE.md:
# 5.54 img/s at batch 32, 5.77 at 64; 52 class-steps/s at 32 classes per pass, 46 at 16).
GENERATION_BATCH_CANDIDATES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
CLASSES_PER_PASS_CANDIDATES = (32, 24, 16, 12, 8, 4, 2, 1)
MEMORY_HEADROOM = 0.85  # fraction of free memory a resolved size may plan to use


def compile_enabled(setting, device) -> bool:
    """``auto`` = on for CUDA devices, off elsewhere; true/false as given."""
    if setting == "auto":
        return str(device).startswith("cuda")
    return bool(setting)


def configure_compile_cache() -> Path | None:
    """Keep inductor's caches between runs and workers: ``$FILLUP_CACHE/inductor`` (or
    ``~/.cache/fillup-data/inductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` is already set. On a cluster,
    point ``FILLUP_CACHE`` at a shared filesystem so a worker reuses what another compiled."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    from fillup_data.cache import cache_dir

    path = cache_dir("inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def largest_fitting(candidates, peak_of: Callable[[int], int], free_bytes: int,
                    headroom: float = MEMORY_HEADROOM) -> int:
    """The largest candidate whose predicted peak memory fits ``headroom * free_bytes``.

    ``peak_of(n)`` measures the peak bytes of one pass of ``n`` rows; it is called for 1 and 2 rows
    and the peak extrapolated linearly (per-row activations grow linearly; the fixed part is the
    weights and workspace). Returns 1 when even one row does not fit the budget (it may still run)."""
    p1, p2 = int(peak_of(1)), int(peak_of(2))
    per_row = max(p2 - p1, 1)
    fixed = max(p1 - per_row, 0)
    budget = headroom * free_bytes
    for n in sorted(candidates, reverse=True):
        if fixed + per_row * n <= budget:
            return int(n)
    return 1


def cuda_free_bytes(device) -> int:
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def cuda_peak_of(device, run: Callable[[int], None]) -> Callable[[int], int]:
    """``peak_of`` for ``largest_fitting``: the peak memory allocated while ``run(n)`` executes,
    relative to what was allocated before (the model's weights are already counted as not free)."""
    import torch

    def peak_of(n: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(n)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)

    return peak_of


def pinned_path(out: Path, name: str) -> Path:
    return Path(out) / ".fillup" / "pinned" / f"{name}.json"


def pin_setting(out: Path | None, name: str, resolve: Callable[[], int]) -> int:
    """The build's one value of an ``auto`` setting: the first worker to need it resolves it and
    writes ``.fillup/pinned/<name>.json`` (O_EXCL); every later worker, resume and rank reads it, so
    a build's bytes do not depend on which machine resolved first or on free memory at the time.
    ``out=None`` (preview, benchmarks) resolves without pinning."""
    if out is None:
        return int(resolve())
    path = pinned_path(out, name)
    if not path.is_file():
        value = int(resolve())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"name": name, "value": value, "resolved_on": device_description()}))
        try:
            os.link(tmp, path)  # atomic create-if-absent: a concurrent winner keeps its value
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        value = json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FillupError(f"{path}: unreadable pinned setting ({err}); delete it to resolve {name} again") from err
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FillupError(f"{path}: pinned {name} must be a positive integer, got {value!r}")
    return value


def device_description(device=None) -> str:
    """``cuda:NVIDIA H100 80GB HBM3`` or ``cpu:x86_64`` (the device kind that decides kernels)."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    if device is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.machine()}"


def pixel_setup(device, dtype, compiled: bool, micro_batch: int) -> dict:
    """What decides a synthetic image's pixels besides its metadata, recorded per synthetic shard."""
    import diffusers
    import torch

    cpu = not str(device).startswith("cuda")
    return {
        "device": device_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": bool(compiled),
        "micro_batch": int(micro_batch),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        # on CPU, the number of intra-op threads changes reduction order and so the last bits
        "cpu_threads": torch.get_num_threads() if cpu else None,
    }


def setup_differences(recorded: dict, current: dict) -> list[str]:
    """The pixel-deciding fields that differ, as ``field: recorded -> current``."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys if recorded.get(k) != current.get(k)]
