import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fillup_data.demo import world
from fillup_data.errors import SourceError
from fillup_data.index import build_index
from fillup_data.recipe import parse_recipe
from fillup_data.sources import ImageLoadError, apply_imbalance, longtail_sizes, open_source
from fillup_data.sources.base import SourceItem, load_image_file
from tests.helpers import split_file_recipe, write_split_file_dataset


def test_demo_source_is_long_tailed_balanced_test_and_deterministic():
    r = parse_recipe({"name": "d", "source": {"kind": "demo", "num_classes": 12, "max_images": 100, "min_images": 5}})
    src = open_source(r)
    assert len(set(src.class_names)) == 12
    train = src.items("train")
    counts = [sum(1 for it in train if it.label == c) for c in range(12)]
    assert counts[0] == 100 and counts[-1] == 5 and counts == sorted(counts, reverse=True)
    test = src.items("test")
    assert all(sum(1 for it in test if it.label == c) == 20 for c in range(12))
    a, b = src.load(train[3]), open_source(r).load(train[3])
    assert a.tobytes() == b.tobytes() and a.size == (32, 32) and a.mode == "RGB"
    assert src.load(train[3]).tobytes() != src.load(train[4]).tobytes()


def test_world_classes_are_distinct_pairs():
    pairs = world.world_classes(64)
    assert len(set(pairs)) == 64


def test_cifar_lt_sizes():
    # Cao et al.: n_i = floor(n_max * (1/IF)^(i/(C-1)))
    sizes = longtail_sizes(100, 100, 500)
    assert sizes[0] == 500 and sizes[-1] == 5 and sizes[50] == int(500 * 0.01 ** (50 / 99))
    items = [SourceItem("train", c, f"{c}/{i}", "") for c in range(3) for i in range(10)]
    kept = apply_imbalance(items, 3, 10.0, None)
    assert [sum(1 for it in kept if it.label == c) for c in range(3)] == [10, 3, 1]
    assert [it.source_path for it in kept if it.label == 1] == ["1/0", "1/1", "1/2"]  # first n_i, source order


def test_split_file_malformed_line_names_file_and_line(tmp_path):
    paths = write_split_file_dataset(tmp_path, [3, 2])
    text = paths["train"].read_text().splitlines()
    text.insert(2, "train/only_a_path.jpg")
    paths["train"].write_text("\n".join(text) + "\n")
    with pytest.raises(SourceError, match=r"train.txt:3: expected 'relative/path.jpg label'"):
        open_source(parse_recipe(split_file_recipe(tmp_path)))


def test_split_file_label_outside_class_list(tmp_path):
    paths = write_split_file_dataset(tmp_path, [3, 2])
    with open(paths["train"], "a") as f:
        f.write("train/x.jpg 7\n")
    with pytest.raises(SourceError, match=r"train.txt:6: label 7 is outside the class list \(allowed 0..1\)"):
        open_source(parse_recipe(split_file_recipe(tmp_path)))


def test_split_file_without_class_names_uses_numbers(tmp_path):
    write_split_file_dataset(tmp_path, [2, 2, 1])
    rec = split_file_recipe(tmp_path)
    del rec["source"]["class_names"]
    src = open_source(parse_recipe(rec))
    assert src.class_names == ["0", "1", "2"]


def test_bad_images_get_reasons(tmp_path):
    ok = tmp_path / "ok.jpg"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(ok)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.jpg"
    Image.new("RGB", (64, 64), (200, 2, 3)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:300])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    assert load_image_file(tmp_path, "ok.jpg").size == (8, 8)
    for path, reason in ((tmp_path / "nope.jpg", "missing"), (empty, "empty"), (trunc, "truncated"), (junk, "undecodable")):
        with pytest.raises(ImageLoadError) as e:
            load_image_file(tmp_path, path.name)
        assert e.value.reason == reason, path


