"""A PNG grid of real vs synthetic images per class, to look before spending GPU-days."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fillup_data.state import write_bytes_durably

_LABEL_W = 190
_GAP = 12
_BG = (255, 255, 255)
_EMPTY = (230, 230, 230)
_HEADER = 24


def _thumb(image: Image.Image, size: int) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    # small images (32 px worlds, CIFAR) are blown up with visible pixels rather than blurred
    return image.resize((size, size), Image.NEAREST if s * 2 <= size else Image.BICUBIC)


def grid_size(n_classes: int, n_real: int, n_syn: int, thumb: int = 96) -> tuple[int, int]:
    return _LABEL_W + (n_real + n_syn) * (thumb + 2) + _GAP, _HEADER + n_classes * (thumb + 4)


def tile_box(row: int, column: int, synthetic: bool, n_real: int, thumb: int = 96) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of the ``column``-th real or synthetic image of a row."""
    x0 = _LABEL_W + n_real * (thumb + 2) + _GAP if synthetic else _LABEL_W
    x, y = x0 + column * (thumb + 2), _HEADER + row * (thumb + 4)
    return x, y, x + thumb, y + thumb


def preview_grid(
    real: dict[int, list[Image.Image]],
    synthetic: dict[int, list[Image.Image]],
    class_names: list[str],
    path: str | Path,
    thumb: int = 96,
) -> Path:
    """One row per class: its name, up to n real images, a gap, up to n synthetic images.

    Classes are the union of both dicts, in index order; missing images are grey cells.
    """
    classes = sorted(set(real) | set(synthetic))
    if not classes:
        raise ValueError("preview_grid: no classes to draw")
    n_real = max((len(real.get(c, [])) for c in classes), default=0)
    n_syn = max((len(synthetic.get(c, [])) for c in classes), default=0)
    canvas = Image.new("RGB", grid_size(len(classes), n_real, n_syn, thumb), _BG)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if n_real:
        draw.text((_LABEL_W, 6), "real", fill=(0, 0, 0), font=font)
    draw.text((tile_box(0, 0, True, n_real, thumb)[0], 6), "synthetic", fill=(0, 0, 0), font=font)
    for row, c in enumerate(classes):
        y = tile_box(row, 0, False, n_real, thumb)[1]
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        draw.text((6, y + thumb // 2 - 6), f"{c}: {name}"[:30], fill=(0, 0, 0), font=font)
        for is_syn, n, imgs in ((False, n_real, real.get(c, [])), (True, n_syn, synthetic.get(c, []))):
            for k in range(n):
                box = tile_box(row, k, is_syn, n_real, thumb)
                if k < len(imgs):
                    canvas.paste(_thumb(imgs[k], thumb), box[:2])
                else:
                    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=_EMPTY)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_durably(Path(path), buf.getvalue())
    return Path(path)
