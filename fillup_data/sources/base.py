"""What every long-tailed source provides: class names, items per split, and image loading.

Loading never raises a bare PIL/OS error: a bad image becomes ``ImageLoadError`` with one of the
``SKIP_REASONS``, so the build can skip it, count it and report it.  File-backed sources read only
regular files inside their root (no ``..``, no absolute paths, no symlinks out, no FIFOs or devices),
at most ``MAX_IMAGE_BYTES`` each, and decode only the ``ACCEPTED_FORMATS``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

# A truncated file must fail loudly, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SKIP_REASONS = (
    "missing",  # the file does not exist
    "empty",  # zero bytes
    "truncated",  # the decoder ran out of data
    "undecodable",  # not an image, a format we do not accept, or any decoder error
    "unsupported",  # decodes, but its pixels cannot be turned into RGB faithfully (e.g. float outside 0..255)
    "outside_root",  # absolute path, '..' or a symlink that leaves the source root
    "not_a_file",  # a directory, FIFO, device or socket
    "too_large",  # more than MAX_IMAGE_BYTES
    "duplicate",  # a list line naming an image already listed in the same split
)

#: Formats an image dataset holds.  Everything else Pillow can open (DDS, IM, PSD, EPS via Ghostscript,
#: ICO, SGI, ...) is refused: a file named .jpg that is one of those is a mistake, not a photo.
#: (Multi-picture JPEGs from phones, MPO, open through the JPEG entry.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

#: No real photo in ImageNet / Places / iNaturalist comes near this; a file above it is refused unread.
MAX_IMAGE_BYTES = 64 * 1024 * 1024

_SRGB = ImageCms.createProfile("sRGB")


class ImageLoadError(Exception):
    def __init__(self, reason: str, detail: str = "", state: "FileState | None" = None):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.state = state  # what was on disk, when the file could be read


@dataclass(frozen=True)
class FileState:
    """What an image file was when indexed: enough to tell on resume whether it changed."""

    size: int
    mtime_ns: int
    sha256: str = ""  # "" when the file was not read (too large)

    def to_json(self) -> list:
        return [self.size, self.mtime_ns, self.sha256]

    @classmethod
    def from_json(cls, data) -> "FileState | None":
        return None if data is None else cls(int(data[0]), int(data[1]), str(data[2]))


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One real image: its label, where it came from, and how to load it."""

    split: str
    label: int
    source_path: str  # as the user knows it: relative path, row id, or demo id
    locator: str  # how the source loads it: path relative to the source root, row index, ...
    where: str = ""  # "file:line" for items from a list file, for error messages


class Source:
    """Base class; subclasses fill ``class_names`` and implement ``items`` and ``load``."""

    kind = "base"
    #: False where images are drawn by code and cannot be broken (skip the verification pass)
    needs_verification = True
    #: True where items are files under ``root`` (their state is recorded for resume checks)
    has_files = False
    root: Path | None = None

    def __init__(self) -> None:
        self.class_names: list[str] = []

    def splits(self) -> list[str]:
        return ["train"]

    def items(self, split: str) -> list[SourceItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, item: SourceItem) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def verify(self, item: SourceItem) -> FileState | None:
        """Decode ``item`` fully; return what its file was (None where it is not a file)."""
        self.load(item)
        return None

    def list_files(self) -> dict[str, Path]:
        """The files that define the listing (list files, class names), by the name the recipe gives."""
        return {}

    def listing_digest(self) -> dict:
        """What identifies a listing that is not made of files (a dataset's rows and labels)."""
        return {}

    def file_stat(self, item_locator: str) -> FileState | None:
        """(size, mtime) of an item's file now, or None; only file-backed sources have files."""
        return None

    def file_stat_quick(self, item_locator: str) -> FileState | None:
        """Like ``file_stat`` in one ``stat`` call, following links without checking where they lead:
        for telling quickly that a file is as recorded (``file_stat`` decides the rest)."""
        return self.file_stat(item_locator)

    def file_read(self, item_locator: str) -> FileState | None:
        """Like ``file_stat`` with the content hash (reads the file, does not decode it)."""
        return None


class FileSource(Source):
    """A source whose items are image files under ``root``, located by their relative path.

    The index stores relative paths, so a root that moves (with ``source.root`` pointed at it) still
    resolves every item."""

    has_files = True

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def load(self, item: SourceItem) -> Image.Image:
        return load_image_file(self.root, item.locator)

    def verify(self, item: SourceItem) -> FileState | None:
        data, state = read_image_file(self.root, item.locator)
        try:
            decode_image_bytes(data, item.source_path)
        except ImageLoadError as err:
            err.state = state
            raise
        return state

    def file_stat(self, item_locator: str) -> FileState | None:
        try:
            real = resolve_in_root(self.root, item_locator)
            st = os.stat(real)
        except (ImageLoadError, OSError):
            return None
        return FileState(st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None

    def file_stat_quick(self, item_locator: str) -> FileState | None:
        try:
            st = os.stat(os.path.join(self.root, item_locator))
        except (OSError, ValueError):
            return None
        return FileState(st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None

    def file_read(self, item_locator: str) -> FileState | None:
        try:
            return read_image_file(self.root, item_locator)[1]
        except ImageLoadError as err:
            return err.state


def resolve_in_root(root: Path, rel: str) -> str:
    """The real path of ``root/rel``; ImageLoadError("outside_root") where it leaves the root."""
    if os.path.isabs(rel):
        raise ImageLoadError("outside_root", f"{rel}: absolute path; list paths relative to source.root")
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, rel))
    if os.path.commonpath([root_real, real]) != root_real:
        raise ImageLoadError(
            "outside_root", f"{rel}: resolves to {real}, outside source.root {root_real} ('..' or a symlink)"
        )
    return real


