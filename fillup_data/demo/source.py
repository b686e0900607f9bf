"""The embedded demo source: a long-tailed set drawn from the procedural world, no downloads."""

from __future__ import annotations

from PIL import Image

from fillup_data.demo import world
from fillup_data.recipe import DemoSource as DemoSourceConfig
from fillup_data.sources.base import Source, SourceItem

_SPLIT_CODE = {"train": 0, "test": 1}


class DemoSource(Source):
    kind = "demo"
    needs_verification = False

    def __init__(self, cfg: DemoSourceConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.classes = ([world.parse_class_name(n) for n in cfg.classes] if cfg.classes is not None
                        else world.world_classes(cfg.num_classes))
        self.class_names = [world.class_name(s, c) for s, c in self.classes]
        self.train_counts = world.longtail_counts(cfg.num_classes, cfg.max_images, cfg.min_images)

    def splits(self) -> list[str]:
        return ["train", "test"] if self.cfg.test_per_class > 0 else ["train"]

    def items(self, split: str) -> list[SourceItem]:
        counts = self.train_counts if split == "train" else [self.cfg.test_per_class] * len(self.classes)
        out = []
        for label, n in enumerate(counts):
            for i in range(n):
                ident = f"demo/{split}/{label:03d}/{i:05d}"
                out.append(SourceItem(split, label, ident, ident))
        return out

    def load(self, item: SourceItem) -> Image.Image:
        _, split, label, i = item.locator.split("/")
        shape, colour = self.classes[int(label)]
        # one independent stream per (recipe seed, split, class, image)
        seed = [self.seed, _SPLIT_CODE[split], int(label), int(i)]
        img, _ = world.draw(shape, colour, seed, size=self.cfg.image_size, hard=self.cfg.hard_backgrounds)
        return img
