"""A ``datasets`` dataset (local folder, saved dataset, or hub id) with configurable columns."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PIL import Image

from fillup_data.errors import SourceError
from fillup_data.recipe import HFDatasetSource as HFDatasetConfig
from fillup_data.sources.base import ImageLoadError, Source, SourceItem, decode_image_bytes, load_image_file, to_rgb


class HFDatasetSourceImpl(Source):
    kind = "hf_dataset"

    def __init__(self, cfg: HFDatasetConfig):
        super().__init__()
        import datasets

        self.cfg = cfg
        self._ds = {}
        for split, name in (("train", cfg.train_split), ("test", cfg.test_split)):
            if name is None:
                continue
            try:
                if Path(cfg.path).is_dir() and (Path(cfg.path) / "dataset_info.json").exists():
                    ds = datasets.load_from_disk(cfg.path)
                    ds = ds[name] if isinstance(ds, datasets.DatasetDict) else ds
                else:
                    ds = datasets.load_dataset(cfg.path, cfg.name, split=name, revision=cfg.revision)
            except Exception as err:  # datasets raises many types; the user needs the message
                raise SourceError(f"source.path {cfg.path!r} split {name!r}: cannot load: {err}") from None
            for col in (cfg.image_column, cfg.label_column):
                if col not in ds.column_names:
                    raise SourceError(
                        f"source: column {col!r} not in {cfg.path!r} split {name!r} (columns: {ds.column_names}); "
                        "set source.image_column / source.label_column"
                    )
            # decode ourselves so a broken image is skipped and reported, not a crash mid-iteration
            if isinstance(ds.features[cfg.image_column], datasets.Image):
                ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
            self._ds[split] = ds
        self._file_roots = self._local_file_roots(cfg.path)
        feature = self._ds["train"].features[cfg.label_column]
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = list(feature.names)
            self._label_map = None
        else:
            labels = list(self._ds["train"][cfg.label_column])
            for row, value in enumerate(labels):
                if not isinstance(value, (int, str)) or isinstance(value, bool):
                    raise SourceError(
                        f"{cfg.path} split {cfg.train_split!r} row {row}: label {value!r} is not an integer or a "
                        f"string (column {cfg.label_column!r}); fix the row or cast the column to ClassLabel"
                    )
            kinds = {type(v) for v in labels}
            if len(kinds) > 1:
                raise SourceError(
                    f"{cfg.path} split {cfg.train_split!r}: column {cfg.label_column!r} mixes integer and string "
                    "labels; use one kind (or a ClassLabel feature)"
                )
            # integers sort numerically, strings alphabetically: class index = rank of the label value
            values = sorted(set(labels))
            self.class_names = [str(v) for v in values]
            self._label_map = {v: i for i, v in enumerate(values)}

    @staticmethod
    def _local_file_roots(path: str) -> list[str]:
        """Where an image given as a file path (no bytes) may live: the local dataset folder and the
        caches ``datasets`` and the Hub client download into.  A row naming any other file (a
        dataset that says ``{"path": "/home/you/.ssh/id_rsa"}``) is refused, not read."""
        import datasets
        import huggingface_hub

        roots = [datasets.config.HF_DATASETS_CACHE, huggingface_hub.constants.HF_HUB_CACHE]
        if Path(path).is_dir():
            roots.insert(0, path)
        return [os.path.realpath(r) for r in roots]

    def listing_digest(self) -> dict:
        return {
            split: {"rows": ds.num_rows,
                    "labels_sha256": hashlib.sha256(json.dumps(list(ds[self.cfg.label_column])).encode()).hexdigest()}
            for split, ds in self._ds.items()
        }

    def splits(self) -> list[str]:
        return list(self._ds)

    def items(self, split: str) -> list[SourceItem]:
        ds = self._ds[split]
        out = []
        for row, label in enumerate(ds[self.cfg.label_column]):
            if self._label_map is not None:
                if label not in self._label_map:
                    raise SourceError(
                        f"{self.cfg.path} split {split!r} row {row}: label {label!r} does not occur in the train split"
                    )
                label = self._label_map[label]
            elif label is None or not 0 <= int(label) < len(self.class_names):
                raise SourceError(f"{self.cfg.path} split {split!r} row {row}: label {label!r} is outside the class list")
            out.append(SourceItem(split, int(label), f"{split}/{row}", str(row)))
        return out

    def load(self, item: SourceItem) -> Image.Image:
        value = self._ds[item.split][int(item.locator)][self.cfg.image_column]
        what = f"{self.cfg.path}:{item.source_path}"
        if value is None:
            raise ImageLoadError("missing", what)
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return decode_image_bytes(value["bytes"], what)
            if value.get("path"):
                return self._load_local_file(value["path"], what)
            raise ImageLoadError("empty", what)
        raise ImageLoadError("undecodable", f"{what}: unexpected value of type {type(value).__name__}")

    def _load_local_file(self, path: str, what: str) -> Image.Image:
        base = self._file_roots[0] if Path(self.cfg.path).is_dir() else os.getcwd()
        real = os.path.realpath(os.path.join(base, path))
        for root in self._file_roots:
            if os.path.commonpath([root, real]) == root:
                return load_image_file(Path(root), os.path.relpath(real, root))
        raise ImageLoadError(
            "outside_root", f"{what}: names the local file {path!r}, outside the dataset folder and the datasets cache"
        )
