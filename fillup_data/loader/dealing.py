"""Dealing shards to ranks and DataLoader workers so that sample counts balance, and each reader's quota."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from fillup_data.loader.build import ShardRef


@dataclass(frozen=True)
class ReadPart:
    """A reader's share of one shard: the samples ``i`` with ``i % stride == offset``, ``i`` counting the
    samples the shard's filter keeps (all of them without a filter)."""

    shard: ShardRef
    stride: int = 1
    offset: int = 0

    @property
    def num_samples(self) -> int:
        return len(range(self.offset, self.shard.num_kept, self.stride))


def deal(parts: list[ReadPart], n: int) -> list[list[ReadPart]]:
    """Split parts among ``n`` readers: whole shards balanced by sample count when there are enough,
    otherwise every reader takes every n-th sample of every part."""
    if n == 1:
        return [list(parts)]
    if len(parts) >= n:
        bins: list[list[ReadPart]] = [[] for _ in range(n)]
        load = [0] * n
        # Largest first onto the least-loaded reader; the stable sort keeps the epoch's shuffled
        # order among equal sizes, so which reader gets which shard changes every epoch.
        for p in sorted(parts, key=lambda p: -p.num_samples):
            i = min(range(n), key=lambda j: (load[j], j))
            bins[i].append(p)
            load[i] += p.num_samples
        return bins
    return [
        [ReadPart(p.shard, p.stride * n, p.offset + r * p.stride) for p in parts] for r in range(n)
    ]


def split_quota(total: int, weights: list[int]) -> list[int]:
    """Integer split of ``total`` proportional to ``weights`` (largest remainders), summing to ``total``."""
    s = sum(weights)
    if s == 0:
        return [total // len(weights) + (i < total % len(weights)) for i in range(len(weights))]
    raw = [total * w / s for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(weights)), key=lambda i: -(raw[i] - out[i]))[: total - sum(out)]:
        out[i] += 1
    return out


def derived_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")
