"""Stage 2, plan: how many synthetic images each class gets, their seeds and token checkpoints,
and a deterministic class-mixed assignment of every sample to a shard.

Everything here is a pure function of the recipe and the index, so a relaunched build (or another
machine) computes the same plan and the same shard contents.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fillup_data.index import SourceIndex
from fillup_data.recipe import Recipe
from fillup_data.schema.groups import GROUPS, group_of
from fillup_data.sources import SourceItem

_ORIGIN_CODE = {"real": 0, "synthetic": 1}
_SPLIT_CODE = {"train": 0, "test": 1}


def synthetic_counts(real: list[int], policy: str, target: int | None) -> list[int]:
    """Fill policies of the paper's figure 4."""
    if policy == "fill_to":
        return [max(0, int(target) - n) for n in real]
    if policy == "addon":
        return [int(target) for _ in real]
    if policy == "fill_to_max":
        top = max(real, default=0)
        return [top - n for n in real]
    raise ValueError(f"unknown fill policy {policy!r}")


def sample_seed(recipe_seed: int, class_index: int, ordinal: int) -> int:
    """A stable 31-bit seed per synthetic sample, independent of shard layout and batch size."""
    digest = hashlib.blake2b(f"fillup/{recipe_seed}/{class_index}/{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def sample_key(split: str, origin: str, class_index: int, ordinal: int) -> str:
    # webdataset ends a key at the first dot: none here
    return f"{split}-{origin}-{class_index:05d}-{ordinal:06d}"


@dataclass(frozen=True)
class ClassPlan:
    index: int
    name: str
    real: int
    test: int
    synthetic: int
    group: str
    token_steps: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.real + self.synthetic


@dataclass(frozen=True)
class RealSample:
    key: str
    item: SourceItem


@dataclass(frozen=True)
class SyntheticSample:
    key: str
    class_index: int
    ordinal: int
    seed: int
    token_step: int  # -1 where the strategy uses no learned token


class _RealSpace:
    """The real samples of one split, made on demand: the k-th item of a class is its ordinal k."""

    def __init__(self, split: str, items: list[SourceItem]):
        self.split, self.items = split, items
        labels = np.fromiter((it.label for it in items), dtype=np.int64, count=len(items))
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
        self.ordinals = np.empty(len(items), dtype=np.int64)
        self.ordinals[order] = np.arange(len(items)) - starts

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, p: int) -> "RealSample":
        it = self.items[p]
        return RealSample(sample_key(self.split, "real", it.label, int(self.ordinals[p])), it)


class _SyntheticSpace:
    """Every synthetic sample of a plan, class by class, made on demand from its position: a plan at
    iNaturalist's size (8M samples) holds two integer arrays, not 8M objects."""

    def __init__(self, classes: list["ClassPlan"], recipe_seed: int):
        self.classes, self.recipe_seed = classes, recipe_seed
        self.starts = np.cumsum([0] + [c.synthetic for c in classes])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def sample(self, p: int) -> "SyntheticSample":
        c = int(np.searchsorted(self.starts, p, side="right")) - 1
        cp, k = self.classes[c], p - int(self.starts[c])
        # paper B.3: all checkpoints are used, evenly (round-robin over the class's samples)
        step = cp.token_steps[k % len(cp.token_steps)] if cp.token_steps else -1
        return SyntheticSample(sample_key("train", "synthetic", cp.index, k), cp.index, k,
                               sample_seed(self.recipe_seed, cp.index, k), step)


class ShardSamples(Sequence):
    """A shard's samples in shard order, made one at a time from their positions in the plan's sample space."""

    def __init__(self, space, positions: np.ndarray):
        self.space, self.positions = space, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.space.sample(int(p)) for p in self.positions[i]]
        return self.space.sample(int(self.positions[i]))

    def __iter__(self):
        for p in self.positions:
            yield self.space.sample(int(p))

    def __reduce__(self):
        # a shard sent to another process carries its own samples, not the whole sample space
        return (list, (list(self),))


@dataclass
class ShardPlan:
    split: str
    origin: str
    index: int
    samples: Sequence = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.origin}-{self.index:05d}"

    @property
    def path(self) -> str:
        return f"data/{self.name}.tar"


