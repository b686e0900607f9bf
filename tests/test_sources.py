import pytest
from PIL import Image

from fillup_data import world
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
