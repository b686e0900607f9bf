"""ImageNet-LT / Places-LT / iNaturalist-2018 list files: one ``relative/path.jpg label`` per line."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fillup_data.errors import SourceError
from fillup_data.recipe import SplitFileSource as SplitFileConfig
from fillup_data.sources.base import Source, SourceItem, load_image_file


def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise SourceError(f"{path}: class_names file not found (one class name per line, index = line number)")
    names = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = line.strip()
        if not name:
            raise SourceError(f"{path}:{lineno}: empty class name (one name per line; line number = class index + 1)")
        names.append(name)
    if not names:
        raise SourceError(f"{path}: no class names")
    return names


def parse_split_file(path: Path, split: str, num_classes: int | None) -> list[tuple[str, int, str]]:
    """Return (relpath, label, "file:line") per line; malformed lines stop with file:line."""
    if not path.is_file():
        raise SourceError(f"{path}: split file not found (set source.root / source.{split})")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(maxsplit=1)
        where = f"{path}:{lineno}"
        if len(parts) != 2:
            raise SourceError(f"{where}: expected 'relative/path.jpg label', got {text!r}")
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise SourceError(f"{where}: label {label_text!r} is not an integer (line {text!r})") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise SourceError(
                f"{where}: label {label} is outside the class list (allowed {allowed}); "
                "fix the line or the class_names file"
            )
        rows.append((rel, label, where))
    return rows


class SplitFileSourceImpl(Source):
    kind = "split_file"

    def __init__(self, cfg: SplitFileConfig):
        super().__init__()
        self.cfg = cfg
        self.root = Path(cfg.root).expanduser()
        names = read_class_names(self._path(cfg.class_names)) if cfg.class_names else None
        self._rows = {"train": parse_split_file(self._path(cfg.train), "train", len(names) if names else None)}
        if cfg.test:
            self._rows["test"] = parse_split_file(self._path(cfg.test), "test", len(names) if names else None)
        if names is None:
            n = 1 + max((label for rows in self._rows.values() for _, label, _ in rows), default=-1)
            names = [str(i) for i in range(n)]
        self.class_names = names

    def _path(self, name: str) -> Path:
        p = Path(name).expanduser()
        return p if p.is_absolute() else self.root / p

    def splits(self) -> list[str]:
        return list(self._rows)

    def items(self, split: str) -> list[SourceItem]:
        return [
            SourceItem(split, label, rel, str(self.root / rel), where) for rel, label, where in self._rows[split]
        ]

    def load(self, item: SourceItem) -> Image.Image:
        return load_image_file(Path(item.locator))
