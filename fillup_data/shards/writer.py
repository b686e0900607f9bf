"""Reproducible WebDataset tar shards.

Same samples in, same bytes out: fixed mtime/owner/mode, members sorted within a sample, USTAR
headers, images re-encoded with fixed settings.  A shard is written under ``NAME.tar.PID-RANDOM@HOST.tmp``
(unique: two writers never share a temporary file), fsynced and renamed only when complete, so a
killed build never leaves a half shard under the real name.  The writer
records each member's byte offset and size so ``index.parquet`` can point straight at any sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fillup_data.errors import FillupError
from fillup_data.recipe import ShardsConfig
from fillup_data.schema.sample import validate
from fillup_data.state import fsync_dir, process_gone_on_this_host, temp_writer, unique_temp_path

# 2020-01-01T00:00:00Z: a fixed, plausible timestamp (webdataset's TarWriter would stamp "now").
FIXED_MTIME = 1577836800

def prepare_image(img: Image.Image, cfg: ShardsConfig) -> Image.Image:
    if img.mode != "RGB":
        img = img.convert("RGB")
    if cfg.resize_short_side:
        w, h = img.size
        s = cfg.resize_short_side / min(w, h)
        if s < 1.0:  # never upsample
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=None)
    return img


def encode_image(img: Image.Image, cfg: ShardsConfig) -> bytes:
    img = prepare_image(img, cfg)
    buf = io.BytesIO()
    if cfg.image_format == "jpg":
        img.save(buf, format="JPEG", quality=cfg.quality)
    elif cfg.image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="WEBP", quality=cfg.quality, method=4, lossless=cfg.quality == 100)
    return buf.getvalue()


@dataclass
class MemberRecord:
    key: str
    offset: int  # byte offset of the sample's first header in the tar
    size: int  # bytes from that header to the end of the sample's last member
    image_offset: int  # byte offset of the image data
    image_size: int


class ShardWriter:
    """Write one shard; ``close()`` renames it into place and returns (num_bytes, sha256)."""

    def __init__(self, path: Path, image_ext: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = unique_temp_path(self.path)
        self.image_ext = image_ext
        self._fh = open(self.tmp, "xb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.records: list[MemberRecord] = []
        self._keys: set[str] = set()

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = FIXED_MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = len(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return start, start + header

    def write(self, key: str, label: int, image: bytes, metadata: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits keys at the first dot)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path.name}")
        meta = _metadata_bytes(key, validate(metadata, f"sample {key} ({self.path.name})"))
        self._keys.add(key)
        # members sorted by name: KEY.cls < KEY.jpg < KEY.json (png/webp also sort before json)
        members = sorted([(f"{key}.cls", str(int(label)).encode()), (f"{key}.{self.image_ext}", image),
                          (f"{key}.json", meta)])
        first = None
        img_off = 0
        for name, data in members:
            start, data_off = self._add(name, data)
            first = start if first is None else first
            if name.endswith("." + self.image_ext):
                img_off = data_off
        self.records.append(MemberRecord(key, first, self._tar.offset - first, img_off, len(image)))

    def close(self) -> tuple[int, str]:
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path.stat().st_size, sha256_file(self.path)

    def abort(self) -> None:
        try:
            self._tar.close()
            self._fh.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _metadata_bytes(key: str, meta: dict) -> bytes:
    """The sample's ``.json`` member.  A string that is not valid Unicode (a file name with bytes in
    another encoding, as ``os.listdir`` returns it) is a FillupError naming the sample and field."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        field = next(k for k, v in meta.items() if isinstance(v, str) and not encodes_as_utf8(v))
        shown = show_undecodable(meta[field])
        raise FillupError(
            f"sample {key}: metadata {field!r} = '{shown}' is not valid UTF-8 (a file name in another "
            "encoding?): rename the file to UTF-8 (e.g. with convmv) and rerun"
        ) from None


def encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes kept by surrogateescape
        return False
    return True


def show_undecodable(text: str) -> str:
    """``text`` with the bytes that were not UTF-8 written as ``\\xNN``, as the file system holds them."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that did not come from bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def remove_stale_temps(folder: Path, idle_seconds: float | None = None) -> list[str]:
    """Delete the temporary shard files a killed build or worker left in ``folder``.  Without
    ``idle_seconds`` only safe while no other writer can be using them (this process holds the build
    lock and its workers are done); with it, only temps not written to for that long go (a live writer
    streams into its temp).  Returns their names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = None if idle_seconds is None else time.time() - idle_seconds

    def dead(p: Path) -> bool:
        if cutoff is None or p.stat().st_mtime < cutoff:
            return True
        writer = temp_writer(p.name)  # its writer ran here and is gone: no need to wait for the lease
        return writer is not None and process_gone_on_this_host(*writer)

    stale = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".tmp") and ".tar." in p.name
                   and dead(p))
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
