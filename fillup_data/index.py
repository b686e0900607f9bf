"""Stage 1, index: list the source, verify every image decodes, count readable images per class.

Verification decodes every image fully (truncation only shows at the end of a file), in parallel
processes, and records each bad image with its reason.  The plan is made from *readable* counts, so
the fill-up targets and the Balanced Softmax prior match the images that actually reach the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fillup_data.errors import SourceError
from fillup_data.recipe import Recipe
from fillup_data.sources import FileState, ImageLoadError, Source, SourceItem, apply_imbalance, open_source

#: Bumped when the record's meaning changes; a record of another format is re-indexed, not trusted.
INDEX_FORMAT = 2


@dataclass
class SourceIndex:
    class_names: list[str]
    items: dict[str, list[SourceItem]]
    skipped: list[dict] = field(default_factory=list)
    #: what the source was when indexed (list-file hashes, each image file's size/mtime/sha256),
    #: so that a resumed build can tell that its source changed under it
    source_state: dict = field(default_factory=dict)

    def counts(self, split: str) -> list[int]:
        c = Counter(it.label for it in self.items.get(split, []))
        return [c.get(i, 0) for i in range(len(self.class_names))]

    def skip_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def to_json(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "class_names": self.class_names,
            "items": {s: [asdict(it) for it in its] for s, its in self.items.items()},
            "skipped": self.skipped,
            "source_state": self.source_state,
        }

    @classmethod
    def from_json(cls, data: dict) -> "SourceIndex":
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {data.get('format')!r}, expected {INDEX_FORMAT}")
        return cls(
            class_names=list(data["class_names"]),
            items={s: [SourceItem(**it) for it in its] for s, its in data["items"].items()},
            skipped=list(data["skipped"]),
            source_state=dict(data["source_state"]),
        )

    def save(self, path: Path) -> None:
        """Atomic and durable: a crash leaves the old record or the new one, never a torn one."""
        from fillup_data.state import write_bytes_durably

        write_bytes_durably(path, json.dumps(self.to_json()).encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> "SourceIndex":
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def read(cls, path: Path) -> "SourceIndex | None":
        """The record at ``path``, or None when it is absent, empty, torn or of another format:
        an unreadable record means "not done", and the index is made again."""
        try:
            return cls.load(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _verify_chunk(source: Source, chunk: list[SourceItem]) -> list[tuple[int, str, str, FileState | None]]:
    """(position, reason or "", detail, file state) for every item of the chunk."""
    out = []
    for i, item in enumerate(chunk):
        try:
            out.append((i, "", "", source.verify(item)))
        except ImageLoadError as err:
            out.append((i, err.reason, err.detail, err.state))
    return out


def verify_items(
    source: Source, items: list[SourceItem], workers: int, desc: str
) -> tuple[dict[int, tuple[str, str]], dict[int, FileState | None]]:
    """Return ({position: (reason, detail)} for every item that does not decode, {position: file state})."""
    if not items or not source.needs_verification:
        return {}, {}
    chunk = max(16, min(512, len(items) // (workers * 8) + 1))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    bad: dict[int, tuple[str, str]] = {}
    states: dict[int, FileState | None] = {}
    bar = tqdm(total=len(items), desc=desc, unit="img", leave=False)

    def collect(ci: int, results) -> None:
        for i, reason, detail, state in results:
            states[ci * chunk + i] = state
            if reason:
                bad[ci * chunk + i] = (reason, detail)
        bar.update(len(chunks[ci]))

    if workers <= 1 or len(chunks) == 1:
        for ci, ch in enumerate(chunks):
            collect(ci, _verify_chunk(source, ch))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_verify_chunk, source, ch) for ch in chunks]
            for ci, fut in enumerate(futures):
                collect(ci, fut.result())
    bar.close()
    return bad, states


def _skip_record(item: SourceItem, reason: str, detail: str) -> dict:
    return {"split": item.split, "label": item.label, "source_path": item.source_path, "where": item.where,
            "reason": reason, "detail": detail}


def list_items(recipe: Recipe, source: Source, split: str) -> tuple[list[SourceItem], list[dict]]:
    """The items of ``split`` the index covers, and the duplicates dropped from it.

    A list file naming the same image twice would count (and publish) it twice: the first line
    wins, later ones are skipped and reported.  Duplicates go before the CIFAR-LT cut, so that
    the cut keeps n_i distinct images."""
    listed, dropped, first = [], [], {}
    for it in source.items(split):
        key = os.path.normpath(it.locator) if source.has_files else it.locator
        if key in first:
            prev = first[key]
            other = f" with label {prev.label}" if prev.label != it.label else ""
            dropped.append(_skip_record(it, "duplicate", f"{it.source_path}: already listed at {prev.where}{other}"))
            continue
        first[key] = it
        listed.append(it)
    if split == "train" and recipe.source.imbalance_factor is not None:
        listed = apply_imbalance(listed, len(source.class_names), recipe.source.imbalance_factor,
                                 recipe.source.imbalance_max)
    return listed, dropped


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _list_digests(source: Source) -> dict[str, str | None]:
    return {name: _sha256_file(path) for name, path in source.list_files().items()}


def _root_of(source: Source) -> str:
    return os.path.realpath(source.root) if source.has_files else ""


def build_index(recipe: Recipe, workers: int = 1, source: Source | None = None) -> SourceIndex:
    source = source or open_source(recipe)
    names = source.class_names
    items: dict[str, list[SourceItem]] = {}
    skipped: list[dict] = []
    files: dict[str, list | None] = {}
    for split in source.splits():
        listed, dropped = list_items(recipe, source, split)
        skipped += dropped
        bad, states = verify_items(source, listed, workers, desc=f"index {split}")
        for pos, (reason, detail) in sorted(bad.items()):
            skipped.append(_skip_record(listed[pos], reason, detail))
        if source.has_files:
            for pos, state in states.items():
                files[listed[pos].locator] = state.to_json() if state else None
        items[split] = [it for pos, it in enumerate(listed) if pos not in bad]
    state = {"root": _root_of(source), "lists": _list_digests(source), "listing": source.listing_digest(),
             "files": files}
    index = SourceIndex(names, items, skipped, state)
    _check_every_class_readable(index)
    return index


def resume_or_build_index(recipe: Recipe, path: Path, workers: int) -> SourceIndex:
    """The index recorded at ``path`` if the source is still what it was; else a new one.

    A recorded index whose source changed (a list file edited, images added, removed or rewritten,
    the root moved without its files) is refused: its plan and the shards already written describe
    images that are not there any more."""
    index = SourceIndex.read(path)
    if index is None:
        index = build_index(recipe, workers=workers)
        index.save(path)
        return index
    check_source_unchanged(recipe, index, path)
    _check_every_class_readable(index)
    return index


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def check_source_unchanged(recipe: Recipe, index: SourceIndex, path: Path) -> None:
    """Compare the source now with what ``index`` recorded: list files by hash, image files by
    size and mtime (cheap: a stat each, no decoding) and, where only the mtime differs (a copy
    that did not keep times), by content hash."""
    source = open_source(recipe)
    state = index.source_state
    problems: list[str] = []
    lists_now = _list_digests(source)
    for name in sorted(set(lists_now) | set(state.get("lists", {}))):
        old, new = state.get("lists", {}).get(name), lists_now.get(name)
        if old != new:
            problems.append(f"{name} " + ("is gone" if new is None else "changed since the build was indexed"))
    if source.class_names != index.class_names:
        problems.append(f"the class list changed ({len(index.class_names)} classes when indexed, "
                        f"{len(source.class_names)} now)")
    if source.listing_digest() != state.get("listing", {}):
        problems.append("the dataset's rows or labels changed")
    if not problems and source.has_files:
        problems += _file_changes(recipe, source, state)
    if problems:
        raise SourceError(
            f"{path.parent.parent}: the source changed since this build was indexed, so the plan and the shards "
            "already written no longer match it:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nRestore the source as it was (or point source.root at it), or start over with --force or "
            "another --out."
        )


def _file_changes(recipe: Recipe, source: Source, state: dict) -> list[str]:
    recorded: dict = state.get("files", {})
    now = {it.locator for split in source.splits() for it in list_items(recipe, source, split)[0]}
    added, removed = sorted(now - recorded.keys()), sorted(recorded.keys() - now)
    missing, changed = [], []
    for key in sorted(now & recorded.keys()):
        old, cur = FileState.from_json(recorded[key]), source.file_stat(key)
        if old is None and cur is None:
            continue
        if cur is None:
            missing.append(key)
        elif old is None or cur.size != old.size:
            changed.append(key)
        elif cur.mtime_ns != old.mtime_ns:
            read = source.file_read(key)
            if not old.sha256 or read is None or read.sha256 != old.sha256:
                changed.append(key)
    problems = []
    root_now = _root_of(source)
    if missing and state.get("root") and root_now != state["root"]:
        problems.append(f"source.root is {root_now} but the build was indexed from {state['root']}, and "
                        f"{len(missing)} of {len(recorded)} images are missing under it (e.g. {_examples(missing)})")
    elif missing:
        problems.append(f"{len(missing)} image(s) missing (e.g. {_examples(missing)})")
    if added:
        problems.append(f"{len(added)} image(s) added (e.g. {_examples(added)})")
    if removed:
        problems.append(f"{len(removed)} image(s) removed (e.g. {_examples(removed)})")
    if changed:
        problems.append(f"{len(changed)} image(s) changed in size or content (e.g. {_examples(changed)})")
    return problems


def _check_every_class_readable(index: SourceIndex) -> None:
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
