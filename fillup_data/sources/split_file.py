"""ImageNet-LT / Places-LT / iNaturalist-2018 list files: one ``relative/path.jpg label`` per line."""

from __future__ import annotations

from pathlib import Path

from fillup_data.errors import SourceError
from fillup_data.recipe import SplitFileSource as SplitFileConfig
from fillup_data.sources.base import FileSource, SourceItem

#: Without a class_names file the class list is 0..max(label): a stray huge label would allocate
#: billions of classes.  iNaturalist 2021 has 10,000; this is a hundred times more.
MAX_LABEL_WITHOUT_NAMES = 1_000_000


def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped); bad bytes name file:line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # Windows editors write a BOM; it is not part of the first name
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise SourceError(
            f"{path}:{line}: {what} is not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None
    return text.splitlines()


def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise SourceError(f"{path}: class_names file not found (one class name per line, index = line number)")
    names = []
    for lineno, line in enumerate(read_text_lines(path, "class_names file"), 1):
        name = line.strip()
        if not name:
            raise SourceError(f"{path}:{lineno}: empty class name (one name per line; line number = class index + 1)")
        names.append(name)
    if not names:
        raise SourceError(f"{path}: no class names")
    return names


def parse_split_file(path: Path, split: str, num_classes: int | None, name: str | None = None) -> list[tuple[str, int, str]]:
    """Return (relpath, label, "name:line") per line; malformed lines stop with file:line.

    ``name`` is the file as the recipe names it (relative to the root), so the index and report stay
    valid when the root moves."""
    if not path.is_file():
        raise SourceError(f"{path}: split file not found (set source.root / source.{split})")
    rows = []
    for lineno, line in enumerate(read_text_lines(path, "split file"), 1):
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
        if num_classes is None and label >= MAX_LABEL_WITHOUT_NAMES:
            raise SourceError(
                f"{where}: label {label} is too large for a source without class_names (at most "
                f"{MAX_LABEL_WITHOUT_NAMES - 1:,}, since the class list is 0..largest label); "
                "fix the line, or give source.class_names"
            )
        rows.append((rel, label, f"{name or path}:{lineno}"))
    return rows


class SplitFileSourceImpl(FileSource):
    kind = "split_file"

    def __init__(self, cfg: SplitFileConfig):
        super().__init__(Path(cfg.root).expanduser())
        self.cfg = cfg
        names = read_class_names(self._path(cfg.class_names)) if cfg.class_names else None
        n = len(names) if names else None
        self._rows = {"train": parse_split_file(self._path(cfg.train), "train", n, cfg.train)}
        if cfg.test:
            self._rows["test"] = parse_split_file(self._path(cfg.test), "test", n, cfg.test)
        if names is None:
            n = 1 + max((label for rows in self._rows.values() for _, label, _ in rows), default=-1)
            names = [str(i) for i in range(n)]
        self.class_names = names

    def _path(self, name: str) -> Path:
        p = Path(name).expanduser()
        return p if p.is_absolute() else self.root / p

    def splits(self) -> list[str]:
        return list(self._rows)

    def list_files(self) -> dict[str, Path]:
        names = [self.cfg.train, self.cfg.test, self.cfg.class_names]
        return {name: self._path(name) for name in names if name}

    def items(self, split: str) -> list[SourceItem]:
        return [SourceItem(split, label, rel, rel, where) for rel, label, where in self._rows[split]]
