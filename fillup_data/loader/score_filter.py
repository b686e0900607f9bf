"""Keeping the synthetic samples whose quality scores pass a filter (issue 13).

``fillup-data score OUT`` stores every sample's scores as columns of ``index.parquet`` and leaves the
shards as they are, so users choose their own filter and see what it costs.  The kept key set is a pure
function of ``index.parquet`` and the filter (:func:`select_synthetic`), computed once when a run opens
its data; the loader still streams whole shards but yields only kept samples, and deals shards and sets
each reader's quota with the *kept* counts, so DDP ranks still take equal steps.

Real samples are always kept.  A NaN ``clip_score`` or ``class_confidence`` (unknown) never reaches a
minimum; a NaN ``real_similarity`` (the class has no real image to copy) passes the maximum.  The top-k cut
comes after the thresholds (the K best *surviving* samples of each class by ``clip_score``, ties broken by
key, NaN last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fillup_data.errors import FillupError
from fillup_data.schema.groups import GROUPS
from fillup_data.schema.scores import SCORE_BY_NAME
from fillup_data.shards.writer import sha256_file

# the columns `fillup-data score` adds to index.parquet (fillup_data.schema.scores)
CLIP_SCORE, CLASS_CONFIDENCE, REAL_SIMILARITY = (SCORE_BY_NAME[n].name for n in
                                                 ("clip_score", "class_confidence", "real_similarity"))


class SampleFilter(BaseModel):
    """Which synthetic samples a run keeps; every field None (the default) keeps them all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_clip_score: float | None = Field(
        None, allow_inf_nan=False, description="keep synthetic samples with clip_score >= this")
    max_real_similarity: float | None = Field(
        None, allow_inf_nan=False, description="drop near-copies: keep real_similarity <= this")
    min_class_confidence: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False, description="keep class_confidence >= this (needs a classifier score)")
    top_k_per_class: int | None = Field(
        None, ge=1, description="then keep the K best of each class by clip_score (ties: by key)")

    @property
    def active(self) -> bool:
        return any(v is not None for v in self.model_dump().values())

    def columns(self) -> list[str]:
        """The score columns this filter reads."""
        need = []
        if self.min_clip_score is not None or self.top_k_per_class is not None:
            need.append(CLIP_SCORE)
        if self.max_real_similarity is not None:
            need.append(REAL_SIMILARITY)
        if self.min_class_confidence is not None:
            need.append(CLASS_CONFIDENCE)
        return need

    def describe(self) -> str:
        parts = []
        if self.min_clip_score is not None:
            parts.append(f"{CLIP_SCORE} >= {self.min_clip_score:g}")
        if self.max_real_similarity is not None:
            parts.append(f"{REAL_SIMILARITY} <= {self.max_real_similarity:g}")
        if self.min_class_confidence is not None:
            parts.append(f"{CLASS_CONFIDENCE} >= {self.min_class_confidence:g}")
        if self.top_k_per_class is not None:
            parts.append(f"top {self.top_k_per_class} per class by {CLIP_SCORE}")
        return ", ".join(parts) or "no filter"


@dataclass(frozen=True)
class Selection:
    """What a filter kept of one build's synthetic training samples."""

    sample_filter: SampleFilter
    index_sha256: str
    kept: dict[str, frozenset[str]]  # shard path -> kept keys (every synthetic training shard listed)
    kept_per_class: dict[int, int]
    dropped_per_class: dict[int, int]

    @property
    def num_kept(self) -> int:
        return sum(self.kept_per_class.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped_per_class.values())

    def by_group(self, groups: list[str]) -> dict[str, dict[str, int]]:
        """Kept and dropped synthetic samples per many/medium/few group (``groups[c]``: class c's group)."""
        out = {g: {"kept": 0, "dropped": 0} for g in GROUPS}
        for c, n in self.kept_per_class.items():
            out[groups[c]]["kept"] += n
        for c, n in self.dropped_per_class.items():
            out[groups[c]]["dropped"] += n
        return out

    def record(self, groups: list[str]) -> dict[str, Any]:
        """What a run stores: the filter, the index it was applied to, and what it kept and dropped."""
        classes = sorted(set(self.kept_per_class) | set(self.dropped_per_class))
        return {
            "filter": self.sample_filter.model_dump(mode="json"),
            "index_sha256": self.index_sha256,
            "kept": self.num_kept,
            "dropped": self.num_dropped,
            "by_group": self.by_group(groups),
            "by_class": {str(c): {"kept": self.kept_per_class.get(c, 0), "dropped": self.dropped_per_class.get(c, 0)}
                         for c in classes},
        }

    def summary(self, groups: list[str]) -> str:
        total = self.num_kept + self.num_dropped
        per = ", ".join(f"{g} {v['kept']}/{v['kept'] + v['dropped']}" for g, v in self.by_group(groups).items())
        return (f"score filter ({self.sample_filter.describe()}): kept {self.num_kept} of {total} synthetic "
                f"samples ({per})")


