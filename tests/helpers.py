"""Small datasets made on the fly for tests: ImageNet-LT-style list files, image folders."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from fillup_data.demo import world


def draw(label: int, i: int, size: int = 24) -> Image.Image:
    shape, colour = world.world_classes(max(10, label + 1))[label]
    return world.draw(shape, colour, [99, label, i], size=size)[0]


def write_split_file_dataset(root: Path, counts: list[int], test_per_class: int = 2) -> dict:
    """An ImageNet-LT-layout miniature: train/<cls>/*.jpg + list files + class names."""
    root.mkdir(parents=True, exist_ok=True)
    lines, test_lines = [], []
    for label, n in enumerate(counts):
        d = root / "train" / f"n{label:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = d / f"img_{i}.jpg"
            draw(label, i).save(p, quality=90)
            lines.append(f"train/n{label:08d}/img_{i}.jpg {label}")
        t = root / "val"
        t.mkdir(exist_ok=True)
        for i in range(test_per_class):
            p = t / f"val_{label}_{i}.jpg"
            draw(label, 1000 + i).save(p, quality=90)
            test_lines.append(f"val/val_{label}_{i}.jpg {label}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("\n".join(test_lines) + "\n")
    (root / "classes.txt").write_text("\n".join(f"class {i}" for i in range(len(counts))) + "\n")
    return {"train": root / "train.txt", "test": root / "test.txt", "classes": root / "classes.txt"}


def split_file_recipe(root: Path, **over) -> dict:
    rec = {
        "name": "mini-lt",
        "version": "1.0.0",
        "seed": 0,
        "source": {"kind": "split_file", "root": str(root), "train": "train.txt", "test": "test.txt",
                   "class_names": "classes.txt"},
        "fill": {"policy": "fill_to", "target": 10},
        "generator": {"strategy": "none"},
        "shards": {"max_samples": 7},
    }
    rec.update(over)
    return rec
