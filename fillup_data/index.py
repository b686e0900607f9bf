"""Stage 1, index: list the source, verify every image decodes, count readable images per class.

Verification decodes every image fully (truncation only shows at the end of a file), in parallel
processes, and records each bad image with its reason.  The plan is made from *readable* counts, so
the fill-up targets and the Balanced Softmax prior match the images that actually reach the shards.

Decoding a source is the slow part of ``plan`` (minutes for ImageNet, more for iNaturalist), so an
index is kept: in the build folder (``.fillup/index.json``) and, per source, in ``$FILLUP_CACHE/index/``,
where ``plan`` and the first launch of a build find it. A kept index is used only while the source is
what was indexed, checked the way a relaunch checks it (list files by hash, every image by size and
mtime, by content where only the mtime moved): a stat per image, no decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fillup_data.errors import SourceError
from fillup_data.progress import note, progress_bar
from fillup_data.recipe import Recipe
from fillup_data.sources import FileState, ImageLoadError, Source, SourceItem, apply_imbalance, open_source

#: Bumped when the record's meaning changes; a record of another format is re-indexed, not trusted.
INDEX_FORMAT = 3


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
        """Column lists rather than an object per image: iNaturalist's 460K images make a record of
        tens of megabytes that loads in about a second."""
        files = self.source_state.get("files", {})
        states = list(files.values())
        return {
            "format": INDEX_FORMAT,
            "class_names": self.class_names,
            "items": {s: {"label": [it.label for it in its], "source_path": [it.source_path for it in its],
                          # the locator is the source path for most sources: stored only where it differs
                          "locator": [None if it.locator == it.source_path else it.locator for it in its],
                          "where": [it.where for it in its]}
                      for s, its in self.items.items()},
            "skipped": self.skipped,
            "source_state": {**{k: v for k, v in self.source_state.items() if k != "files"},
                             "files": {"locator": list(files),
                                       "size": [None if st is None else st[0] for st in states],
                                       "mtime_ns": [None if st is None else st[1] for st in states],
                                       "sha256": [None if st is None else st[2] for st in states]}},
        }

    @classmethod
    def from_json(cls, data: dict) -> "SourceIndex":
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"index format {data.get('format')!r}, expected {INDEX_FORMAT}")
        items = {}
        for split, cols in data["items"].items():
            items[split] = [SourceItem(split, label, path, path if loc is None else loc, where) for label, path, loc, where
                            in zip(cols["label"], cols["source_path"], cols["locator"], cols["where"], strict=True)]
        state = dict(data["source_state"])
        f = state["files"]
        state["files"] = {loc: None if size is None else [size, mtime, sha] for loc, size, mtime, sha
                          in zip(f["locator"], f["size"], f["mtime_ns"], f["sha256"], strict=True)}
        return cls(class_names=list(data["class_names"]), items=items, skipped=list(data["skipped"]),
                   source_state=state)

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


_WORKER_SOURCE: Source | None = None


def _init_verify_worker(source: Source) -> None:
    # the source (with its whole listing) travels once per worker, not once per chunk
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _verify_chunk_in_worker(chunk: list[SourceItem]) -> list[tuple[int, str, str, FileState | None]]:
    return _verify_chunk(_WORKER_SOURCE, chunk)


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
    chunk = max(16, min(1024, len(items) // (workers * 8) + 1))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    bad: dict[int, tuple[str, str]] = {}
    states: dict[int, FileState | None] = {}
    bar = progress_bar(len(items), desc, "img", leave=False)

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
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_verify_worker, initargs=(source,)) as pool:
            futures = [pool.submit(_verify_chunk_in_worker, ch) for ch in chunks]
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


def source_key(recipe: Recipe) -> str:
    """What decides an index: the source section (root and local dataset paths resolved), the seed of
    a drawn demo source, the index format and the package version (which decides what decodes)."""
    from fillup_data import __version__

    src = recipe.source.model_dump(mode="json")
    for field_name in ("root", "path"):
        value = src.get(field_name)
        if value and (field_name == "root" or Path(value).expanduser().exists()):
            src[field_name] = os.path.realpath(Path(value).expanduser())
    blob = json.dumps({"format": INDEX_FORMAT, "version": __version__, "source": src,
                       "seed": recipe.seed if recipe.source.kind == "demo" else None}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_index_path(recipe: Recipe) -> Path:
    """``$FILLUP_CACHE/index/<kind>-<source key>.json``: the source's index, shared by plan and build."""
    from fillup_data.cache import cache_dir

    return cache_dir("index") / f"{recipe.source.kind}-{source_key(recipe)[:32]}.json"


