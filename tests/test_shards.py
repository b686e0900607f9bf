import io
import json
import tarfile

import pytest
from PIL import Image

from fillup_data.recipe import ShardsConfig
from fillup_data.schema.sample import METADATA_KEYS, real_metadata
from fillup_data.schema.sample import validate as check_metadata
from fillup_data.shards.writer import ShardWriter, encode_image


def _img(c=(10, 20, 30), size=(20, 12)):
    return Image.new("RGB", size, c)


def _write(path, n=3, cfg=ShardsConfig()):
    w = ShardWriter(path, cfg.image_format)
    for i in range(n):
        w.write(f"k-{i:03d}", i, encode_image(_img((i * 40, 5, 5)), cfg), real_metadata(i, f"c{i}", f"src/{i}.jpg"))
    return w, w.close()


def test_reproducible_bytes_and_atomic_rename(tmp_path):
    _, (n1, sha1) = _write(tmp_path / "a" / "s.tar")
    _, (n2, sha2) = _write(tmp_path / "b" / "s.tar")
    assert sha1 == sha2 and n1 == n2
    assert not list(tmp_path.rglob("*.tmp"))
    with tarfile.open(tmp_path / "a" / "s.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["k-000.cls", "k-000.jpg", "k-000.json"]
        assert {m.mtime for m in members} == {1577836800} and {m.uid for m in members} == {0}


def test_offsets_point_at_members(tmp_path):
    w, _ = _write(tmp_path / "s.tar", n=4)
    data = (tmp_path / "s.tar").read_bytes()
    for i, rec in enumerate(w.records):
        img = Image.open(io.BytesIO(data[rec.image_offset: rec.image_offset + rec.image_size]))
        assert img.size == (20, 12)
        # the sample span is a self-contained tar fragment holding the three members
        frag = data[rec.offset: rec.offset + rec.size] + b"\0" * 1024
        with tarfile.open(fileobj=io.BytesIO(frag)) as t:
            names = t.getnames()
            meta = json.loads(t.extractfile(f"k-{i:03d}.json").read())
        assert names == [f"k-{i:03d}.cls", f"k-{i:03d}.jpg", f"k-{i:03d}.json"]
        assert meta["label"] == i and list(meta) == sorted(METADATA_KEYS)


def test_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "s.tar", "jpg")
    w.write("a", 0, b"x", real_metadata(0, "c", ""))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_bad_keys_and_metadata_rejected(tmp_path):
    w = ShardWriter(tmp_path / "s.tar", "jpg")
    with pytest.raises(ValueError, match="must not contain"):
        w.write("a.b", 0, b"x", real_metadata(0, "c", ""))
    w.write("a", 0, b"x", real_metadata(0, "c", ""))
    with pytest.raises(ValueError, match="duplicate"):
        w.write("a", 0, b"x", real_metadata(0, "c", ""))
    w.abort()
    meta = real_metadata(0, "c", "")
    meta["prompt"] = None
    with pytest.raises(ValueError, match="null"):
        check_metadata(meta)
    with pytest.raises(ValueError, match="missing"):
        check_metadata({k: v for k, v in real_metadata(0, "c", "").items() if k != "seed"})


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_encode_formats_and_resize(fmt):
    cfg = ShardsConfig(image_format=fmt, resize_short_side=8)
    data = encode_image(_img(size=(40, 24)), cfg)
    img = Image.open(io.BytesIO(data))
    assert img.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt] and img.size == (13, 8)
    assert encode_image(_img(size=(40, 24)), cfg) == data  # deterministic
    small = Image.open(io.BytesIO(encode_image(_img(size=(4, 4)), cfg)))
    assert small.size == (4, 4)  # never upsampled
