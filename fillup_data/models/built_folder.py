"""Model folders this package builds from configs and caches (``builtin:tiny-sd``, the tiny prompt models,
``builtin:tiny-clip``): one way to record their files and to put a freshly built folder in place.

A folder is built into a temporary sibling, its files' sha256 recorded next to them, then renamed into
place, so a crash or a concurrent builder never leaves half a model where ``from_pretrained`` looks; a
stale or damaged folder already there is moved aside and deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def folder_digests(root: Path, record_name: str) -> dict[str, str]:
    """sha256 of every file under ``root`` but its record, by relative path."""
    from fillup_data.shards.writer import sha256_file

    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != record_name}


def install_built_folder(dest: Path, build_into: Callable[[Path], dict], record_name: str,
                         is_intact: Callable[[Path], bool]) -> Path:
    """``build_into(tmp)`` writes the model into ``tmp`` and returns its record (what built it); the record
    gets the files' digests and is written last, then ``tmp`` becomes ``dest``. When another process got
    there first, its folder is kept if ``is_intact`` (the same builder gives the same bytes)."""
    from fillup_data.state import write_json_atomic

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    aside = dest.with_name(f".{dest.name}.stale-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        record = build_into(tmp)
        write_json_atomic(tmp / record_name, {**record, "files": folder_digests(tmp, record_name)})
        if dest.exists():
            try:
                os.rename(dest, aside)
            except FileNotFoundError:  # another process moved it first
                pass
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: its copy is the same model
            if not is_intact(dest):
                raise
    finally:
        for leftover in (tmp, aside):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return dest