def _from_cache(recipe: Recipe) -> tuple[SourceIndex | None, str]:
    """The cached index of this source while the source is unchanged, else (None, why not)."""
    path = cached_index_path(recipe)
    index = SourceIndex.read(path)
    if index is None:
        return None, "no index of this source kept yet" if not path.exists() else f"{path} unreadable"
    changes = source_changes(recipe, index)
    if changes:
        return None, f"the source changed since {path} was made ({changes[0]})"
    return index, f"reused {path} (source unchanged: list files, image sizes and times)"


def _to_cache(recipe: Recipe, index: SourceIndex, log) -> None:
    """Best effort: a cache that cannot be written costs the next ``plan`` an index, nothing else."""
    path = cached_index_path(recipe)
    try:
        index.save(path)
    except OSError as err:
        log(f"note: could not keep the index in {path} ({err.strerror or err}); set FILLUP_CACHE to a writable folder")


def index_for_plan(recipe: Recipe, workers: int, reindex: bool = False, log=note) -> tuple[SourceIndex, str]:
    """The source's index for ``plan``: the kept one while the source is unchanged, else a new one
    (kept for the next call and for the build). Returns it and a line saying which."""
    if not reindex:
        index, why = _from_cache(recipe)
        if index is not None:
            _check_every_class_readable(index)
            return index, why
    else:
        why = "--reindex"
    index = build_index(recipe, workers=workers)
    _to_cache(recipe, index, log)
    return index, f"indexed the source ({why}); kept in {cached_index_path(recipe)}"


def resume_or_build_index(recipe: Recipe, path: Path, workers: int, log=note) -> SourceIndex:
    """The index recorded at ``path`` if the source is still what it was; else a new one.

    A build's first launch takes the source's kept index (``plan`` made it) when the source is
    unchanged, and indexes otherwise. A recorded index whose source changed (a list file edited,
    images added, removed or rewritten, the root moved without its files) is refused: its plan and
    the shards already written describe images that are not there any more."""
    index = SourceIndex.read(path)
    if index is None:
        index, why = _from_cache(recipe)
        if index is not None:
            log(f"index: {why}")
        else:
            index = build_index(recipe, workers=workers)
            _to_cache(recipe, index, log)
        index.save(path)
        _check_every_class_readable(index)
        return index
    check_source_unchanged(recipe, index, path)
    _check_every_class_readable(index)
    return index


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def check_source_unchanged(recipe: Recipe, index: SourceIndex, path: Path) -> None:
    """Refuse (SourceError, saying what changed) a source that is not what ``index`` recorded."""
    problems = source_changes(recipe, index)
    if problems:
        raise SourceError(
            f"{path.parent.parent}: the source changed since this build was indexed, so the plan and the shards "
            "already written no longer match it:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nRestore the source as it was (or point source.root at it), or start over with --force or "
            "another --out."
        )


def source_changes(recipe: Recipe, index: SourceIndex) -> list[str]:
    """Compare the source now with what ``index`` recorded: list files by hash, image files by
    size and mtime (cheap: a stat each, no decoding) and, where only the mtime differs (a copy
    that did not keep times), by content hash. Returns what changed (empty: nothing)."""
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
    return problems


def _file_changes(recipe: Recipe, source: Source, state: dict) -> list[str]:
    recorded: dict = state.get("files", {})
    now = {it.locator for split in source.splits() for it in list_items(recipe, source, split)[0]}
    added, removed = sorted(now - recorded.keys()), sorted(recorded.keys() - now)
    missing, changed = [], []
    for key in sorted(now & recorded.keys()):
        old = FileState.from_json(recorded[key])
        quick = source.file_stat_quick(key)
        if old is not None and quick is not None and (quick.size, quick.mtime_ns) == (old.size, old.mtime_ns):
            continue  # as recorded: one stat, the common case
        cur = source.file_stat(key)
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
