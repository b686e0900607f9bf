"""A ``datasets`` dataset (local folder, saved dataset, or hub id) with configurable columns."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fillup_data.errors import SourceError
from fillup_data.recipe import HFDatasetSource as HFDatasetConfig
from fillup_data.sources.base import ImageLoadError, Source, SourceItem, decode_image_bytes, load_image_file


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
        feature = self._ds["train"].features[cfg.label_column]
        if isinstance(feature, datasets.ClassLabel):
            self.class_names = list(feature.names)
            self._label_map = None
        else:
            values = sorted(set(self._ds["train"][cfg.label_column]))
            self.class_names = [str(v) for v in values]
            self._label_map = {v: i for i, v in enumerate(values)}

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
            from fillup_data.sources.base import to_rgb

            return to_rgb(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return decode_image_bytes(value["bytes"], what)
            if value.get("path"):
                return load_image_file(Path(value["path"]))
            raise ImageLoadError("empty", what)
        raise ImageLoadError("undecodable", f"{what}: unexpected value of type {type(value).__name__}")