def test_exif_rotation_and_rgb(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert load_image_file(tmp_path, p.name).size == (20, 40)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    out = load_image_file(tmp_path, "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # transparency on white


def test_image_folder_source(tmp_path):
    for name, n in (("cat", 3), ("dog", 1)):
        d = tmp_path / "train" / name
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(d / f"{i}.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    r = parse_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(tmp_path)},
                      "generator": {"strategy": "none"}})
    idx = build_index(r)
    assert idx.class_names == ["cat", "dog"] and idx.counts("train") == [3, 1]


def test_hf_dataset_source(tmp_path):
    import datasets

    imgs = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict(
        {"picture": imgs, "y": [0, 0, 0, 1, 1, 2]},
        features=datasets.Features({"picture": datasets.Image(),
                                    "y": datasets.ClassLabel(names=["a", "b", "c"])}),
    )
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "ds"))
    r = parse_recipe({"name": "h", "source": {"kind": "hf_dataset", "path": str(tmp_path / "ds"), "test_split": "test",
                                              "image_column": "picture", "label_column": "y"}})
    idx = build_index(r)
    assert idx.class_names == ["a", "b", "c"] and idx.counts("train") == [3, 2, 1] and idx.counts("test") == [3, 2, 1]
    src = open_source(r)
    assert src.load(idx.items["train"][1]).getpixel((0, 0)) == (20, 0, 0)
    bad = parse_recipe({"name": "h", "source": {"kind": "hf_dataset", "path": str(tmp_path / "ds"), "label_column": "z",
                                                "image_column": "picture"}})
    with pytest.raises(SourceError, match="column 'z'"):
        open_source(bad)


def test_class_with_no_readable_images_stops_before_work(tmp_path):
    write_split_file_dataset(tmp_path, [3, 2, 2])
    for p in (tmp_path / "train" / "n00000001").iterdir():
        p.write_bytes(b"")
    with pytest.raises(SourceError) as e:
        build_index(parse_recipe(split_file_recipe(tmp_path)))
    assert "class 1 'class 1'" in str(e.value) and "2 empty" in str(e.value)


# --------------------------------------------------------------------------- odd files (issue 10.7, 10.8)
def _build_folder(tmp_path, files: dict) -> "object":
    """An image_folder source with one class 'a' of real images plus ``files`` in class 'b'."""
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b" / "ok.png")
    for name, make in files.items():
        make(tmp_path / "train" / "b" / name)
    r = parse_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(tmp_path)},
                      "generator": {"strategy": "none"}})
    return build_index(r)


def test_files_in_formats_a_dataset_does_not_hold_are_skipped_not_fatal(tmp_path):
    def save_as(fmt, mode):
        return lambda p: Image.new(mode, (8, 8), 7).save(p, format=fmt)

    idx = _build_folder(tmp_path, {"dds.jpg": save_as("DDS", "RGB"), "im.jpg": save_as("IM", "I;16B"),
                                   "sgi.png": save_as("SGI", "L"), "tga.jpg": save_as("TGA", "RGB")})
    reasons = {s["source_path"]: (s["reason"], s["detail"]) for s in idx.skipped}
    assert set(reasons) == {f"train/b/{n}" for n in ("dds.jpg", "im.jpg", "sgi.png", "tga.jpg")}
    assert all(r == "undecodable" and "not an image in an accepted format" in d for r, d in reasons.values())
    assert idx.counts("train") == [1, 1]


def _png_bytes(img: Image.Image, **kw) -> Path:
    import io

    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _decode(img: Image.Image, **kw) -> Image.Image:
    from fillup_data.sources.base import decode_image_bytes

    return decode_image_bytes(_png_bytes(img, **kw), "x")


def test_high_bit_depth_images_keep_their_grey_level():
    import numpy as np

    png16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # 16-bit greyscale PNG: mode I;16
    assert _decode(png16).getpixel((0, 0)) == (128, 128, 128)
    png16_black = Image.fromarray(np.full((4, 4), 0, np.uint16))
    assert _decode(png16_black).getpixel((0, 0)) == (0, 0, 0)
    tif32 = Image.fromarray(np.full((4, 4), 65535, np.int32))  # 32-bit integer TIFF: mode I
    assert _decode(tif32, format="TIFF").getpixel((0, 0)) == (255, 255, 255)
    unit_float = Image.fromarray(np.full((4, 4), 0.5, np.float32))  # float TIFF in 0..1: mode F
    assert _decode(unit_float, format="TIFF").getpixel((0, 0)) == (128, 128, 128)
    byte_float = Image.fromarray(np.full((4, 4), 200.0, np.float32))  # float TIFF in 0..255
    assert _decode(byte_float, format="TIFF").getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(ImageLoadError) as e:
        _decode(Image.fromarray(np.full((4, 4), -3.0, np.float32)), format="TIFF")
    assert e.value.reason == "unsupported" and "no agreed range" in e.value.detail