@dataclass
class Plan:
    classes: list[ClassPlan]
    shards: list[ShardPlan]
    strategy: str
    #: per split and origin ("train-synthetic"): the multiple its shard count was made of (recorded in the manifest)
    shard_multiples: dict[str, int] = field(default_factory=dict)

    @property
    def imbalance_factor(self) -> float:
        real = [c.real for c in self.classes]
        return max(real) / min(real) if real and min(real) > 0 else float("inf")

    @property
    def num_synthetic(self) -> int:
        return sum(c.synthetic for c in self.classes)

    def group_table(self) -> list[dict]:
        rows = []
        for g in GROUPS + ("all",):
            cs = [c for c in self.classes if g == "all" or c.group == g]
            rows.append(
                {"group": g, "classes": len(cs), "real": sum(c.real for c in cs),
                 "synthetic": sum(c.synthetic for c in cs), "total": sum(c.total for c in cs),
                 "test": sum(c.test for c in cs)}
            )
        return rows

    def shards_of(self, split: str, origin: str) -> list[ShardPlan]:
        return [s for s in self.shards if s.split == split and s.origin == origin]


#: the multiples ``shards.num_shards_multiple_of: auto`` tries, largest first: 64 divides the usual
#: ranks x DataLoader workers (8 x 4, 16 x 4, 64 x 1), 8 the GPUs of one node
AUTO_SHARD_MULTIPLES = (64, 8)


def shard_count(n: int, max_samples: int, multiple) -> tuple[int, int]:
    """(shards, the multiple used) for ``n`` samples of at most ``max_samples`` per shard. ``auto``: the largest
    of ``AUTO_SHARD_MULTIPLES`` that keeps shards at least half full, else none (1): a small split is not cut
    into slivers for the sake of a multiple."""
    base = math.ceil(n / max_samples)
    if multiple != "auto":
        return min(n, math.ceil(base / multiple) * multiple), int(multiple)
    for m in AUTO_SHARD_MULTIPLES:
        count = math.ceil(base / m) * m
        if n / count >= max_samples / 2:
            return count, m
    return base, 1


def _cut(space, split: str, origin: str, seed: int, max_samples: int, multiple, multiples: dict) -> list[ShardPlan]:
    """Global seeded permutation cut into near-equal shards, so every shard mixes classes."""
    n = len(space)
    if n == 0:
        return []
    count, multiples[f"{split}-{origin}"] = shard_count(n, max_samples, multiple)
    order = np.random.default_rng([seed, 7, _SPLIT_CODE[split], _ORIGIN_CODE[origin]]).permutation(n)
    shards = []
    for j in range(count):
        lo, hi = j * n // count, (j + 1) * n // count
        shards.append(ShardPlan(split, origin, j, ShardSamples(space, order[lo:hi])))
    return shards


def make_plan(recipe: Recipe, index: SourceIndex) -> Plan:
    real = index.counts("train")
    test = index.counts("test") if "test" in index.items else [0] * len(real)
    strategy = recipe.generator.strategy
    if strategy == "none":
        synth = [0] * len(real)
    else:
        synth = synthetic_counts(real, recipe.fill.policy, recipe.fill.target)
    classes = []
    for c, name in enumerate(index.class_names):
        steps = tuple(recipe.inversion.checkpoint_steps(real[c])) if strategy == "textual_inversion" else ()
        classes.append(ClassPlan(c, name, real[c], test[c], synth[c], group_of(real[c], recipe.groups), steps))

    shards: list[ShardPlan] = []
    sc = recipe.shards
    multiples: dict[str, int] = {}
    for split in ("train", "test"):
        if split not in index.items:
            continue
        shards += _cut(_RealSpace(split, index.items[split]), split, "real", recipe.seed, sc.max_samples,
                       sc.num_shards_multiple_of, multiples)
    shards += _cut(_SyntheticSpace(classes, recipe.seed), "train", "synthetic", recipe.seed, sc.max_samples,
                   sc.num_shards_multiple_of, multiples)
    return Plan(classes, shards, strategy, multiples)


def format_group_table(plan: Plan) -> str:
    rows = plan.group_table()
    head = f"{'group':<8}{'classes':>9}{'real':>11}{'synthetic':>12}{'total':>11}{'test':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["group"] == "all":
            lines.append("-" * len(head))
        lines.append(
            f"{r['group']:<8}{r['classes']:>9}{r['real']:>11,}{r['synthetic']:>12,}{r['total']:>11,}{r['test']:>9,}"
        )
    return "\n".join(lines)
