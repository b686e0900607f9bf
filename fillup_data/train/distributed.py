"""torchrun / DDP set-up: one process per device, NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fillup_data.errors import FillupError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FillupError("--device cuda: no CUDA device is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise FillupError(f"--device {name!r}: allowed auto, cpu, cuda")


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; a plain ``python`` launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, dev)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (a no-op for a world of one); gloo reduces on CPU, NCCL on the device."""
    if not env.distributed:
        return t
    work = t.to(env.device) if env.device.type == "cuda" else t.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv, ok: bool = True) -> None:
    """Leave together: a rank that tears down gloo while its peer is still in a collective aborts the
    peer ("terminate called without an active exception"), so on success every rank meets at a barrier
    first. After an error there is no barrier: the peers may never reach it."""
    if env.distributed and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
