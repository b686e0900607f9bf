"""One folder per class (torchvision ImageFolder): class index = sorted folder name order."""

from __future__ import annotations

import os
from pathlib import Path

from fillup_data.errors import SourceError
from fillup_data.recipe import ImageFolderSource as ImageFolderConfig
from fillup_data.sources.base import FileSource, SourceItem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


def _check_utf8_name(path: Path, what: str) -> None:
    """A name with bytes that are not UTF-8 (decoded by Python as surrogates) cannot go into a
    manifest, a card or a shard's JSON: stop at index time, naming it, rather than mid-build."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise SourceError(f"{shown}: {what} name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8)") from None


class ImageFolderSourceImpl(FileSource):
    kind = "image_folder"

    def __init__(self, cfg: ImageFolderConfig):
        super().__init__(Path(cfg.root).expanduser())
        self.cfg = cfg
        train_dir = self.root / cfg.train
        if not train_dir.is_dir():
            raise SourceError(f"{train_dir}: train folder not found (source.root / source.train)")
        folders = sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for p in folders:
            _check_utf8_name(p, "class folder")
        self.class_names = [p.name for p in folders]
        if not self.class_names:
            raise SourceError(f"{train_dir}: no class folders (expected one sub-folder per class)")
        self._dirs = {"train": train_dir}
        if cfg.test:
            test_dir = self.root / cfg.test
            if not test_dir.is_dir():
                raise SourceError(f"{test_dir}: test folder not found (source.test)")
            for p in test_dir.iterdir():
                if p.is_dir():
                    _check_utf8_name(p, "class folder")
            unknown = sorted(
                p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in set(self.class_names)
            )
            if unknown:
                raise SourceError(
                    f"{test_dir}: class folder(s) {unknown[:5]} are not in the train folder's classes"
                )
            self._dirs["test"] = test_dir

    def splits(self) -> list[str]:
        return list(self._dirs)

    def items(self, split: str) -> list[SourceItem]:
        """Every file with an image suffix, FIFOs and links included, so that a file that cannot be
        read is skipped *and reported* by the verification, never silently left out.  Sub-folders
        reached through a symlink are not walked (a link loop would never end)."""
        base = self._dirs[split]
        out = []
        for label, name in enumerate(self.class_names):
            folder = base / name
            if not folder.is_dir():
                continue
            found = []
            for dirpath, _dirs, files in os.walk(folder, followlinks=False):
                found += [Path(dirpath) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
            for f in sorted(found):
                _check_utf8_name(f, "image file")
                rel = f.relative_to(self.root).as_posix()
                out.append(SourceItem(split, label, rel, rel))
        return out
