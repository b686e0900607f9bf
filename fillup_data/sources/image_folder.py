"""One folder per class (torchvision ImageFolder): class index = sorted folder name order."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fillup_data.errors import SourceError
from fillup_data.recipe import ImageFolderSource as ImageFolderConfig
from fillup_data.sources.base import Source, SourceItem, load_image_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


class ImageFolderSourceImpl(Source):
    kind = "image_folder"

    def __init__(self, cfg: ImageFolderConfig):
        super().__init__()
        self.cfg = cfg
        self.root = Path(cfg.root).expanduser()
        train_dir = self.root / cfg.train
        if not train_dir.is_dir():
            raise SourceError(f"{train_dir}: train folder not found (source.root / source.train)")
        self.class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.class_names:
            raise SourceError(f"{train_dir}: no class folders (expected one sub-folder per class)")
        self._dirs = {"train": train_dir}
        if cfg.test:
            test_dir = self.root / cfg.test
            if not test_dir.is_dir():
                raise SourceError(f"{test_dir}: test folder not found (source.test)")
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
        base = self._dirs[split]
        out = []
        for label, name in enumerate(self.class_names):
            folder = base / name
            if not folder.is_dir():
                continue
            for f in sorted(folder.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    rel = f.relative_to(self.root).as_posix()
                    out.append(SourceItem(split, label, rel, str(f)))
        return out

    def load(self, item: SourceItem) -> Image.Image:
        return load_image_file(Path(item.locator))
