"""Stage 1, index: list the source, verify every image decodes, count readable images per class.

Verification decodes every image fully (truncation only shows at the end of a file), in parallel
processes, and records each bad image with its reason.  The plan is made from *readable* counts, so
the fill-up targets and the Balanced Softmax prior match the images that actually reach the shards.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fillup_data.errors import SourceError
from fillup_data.recipe import Recipe
from fillup_data.sources import ImageLoadError, Source, SourceItem, apply_imbalance, open_source


@dataclass
class SourceIndex:
    class_names: list[str]
    items: dict[str, list[SourceItem]]
    skipped: list[dict] = field(default_factory=list)

    def counts(self, split: str) -> list[int]:
        c = Counter(it.label for it in self.items.get(split, []))
        return [c.get(i, 0) for i in range(len(self.class_names))]

    def skip_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def to_json(self) -> dict:
        return {
            "class_names": self.class_names,
            "items": {s: [asdict(it) for it in its] for s, its in self.items.items()},
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: dict) -> "SourceIndex":
        return cls(
            class_names=list(data["class_names"]),
            items={s: [SourceItem(**it) for it in its] for s, its in data["items"].items()},
            skipped=list(data["skipped"]),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "SourceIndex":
        return cls.from_json(json.loads(path.read_text()))


def _verify_chunk(source: Source, chunk: list[SourceItem]) -> list[tuple[int, str, str]]:
    bad = []
    for i, item in enumerate(chunk):
        try:
            source.load(item)
        except ImageLoadError as err:
            bad.append((i, err.reason, err.detail))
    return bad


def verify_items(source: Source, items: list[SourceItem], workers: int, desc: str) -> dict[int, tuple[str, str]]:
    """Return {position: (reason, detail)} for every item that does not decode."""
    if not items or not source.needs_verification:
        return {}
    chunk = max(16, min(512, len(items) // (workers * 8) + 1))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    bad: dict[int, tuple[str, str]] = {}
    bar = tqdm(total=len(items), desc=desc, unit="img", leave=False)
    if workers <= 1 or len(chunks) == 1:
        for ci, ch in enumerate(chunks):
            for i, reason, detail in _verify_chunk(source, ch):
                bad[ci * chunk + i] = (reason, detail)
            bar.update(len(ch))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_verify_chunk, source, ch) for ch in chunks]
            for ci, fut in enumerate(futures):
                for i, reason, detail in fut.result():
                    bad[ci * chunk + i] = (reason, detail)
                bar.update(len(chunks[ci]))
    bar.close()
    return bad


def build_index(recipe: Recipe, workers: int = 1, source: Source | None = None) -> SourceIndex:
    source = source or open_source(recipe)
    names = source.class_names
    items: dict[str, list[SourceItem]] = {}
    skipped: list[dict] = []
    for split in source.splits():
        listed = source.items(split)
        if split == "train" and recipe.source.imbalance_factor is not None:
            listed = apply_imbalance(listed, len(names), recipe.source.imbalance_factor, recipe.source.imbalance_max)
        bad = verify_items(source, listed, workers, desc=f"index {split}")
        for pos, (reason, detail) in sorted(bad.items()):
            it = listed[pos]
            skipped.append(
                {"split": split, "label": it.label, "source_path": it.source_path, "where": it.where,
                 "reason": reason, "detail": detail}
            )
        items[split] = [it for pos, it in enumerate(listed) if pos not in bad]
    index = SourceIndex(names, items, skipped)
    _check_every_class_readable(index, source)
    return index


def _check_every_class_readable(index: SourceIndex, source: Source) -> None:
    counts = index.counts("train")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if not empty:
        return
    lines = []
    for c in empty[:10]:
        reasons = Counter(s["reason"] for s in index.skipped if s["split"] == "train" and s["label"] == c)
        why = (
            "all listed images were skipped (" + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + ")"
            if reasons
            else "no training images are listed for it"
        )
        lines.append(f"  - class {c} {index.class_names[c]!r}: {why}")
    more = f"\n  ... and {len(empty) - 10} more" if len(empty) > 10 else ""
    raise SourceError(
        f"{len(empty)} class(es) have no readable training images, so they cannot be filled up:\n"
        + "\n".join(lines)
        + more
        + "\nFix or add their images, or remove the classes from the class list."
    )
