"""What every long-tailed source provides: class names, items per split, and image loading.

Loading never raises a bare PIL/OS error: a bad image becomes ``ImageLoadError`` with one of a few
reasons (missing, empty, truncated, undecodable), so the build can skip it, count it and report it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SKIP_REASONS = ("missing", "empty", "truncated", "undecodable")


class ImageLoadError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceItem:
    """One real image: its label, where it came from, and how to load it."""

    split: str
    label: int
    source_path: str  # as the user knows it: relative path, row id, or demo id
    locator: str  # how the source loads it: absolute path, row index, ...
    where: str = ""  # "file:line" for items from a list file, for error messages


class Source:
    """Base class; subclasses fill ``class_names`` and implement ``items`` and ``load``."""

    kind = "base"
    #: False where images are drawn by code and cannot be broken (skip the verification pass)
    needs_verification = True

    def __init__(self) -> None:
        self.class_names: list[str] = []

    def splits(self) -> list[str]:
        return ["train"]

    def items(self, split: str) -> list[SourceItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, item: SourceItem) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError


def decode_image_bytes(data: bytes, what: str) -> Image.Image:
    """Decode fully (so truncation shows now), EXIF-transpose and convert to RGB."""
    if not data:
        raise ImageLoadError("empty", what)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as err:
        raise ImageLoadError("undecodable", f"{what}: {err}") from None
    except OSError as err:
        reason = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise ImageLoadError(reason, f"{what}: {err}") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError("undecodable", f"{what}: {err}") from None
    return to_rgb(img)


def load_image_file(path: Path) -> Image.Image:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageLoadError("missing", str(path)) from None
    except IsADirectoryError:
        raise ImageLoadError("undecodable", f"{path} is a directory") from None
    except OSError as err:
        raise ImageLoadError("missing", f"{path}: {err}") from None
    return decode_image_bytes(data, str(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; transparency composited on white, not on black."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the image
        pass
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img
