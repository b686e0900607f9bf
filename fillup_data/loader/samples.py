"""The samples of one shard, checked against what the manifest says the shard holds.

A tar cut short ends quietly in Python's stream reader (no error, just fewer members), and an
empty tar yields nothing at all: without the count check a truncated download loses samples
silently, and a training reader whose shards yield nothing re-opens them forever.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any, Iterator

from PIL import Image
from urllib3.exceptions import HTTPError as Urllib3Error
from webdataset.tariterators import group_by_keys, tar_file_expander

from fillup_data.errors import FillupError
from fillup_data.loader.dealing import ReadPart
from fillup_data.loader.transport import open_shard

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# what a damaged tar or a dropped connection raises while the body is read
_READ_ERRORS = (tarfile.TarError, OSError, Urllib3Error)


def read_part(part: ReadPart) -> Iterator[dict[str, Any]]:
    """The samples of ``part`` (every ``stride``-th of those the shard's filter keeps), reading the whole
    shard; once the shard is read to its end, its sample count must be the manifest's, and every key
    the filter keeps must have been in it."""
    shard = part.shard
    stream = open_shard(shard)
    count = kept = 0
    try:
        files = tar_file_expander([{"url": shard.url, "stream": stream}])
        try:
            for i, sample in enumerate(group_by_keys(files)):
                count = i + 1
                if shard.keep is not None and sample.get("__key__") not in shard.keep:
                    continue
                if kept % part.stride == part.offset:
                    yield sample
                kept += 1
        except _READ_ERRORS as err:
            raise FillupError(
                f"{shard.url}: cannot read shard {shard.path} after {count} samples ({_reason(err)}); the file is "
                "damaged or the connection dropped: re-download or rebuild it"
            ) from None
    finally:
        stream.close()
    if count != shard.num_samples:
        raise FillupError(
            f"{shard.url}: shard {shard.path} holds {count} samples, its manifest says {shard.num_samples}; "
            "the shard is truncated or empty, or does not belong to this manifest: re-download or rebuild it"
        )
    if kept != shard.num_kept:
        raise FillupError(
            f"{shard.url}: shard {shard.path} holds {kept} of the {shard.num_kept} samples index.parquet keeps "
            "for it; the index is not this build's: re-download the build or rebuild it"
        )


def _reason(err: Exception) -> str:
    """The error's own message, without the stream objects webdataset appends to its arguments."""
    first = str(err.args[0]) if err.args else ""
    return f"{type(err).__name__}: {first.split(' @ ')[0]}"


def decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(ext)
        if data is not None:
            try:
                return Image.open(io.BytesIO(data)).convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise FillupError(
                    f"{sample.get('__url__')}: sample {sample.get('__key__')} has an undecodable .{ext} ({err}); "
                    "the shard is damaged: re-download or rebuild it"
                ) from None
    raise FillupError(
        f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image member "
        f"({', '.join(IMAGE_EXTENSIONS)}); members: {sorted(k for k in sample if not k.startswith('__'))}"
    )