def select_synthetic(rows: dict[str, list], sample_filter: SampleFilter) -> tuple[dict[str, set[str]], dict, dict]:
    """The pure selection: ``rows`` holds the columns ``key``, ``shard``, ``label`` and the filter's score
    columns of the synthetic training samples.  Returns kept keys per shard, kept and dropped per class."""
    f = sample_filter
    n = len(rows["key"])

    def passes(i: int) -> bool:
        # an unknown (NaN) clip score or confidence never reaches a minimum; an unknown real similarity
        # (`score` writes NaN when the class has no real training image) is no near-copy: it passes
        if f.min_clip_score is not None and not rows[CLIP_SCORE][i] >= f.min_clip_score:
            return False
        if f.max_real_similarity is not None and rows[REAL_SIMILARITY][i] > f.max_real_similarity:
            return False
        if f.min_class_confidence is not None and not rows[CLASS_CONFIDENCE][i] >= f.min_class_confidence:
            return False
        return True

    survivors = [i for i in range(n) if passes(i)]
    if f.top_k_per_class is not None:
        by_class: dict[int, list[int]] = {}
        for i in survivors:
            by_class.setdefault(rows["label"][i], []).append(i)

        def rank(i: int) -> tuple:
            s = rows[CLIP_SCORE][i]
            nan = math.isnan(s)
            return (nan, 0.0 if nan else -s, rows["key"][i])  # best first, NaN last, ties by key

        survivors = sorted(i for ids in by_class.values() for i in sorted(ids, key=rank)[: f.top_k_per_class])
    kept_rows = set(survivors)
    kept: dict[str, set[str]] = {}
    kept_per_class: dict[int, int] = {}
    dropped_per_class: dict[int, int] = {}
    for i in range(n):
        label = rows["label"][i]
        kept.setdefault(rows["shard"][i], set())
        if i in kept_rows:
            kept[rows["shard"][i]].add(rows["key"][i])
            kept_per_class[label] = kept_per_class.get(label, 0) + 1
        else:
            dropped_per_class[label] = dropped_per_class.get(label, 0) + 1
    return kept, kept_per_class, dropped_per_class


def read_synthetic_scores(path: Path, where: str, columns: list[str]) -> dict[str, list]:
    """The synthetic training rows of ``index.parquet`` with ``columns``; errors say what to run."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        present = set(pq.read_schema(path).names)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged or foreign file
        raise FillupError(f"{where}: not a readable parquet file ({err}); re-download or rebuild the build") from None
    base = ["key", "shard", "split", "label", "is_synthetic"]
    missing = [c for c in base if c not in present]
    if missing:
        raise FillupError(f"{where}: no column {missing[0]}; this is not a fillup-data index: rebuild the build")
    for col in columns:
        if col not in present:
            raise FillupError(f"{where} has no column {col}: run `fillup-data score OUT` first")
    table = pq.read_table(path, columns=base + columns)
    table = table.filter(pc.and_(table["is_synthetic"], pc.equal(table["split"], "train")))
    rows = {c: table[c].to_pylist() for c in ["key", "shard", "label"]}
    for col in columns:
        values = rows[col] = [math.nan if v is None else float(v) for v in table[col].to_pylist()]  # null: not scored
        if values and all(math.isnan(v) for v in values):
            hint = (" (the build was scored without a classifier): score it with one, or drop "
                    "min_class_confidence" if col == CLASS_CONFIDENCE else ": run `fillup-data score OUT` again")
            raise FillupError(f"{where}: column {col} is NaN for every synthetic sample{hint}")
    return rows


def select(path: Path, where: str, sample_filter: SampleFilter, synthetic_shards: dict[str, int],
           num_classes: int) -> Selection:
    """Apply ``sample_filter`` to the build's ``index.parquet`` at ``path``.  ``synthetic_shards`` (path ->
    sample count, from the manifest) and the class count must agree with the index, or the kept keys would
    be another build's."""
    rows = read_synthetic_scores(path, where, sample_filter.columns())
    bad = next((c for c in rows["label"] if not isinstance(c, int) or not 0 <= c < num_classes), None)
    if bad is not None:
        raise FillupError(f"{where}: a synthetic sample of class {bad!r}, outside 0..{num_classes - 1}; the index "
                          "is not this build's: re-download the build or rebuild it")
    counts: dict[str, int] = {}
    for shard in rows["shard"]:
        counts[shard] = counts.get(shard, 0) + 1
    for shard, n in sorted(set(synthetic_shards.items()) ^ set(counts.items())):
        raise FillupError(
            f"{where}: lists {counts.get(shard, 0)} synthetic training samples in {shard}, the manifest "
            f"{synthetic_shards.get(shard, 0)}; the index is not this build's: re-download the build or rebuild it"
        )
    kept, kept_per_class, dropped_per_class = select_synthetic(rows, sample_filter)
    return Selection(sample_filter, sha256_file(path), {s: frozenset(k) for s, k in kept.items()},
                     kept_per_class, dropped_per_class)