def test_every_kind_of_transparency_lands_on_white():
    grey_trns = _decode(Image.new("L", (4, 4), 0), transparency=0)  # greyscale PNG with a tRNS chunk
    rgb_trns = _decode(Image.new("RGB", (4, 4), (0, 0, 0)), transparency=(0, 0, 0))
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal_alpha = _decode(pal, transparency=bytes([255, 0]))  # palette alpha table: entry 1 fully clear
    la = _decode(Image.new("LA", (4, 4), (0, 0)))
    half = _decode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    pa_tiff = Image.new("PA", (4, 4), (0, 0))
    assert grey_trns.getpixel((0, 0)) == rgb_trns.getpixel((0, 0)) == (255, 255, 255)
    assert pal_alpha.getpixel((0, 0)) == la.getpixel((0, 0)) == (255, 255, 255)
    assert _decode(pa_tiff, format="TIFF").getpixel((0, 0)) == (255, 255, 255)
    assert half.getpixel((0, 0)) == (127, 127, 127)  # blended, not thresholded


def _swapped_primaries_profile() -> bytes:
    """A real ICC profile: lcms's sRGB with the red and blue colorant tags swapped, so that the
    file's (255, 0, 0) means sRGB blue.  A loader that ignores the profile gets red."""
    import io
    import struct

    from PIL import ImageCms

    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    tags = {bytes(data[132 + 12 * i: 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, b = tags[b"rXYZ"], tags[b"bXYZ"]
    data[r + 4: r + 12], data[b + 4: b + 12] = data[b + 4: b + 12], data[r + 4: r + 12]
    ImageCms.ImageCmsProfile(io.BytesIO(bytes(data)))  # still a valid profile
    return bytes(data)


def test_colour_profiles_are_applied_and_cmyk_converted():
    img = _decode(Image.new("RGB", (4, 4), (255, 0, 0)), format="JPEG", quality=100,
                  icc_profile=_swapped_primaries_profile())
    r, g, b = img.getpixel((0, 0))
    assert b > 200 and r < 60, (r, g, b)
    cmyk = _decode(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), format="JPEG", quality=100)  # pure cyan ink
    r, g, b = cmyk.getpixel((0, 0))
    assert r < 10 and g > 245 and b > 245
    # a profile lcms cannot read costs the colour management, not the image
    broken = _decode(Image.new("RGB", (4, 4), (255, 0, 0)), format="PNG", icc_profile=b"not a profile")
    assert broken.getpixel((0, 0)) == (255, 0, 0)


# --------------------------------------------------------------------------- paths that leave the root (10.10)
def test_paths_outside_the_root_fifos_devices_and_huge_files_are_skipped(tmp_path):
    import signal

    root = tmp_path / "data"
    write_split_file_dataset(root, [3, 2], test_per_class=0)
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (8, 8)).save(secret)
    d = root / "train" / "n00000000"
    os.symlink(secret, d / "link_out.jpg")
    os.symlink("/dev/zero", d / "zero.jpg")
    os.mkfifo(d / "fifo.jpg")
    with open(d / "huge.jpg", "wb") as f:  # sparse: costs no disk
        f.truncate(64 * 1024 * 1024 + 1)
    os.symlink(d / "img_0.jpg", d / "link_in.jpg")  # a link that stays inside the root is fine
    extra = ["../secret.jpg 0", f"{secret} 0", "train/n00000000/link_out.jpg 0", "train/n00000000/zero.jpg 0",
             "/dev/zero 1", "train/n00000000/fifo.jpg 1", "train/n00000000/huge.jpg 1",
             "train/n00000000/link_in.jpg 0", "train/n00000000 1"]
    with open(root / "train.txt", "a") as f:
        f.write("\n".join(extra) + "\n")
    rec = split_file_recipe(root)
    del rec["source"]["test"]

    def hung(*_):
        raise AssertionError("reading a FIFO blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        idx = build_index(parse_recipe(rec))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    reasons = {s["source_path"]: s["reason"] for s in idx.skipped}
    assert reasons == {
        "../secret.jpg": "outside_root", str(secret): "outside_root", "train/n00000000/link_out.jpg": "outside_root",
        "train/n00000000/zero.jpg": "outside_root", "/dev/zero": "outside_root",
        "train/n00000000/fifo.jpg": "not_a_file", "train/n00000000/huge.jpg": "too_large",
        "train/n00000000": "not_a_file",
    }
    assert idx.counts("train") == [4, 2]  # 3 + the link inside the root; 2
    where = {s["source_path"]: s["where"] for s in idx.skipped}
    assert where["../secret.jpg"] == "train.txt:6"


def test_hf_dataset_row_naming_a_local_file_outside_the_dataset_is_refused(tmp_path):
    """A dataset's parquet rows may hold an image as ``{"path": ..., "bytes": None}``: a path inside
    the dataset folder is read, any other local file is refused, not read."""
    import datasets

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    Image.new("RGB", (8, 8), (4, 5, 6)).save(folder / "ok.png")
    ds = datasets.Dataset.from_dict(
        {"image": [{"path": str(secret), "bytes": None}, {"path": str(folder / "ok.png"), "bytes": None}],
         "label": [0, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}))
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    src = open_source(parse_recipe({"name": "h", "source": {"kind": "hf_dataset", "path": str(folder)}}))
    items = src.items("train")
    with pytest.raises(ImageLoadError) as e:
        src.load(items[0])
    assert e.value.reason == "outside_root" and "outside the dataset folder" in e.value.detail
    assert src.load(items[1]).getpixel((0, 0)) == (4, 5, 6)


# --------------------------------------------------------------------------- text that is not what it seems (10.9, 10.13)
def test_list_and_class_names_files_that_are_not_utf8_name_file_and_line(tmp_path):
    paths = write_split_file_dataset(tmp_path, [3, 2])
    good = paths["train"].read_bytes()
    paths["train"].write_bytes(good.replace(b"train/n00000000/img_2.jpg", b"train/n00000000/caf\xe9.jpg"))
    with pytest.raises(SourceError, match=r"train.txt:3: split file is not valid UTF-8 \(byte 0xe9 at column 20\)"):
        open_source(parse_recipe(split_file_recipe(tmp_path)))
    paths["train"].write_bytes(good)
    paths["classes"].write_bytes(b"class 0\n\xff\xfeclass 1\n")
    with pytest.raises(SourceError, match=r"classes.txt:2: class_names file is not valid UTF-8"):
        open_source(parse_recipe(split_file_recipe(tmp_path)))


def test_image_folder_names_that_are_not_utf8_stop_at_index_time(tmp_path):
    import subprocess
    import sys

    import yaml

    root = os.fsencode(tmp_path)
    os.makedirs(os.path.join(root, b"train", b"caf\xe9"))
    os.makedirs(os.path.join(root, b"train", b"dog"))
    Image.new("RGB", (8, 8)).save(os.path.join(root, b"train", b"dog", b"0.png").decode("utf-8"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"name": "f", "source": {"kind": "image_folder", "root": str(tmp_path)}, "generator": {"strategy": "none"}}))
    res = subprocess.run([sys.executable, "-m", "fillup_data.cli", "build", str(tmp_path / "r.yaml"), "--out",
                          str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train/caf\\xe9: class folder name is not valid UTF-8; rename it" in res.stderr
    os.rename(os.path.join(root, b"train", b"caf\xe9"), os.path.join(root, b"train", b"cat"))
    os.rename(os.path.join(root, b"train", b"dog", b"0.png"), os.path.join(root, b"train", b"dog", b"\xff.png"))
    with pytest.raises(SourceError, match=r"dog/\\xff.png: image file name is not valid UTF-8"):
        build_index(parse_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(tmp_path)},
                                  "generator": {"strategy": "none"}}))


