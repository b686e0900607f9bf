"""What this machine offers workers: CPUs this process may use and GPUs torch can see."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm allocation or cpuset, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_cuda_devices() -> int:
    """GPUs torch can see; 0 when torch is not installed. Imports torch: call it only when needed."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()
