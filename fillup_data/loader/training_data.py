"""What a training run reads: real shards from one build, synthetic shards from another (or the same)."""

from __future__ import annotations

import os
from dataclasses import replace

from fillup_data.errors import FillupError
from fillup_data.loader.build import Build, ShardRef
from fillup_data.loader.score_filter import SampleFilter, Selection, select
from fillup_data.schema.groups import group_of

SUBSETS = ("filled", "real", "synthetic")
SPLITS = ("train", "test")


class TrainingData:
    """What a run reads: real shards from one build, synthetic from another (or the same) build.

    Real images often cannot be redistributed, so a user builds the real shards locally
    (``generator.strategy: none``) and adds the synthetic shards someone published; labels must
    then mean the same classes in both builds, which is checked here.

    ``sample_filter`` keeps only the synthetic samples whose scores in the synthetic build's
    ``index.parquet`` pass it (:mod:`fillup_data.loader.score_filter`); real samples are always kept.
    """

    def __init__(self, real: Build, synthetic: Build, sample_filter: SampleFilter | None = None):
        self.real = real
        self.synthetic = synthetic
        if synthetic is not real and synthetic.class_names != real.class_names:
            diff = next(
                (i for i, (a, b) in enumerate(zip(real.class_names, synthetic.class_names)) if a != b),
                min(real.num_classes, synthetic.num_classes),
            )
            raise FillupError(
                f"{real.where} and {synthetic.where} have different class lists (first difference at index "
                f"{diff}); the real and synthetic builds must come from the same class list"
            )
        self.selection: Selection | None = None
        if sample_filter is not None and sample_filter.active:
            syn = {s.path: s.num_samples for s in synthetic.shards("train", "synthetic")}
            self.selection = select(synthetic.index_file(), synthetic.index_where, sample_filter, syn,
                                    real.num_classes)

    @classmethod
    def open(
        cls, data: str | os.PathLike, real_data: str | os.PathLike | None = None, *,
        cache_dir: str | None = None, token: str | bool | None = None, sample_filter: SampleFilter | None = None,
    ) -> "TrainingData":
        main = Build.open(data, cache_dir=cache_dir, token=token)
        real = Build.open(real_data, cache_dir=cache_dir, token=token) if real_data else main
        return cls(real, main, sample_filter)

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def real_counts(self) -> list[int]:
        """Real training images per class: the Balanced Softmax prior and the group thresholds."""
        return self.real.real_counts

    @property
    def groups(self) -> list[str]:
        return [group_of(n, self.real.many_above, self.real.few_below) for n in self.real_counts]

    def shards(self, subset: str, split: str) -> list[ShardRef]:
        if subset not in SUBSETS:
            raise FillupError(f"data subset {subset!r}: allowed {', '.join(SUBSETS)}")
        if split not in SPLITS:
            raise FillupError(f"split {split!r}: allowed {', '.join(SPLITS)}")
        if split == "test":
            found = self.real.shards("test") or self.synthetic.shards("test")
            if not found:
                raise FillupError(f"{self.real.where}: the build has no test split (no shards with split 'test')")
            return found
        out: list[ShardRef] = []
        if subset in ("filled", "real"):
            real = self.real.shards("train", "real")
            if not real:
                raise FillupError(
                    f"{self.real.where}: no real training shards (the build was published without real "
                    "images?); build them locally and pass --real-data BUILD"
                )
            out += real
        if subset in ("filled", "synthetic"):
            syn = self.synthetic.shards("train", "synthetic")
            if not syn and subset == "synthetic":
                raise FillupError(f"{self.synthetic.where}: no synthetic training shards")
            if self.selection is not None:
                # a shard with nothing kept is not read at all
                syn = [s for s in (replace(s, keep=self.selection.kept[s.path]) for s in syn) if s.num_kept]
                if not syn and subset == "synthetic":
                    raise FillupError(
                        f"{self.synthetic.index_where}: the score filter ({self.selection.sample_filter.describe()}) "
                        "keeps no synthetic sample; loosen it"
                    )
            out += syn
        return out