def read_image_file(root: Path, rel: str, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, FileState]:
    """Read a regular file inside ``root``: never follows a link out, never blocks on a FIFO."""
    real = resolve_in_root(root, rel)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging the build.
        # O_NOFOLLOW: a symlink swapped in after resolving is refused, not followed.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageLoadError("missing", rel) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageLoadError("outside_root", f"{rel}: became a symlink while reading") from None
        raise ImageLoadError("missing", f"{rel}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, device or socket)"
            raise ImageLoadError("not_a_file", f"{rel} is {kind}")
        if st.st_size > max_bytes:
            raise ImageLoadError(
                "too_large", f"{rel}: {st.st_size:,} bytes, more than the {max_bytes:,}-byte limit",
                FileState(st.st_size, st.st_mtime_ns),
            )
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise ImageLoadError("missing", f"{rel}: {err.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    state = FileState(len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())
    if len(data) > max_bytes:
        raise ImageLoadError("too_large", f"{rel}: grew past the {max_bytes:,}-byte limit while reading", state)
    return data, state


def load_image_file(root: Path, rel: str) -> Image.Image:
    data, _ = read_image_file(root, rel)
    return decode_image_bytes(data, rel)


def decode_image_bytes(data: bytes, what: str) -> Image.Image:
    """Decode fully (so truncation shows now), EXIF-transpose and convert to RGB.

    Any decoder failure is a skip with a reason, never an exception out of here: Pillow's plugins
    raise OSError, ValueError, SyntaxError, TypeError, NotImplementedError, struct.error, ...
    """
    if not data:
        raise ImageLoadError("empty", what)
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        img.load()
    except Image.UnidentifiedImageError:
        raise ImageLoadError(
            "undecodable", f"{what}: not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except OSError as err:
        reason = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise ImageLoadError(reason, f"{what}: {err}") from None
    except Exception as err:  # noqa: BLE001 - every decoder error means "this file is not usable"
        raise ImageLoadError("undecodable", f"{what}: {type(err).__name__}: {err}") from None
    try:
        return to_rgb(img)
    except ImageLoadError as err:
        raise ImageLoadError(err.reason, f"{what}: {err.detail}") from None
    except Exception as err:  # noqa: BLE001
        raise ImageLoadError("undecodable", f"{what}: cannot convert mode {img.mode} to RGB: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied; colour profile applied (to sRGB); high bit depths scaled to 8 bits;
    transparency of every kind composited on white, not on black."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        pass
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.mode in ("RGBa", "La"):
        img = img.convert(img.mode[:-1] + "A")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(_apply_profile(rgba.convert("RGB"), img.info), mask=rgba.getchannel("A"))
        return canvas
    return _apply_profile(img, img.info)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8 bits.  Pillow's own convert clips (I;16 32768 -> 255: white).

    Integer images are read as 16-bit (0..65535, what PNG and TIFF store); a float image as 0..1
    when its values lie there, else 0..255; anything else has no agreed range and is refused."""
    a = np.asarray(img.convert("F") if img.mode.startswith("I;16") else img, dtype=np.float64)
    if img.mode == "F":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
            raise ImageLoadError(
                "unsupported", f"float pixels in {a.min():g}..{a.max():g} have no agreed range (accepted: 0..1 or 0..255)"
            )
        scaled = a * 255.0 if a.max() <= 1.0 else a
    else:
        if a.min() < 0 or a.max() > 65535:
            raise ImageLoadError("unsupported", f"32-bit integer pixels in {a.min():g}..{a.max():g} (accepted: 0..65535)")
        scaled = a / 257.0
    out = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    out.info = {k: v for k, v in img.info.items() if k == "icc_profile"}
    return out


def _apply_profile(img: Image.Image, info: dict) -> Image.Image:
    """To sRGB through the embedded ICC profile (Adobe RGB, Display P3, CMYK press profiles...).

    A profile lcms cannot read or apply falls back to Pillow's plain conversion, as a viewer without
    colour management would show it: a bad profile should not cost the image."""
    profile = info.get("icc_profile")
    if img.mode not in ("RGB", "L", "CMYK"):  # palette, 1-bit, YCbCr, LAB: through Pillow to RGB first
        img = img.convert("RGB")
    if profile:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGB")
        except Exception:  # noqa: BLE001 - PyCMSError, OSError, ValueError from a malformed profile
            pass
    return img if img.mode == "RGB" else img.convert("RGB")