def test_huge_label_without_class_names_is_an_error_not_an_allocation(tmp_path):
    paths = write_split_file_dataset(tmp_path, [2, 2])
    with open(paths["train"], "a") as f:
        f.write("train/n00000000/img_0.jpg 4000000000\n")
    rec = split_file_recipe(tmp_path)
    del rec["source"]["class_names"]
    with pytest.raises(SourceError, match=r"train.txt:5: label 4000000000 is too large for a source without "
                                          r"class_names \(at most 999,999"):
        open_source(parse_recipe(rec))


def test_byte_order_marks_are_not_part_of_the_first_name_or_path(tmp_path):
    paths = write_split_file_dataset(tmp_path, [2, 2])
    for p in (paths["train"], paths["classes"]):
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())  # what Notepad writes as "UTF-8"
    idx = build_index(parse_recipe(split_file_recipe(tmp_path)))
    assert idx.class_names[0] == "class 0" and idx.counts("train") == [2, 2] and idx.skipped == []


def test_duplicate_list_lines_are_skipped_and_reported_not_counted_twice(tmp_path):
    paths = write_split_file_dataset(tmp_path, [3, 2])
    with open(paths["train"], "a") as f:
        f.write("train/n00000000/img_0.jpg 0\n./train/n00000001/img_1.jpg 0\n")
    idx = build_index(parse_recipe(split_file_recipe(tmp_path)))
    assert idx.counts("train") == [3, 2]
    assert [(s["where"], s["reason"], s["detail"]) for s in idx.skipped] == [
        ("train.txt:6", "duplicate", "train/n00000000/img_0.jpg: already listed at train.txt:1"),
        ("train.txt:7", "duplicate", "./train/n00000001/img_1.jpg: already listed at train.txt:5 with label 1"),
    ]


# --------------------------------------------------------------------------- hf_dataset by id, plain labels (9.8)
def _image_repo(folder: Path, splits: dict) -> None:
    """A dataset repository as on the Hub: imagefolder layout per config, configs in the card."""
    for config, files in splits.items():
        for rel, colour in files.items():
            p = folder / config / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), colour).save(p)
    card = {"configs": [{"config_name": c, "data_dir": c} for c in splits]}
    (folder / "README.md").write_text("---\n" + __import__("yaml").safe_dump(card) + "---\n")


def test_hf_dataset_by_repository_with_config_and_revision(tmp_path, monkeypatch):
    import datasets

    repo = tmp_path / "repo"
    _image_repo(repo, {"small": {"train/cat/0.png": (10, 0, 0), "train/cat/1.png": (20, 0, 0),
                                 "train/dog/0.png": (30, 0, 0)},
                       "large": {f"train/{c}/{i}.png": (i, 0, 0) for c in ("ant", "bee", "cow") for i in range(2)}})
    calls = []
    real_load = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    r = parse_recipe({"name": "h", "source": {"kind": "hf_dataset", "path": str(repo), "name": "small",
                                              "revision": "v1.0"}})
    idx = build_index(r)
    assert calls == [((str(repo), "small"), {"split": "train", "revision": "v1.0"})]
    assert idx.class_names == ["cat", "dog"] and idx.counts("train") == [2, 1] and idx.skipped == []
    src = open_source(r)  # images given as paths inside the repository folder are read
    assert sorted(src.load(it).getpixel((0, 0))[0] for it in idx.items["train"]) == [10, 20, 30]


@pytest.mark.parametrize("labels, names, counts", [
    (["zebra", "ant", "zebra", "moth"], ["ant", "moth", "zebra"], [1, 1, 2]),
    ([10, 2, 2, 10], ["2", "10"], [2, 2]),  # integers sort as numbers, not as text
])
def test_hf_dataset_plain_labels_become_sorted_classes(tmp_path, labels, names, counts):
    import datasets

    imgs = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(labels))]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": imgs, "label": labels}),
                          "test": datasets.Dataset.from_dict({"image": imgs[:1], "label": labels[:1]})}
                         ).save_to_disk(str(tmp_path / "ds"))
    r = parse_recipe({"name": "h", "source": {"kind": "hf_dataset", "path": str(tmp_path / "ds"),
                                              "test_split": "test"}})
    idx = build_index(r)
    assert idx.class_names == names and idx.counts("train") == counts
    assert idx.items["test"][0].label == names.index(str(labels[0]))


def test_hf_dataset_missing_label_names_its_row(tmp_path):
    import datasets

    imgs = [Image.new("RGB", (8, 8)) for _ in range(3)]
    datasets.Dataset.from_dict({"image": imgs, "label": ["a", None, "b"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SourceError, match=r"split 'train' row 1: label None is not an integer or a string"):
        open_source(parse_recipe({"name": "h", "source": {"kind": "hf_dataset", "path": str(tmp_path / "ds")}}))


def test_imbalance_factor_in_a_recipe_shapes_index_and_plan(tmp_path):
    from fillup_data.plan import make_plan

    write_split_file_dataset(tmp_path, [12, 12, 12, 12], test_per_class=1)
    rec = split_file_recipe(tmp_path)
    rec["source"]["imbalance_factor"] = 10
    r = parse_recipe(rec)
    idx = build_index(r)
    # CIFAR-LT: n_i = floor(12 * (1/10)^(i/3)) with n_max = the smallest class (12)
    assert idx.counts("train") == [12, 5, 2, 1] == longtail_sizes(4, 10, 12)
    assert idx.counts("test") == [1, 1, 1, 1]  # the test split stays balanced
    kept = [it.source_path for it in idx.items["train"] if it.label == 1]
    assert kept == [f"train/n00000001/img_{i}.jpg" for i in range(5)]  # the first n_i in list order
    plan = make_plan(r, idx)
    assert [c.real for c in plan.classes] == [12, 5, 2, 1] and [c.test for c in plan.classes] == [1, 1, 1, 1]
    rec["source"]["imbalance_max"] = 10
    assert build_index(parse_recipe(rec)).counts("train") == [10, 4, 2, 1]
