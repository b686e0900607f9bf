"""The index record: a resumed build refuses a source that changed under it, accepts one that only
moved, and treats an unreadable record as "not indexed yet"."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from fillup_data.build import run_build
from fillup_data.errors import SourceError
from fillup_data.index import SourceIndex, build_index
from fillup_data.recipe import parse_recipe
from tests.helpers import split_file_recipe, write_split_file_dataset

QUIET = {"workers": 1, "progress": False, "log": lambda *_: None}


def _cli_build(recipe: dict, out, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "fillup_data.cli", "build", str(path), "--out", str(out), "--quiet"],
                          capture_output=True, text=True)


@pytest.fixture
def indexed(tmp_path):
    """A finished split_file build of a small source, and its recipe."""
    root = tmp_path / "data"
    write_split_file_dataset(root, [5, 3, 2])
    recipe = split_file_recipe(root)
    out = tmp_path / "out"
    run_build(parse_recipe(recipe), out, **QUIET)
    return root, recipe, out


@pytest.mark.parametrize("change, expected", [
    ("list_file", "train.txt changed since the build was indexed"),
    ("delete_image", "1 image(s) missing (e.g. train/n00000001/img_2.jpg)"),
    ("rewrite_image", "1 image(s) changed in size or content (e.g. train/n00000001/img_2.jpg)"),
    ("class_names", "classes.txt changed since the build was indexed"),
])
def test_resume_refuses_a_changed_source_saying_what_changed(indexed, tmp_path, change, expected):
    root, recipe, out = indexed
    image = root / "train" / "n00000001" / "img_2.jpg"
    if change == "list_file":
        lines = (root / "train.txt").read_text().splitlines()
        (root / "train.txt").write_text("\n".join(lines[:-1]) + "\n")
    elif change == "delete_image":
        image.unlink()
    elif change == "rewrite_image":
        Image.new("RGB", (40, 40), (9, 9, 9)).save(image, quality=50)
    else:
        (root / "classes.txt").write_text("zero\none\ntwo\n")
    res = _cli_build(recipe, out, tmp_path)
    assert res.returncode == 2, res.stderr
    assert "source changed since this build was indexed" in res.stderr and expected in res.stderr
    assert "--force" in res.stderr and "Traceback" not in res.stderr


def test_resume_refuses_an_image_added_to_an_image_folder(tmp_path):
    for name, n in (("cat", 3), ("dog", 2)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    recipe = parse_recipe({"name": "f", "source": {"kind": "image_folder", "root": str(tmp_path)},
                           "generator": {"strategy": "none"}})
    run_build(recipe, tmp_path / "out", **QUIET)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "dog" / "9.png")
    with pytest.raises(SourceError, match=r"1 image\(s\) added \(e.g. train/dog/9.png\)"):
        run_build(recipe, tmp_path / "out", **QUIET)


def test_resume_names_a_moved_root_whose_files_are_not_there(indexed, tmp_path):
    root, recipe, out = indexed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("train.txt", "test.txt", "classes.txt"):  # the lists came along, the images did not
        shutil.copy(root / name, elsewhere / name)
    recipe["source"]["root"] = str(elsewhere)
    with pytest.raises(SourceError) as e:
        run_build(parse_recipe(recipe), out, **QUIET)
    assert f"source.root is {elsewhere}" in str(e.value) and f"indexed from {root}" in str(e.value)
    assert "16 of 16 images are missing" in str(e.value)


@pytest.mark.parametrize("how", ["move", "copy_without_times"])
def test_resume_after_the_root_moved_with_its_content(indexed, tmp_path, how):
    root, recipe, out = indexed
    before = json.loads((out / "manifest.json").read_text())["shards"]
    moved = tmp_path / "moved"
    if how == "move":
        shutil.move(root, moved)
    else:  # cp -r: same bytes, new mtimes -> decided by content hash, not by time
        shutil.copytree(root, moved, copy_function=shutil.copy)
        shutil.rmtree(root)
    # a shard that was not finished must now be written from the moved root
    record = sorted((out / ".fillup" / "shards").glob("train-real-*.json"))[0]
    record.unlink()
    recipe["source"]["root"] = str(moved)
    summary = run_build(parse_recipe(recipe), out, **QUIET)
    assert summary.shards_written == 1 and summary.skipped == {}
    after = json.loads((out / "manifest.json").read_text())["shards"]
    assert [(s["path"], s["sha256"]) for s in after] == [(s["path"], s["sha256"]) for s in before]
    index = json.loads((out / ".fillup" / "index.json").read_text())
    assert all(not os.path.isabs(loc or path) for cols in index["items"].values()
               for loc, path in zip(cols["locator"], cols["source_path"]))


@pytest.mark.parametrize("content", [b"", b'{"class_names": ["a"', b"[]", b'{"class_names": [], "items": {}}'])
def test_unreadable_index_record_means_index_again(indexed, content):
    """Empty (a crash before the first write reached the disk), torn, or the record of an older
    version (absolute paths, no source state): index again instead of crashing or trusting it."""
    root, recipe, out = indexed
    (out / ".fillup" / "index.json").write_bytes(content)
    summary = run_build(parse_recipe(recipe), out, **QUIET)
    assert summary.real == 10 and summary.shards_written == 0
    assert SourceIndex.read(out / ".fillup" / "index.json").counts("train") == [5, 3, 2]


def test_index_record_round_trips_and_leaves_no_temp_file(tmp_path):
    write_split_file_dataset(tmp_path / "data", [3, 2])
    index = build_index(parse_recipe(split_file_recipe(tmp_path / "data")))
    index.save(tmp_path / "index.json")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["index.json"]
    again = SourceIndex.read(tmp_path / "index.json")
    assert again.items == index.items and again.source_state == index.source_state
    assert set(again.source_state["files"]) == {it.locator for its in index.items.values() for it in its}


# --------------------------------------------------------------------------- the kept index (plan, build)
def _no_decoding(monkeypatch):
    """Any decode of the source from here on fails the test."""
    import fillup_data.index as index_module

    def refuse(*a, **k):
        raise AssertionError("the source was decoded again")

    monkeypatch.setattr(index_module, "build_index", refuse)


def test_plan_keeps_the_index_and_reuses_it_while_the_source_is_unchanged(tmp_path, monkeypatch):
    from fillup_data.index import cached_index_path, index_for_plan

    root = tmp_path / "data"
    write_split_file_dataset(root, [5, 3, 2])
    recipe = parse_recipe(split_file_recipe(root))
    first, how = index_for_plan(recipe, workers=1, log=lambda *_: None)
    assert how.startswith("indexed the source") and cached_index_path(recipe).is_file()
    with monkeypatch.context() as m:
        _no_decoding(m)
        again, how = index_for_plan(recipe, workers=1)
        assert how.startswith("reused") and again.items == first.items and again.source_state == first.source_state
        # the build's first launch takes the kept index too: nothing is decoded
        summary = run_build(recipe, tmp_path / "out", **QUIET)
        assert summary.real == 10
    # an image rewritten in place (same size, new content and time) makes the kept index stale: index again
    victim = root / "train" / "n00000001" / "img_2.jpg"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    _, how = index_for_plan(recipe, workers=1, log=lambda *_: None)
    assert how.startswith("indexed the source") and "changed" in how, how


def test_the_kept_index_is_per_source(tmp_path):
    """Two sources (or one source with another CIFAR-LT cut) never share a kept index."""
    from fillup_data.index import cached_index_path

    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_split_file_dataset(root, [3, 2])
    ra, rb = parse_recipe(split_file_recipe(a)), parse_recipe(split_file_recipe(b))
    cut = split_file_recipe(a)
    cut["source"]["imbalance_factor"] = 2.0
    assert len({cached_index_path(r) for r in (ra, rb, parse_recipe(cut))}) == 3
    # a fill or generator change is the same source
    assert cached_index_path(ra) == cached_index_path(parse_recipe({**split_file_recipe(a), "fill": {"policy": "addon", "target": 3}}))


def test_parallel_indexing_sends_the_source_once_per_worker(tmp_path, monkeypatch):
    """The listing of an iNaturalist-sized source is tens of megabytes: sent with every chunk of images it
    cost minutes. Each worker process receives it once."""
    from fillup_data.sources.split_file import SplitFileSourceImpl

    root = tmp_path / "data"
    write_split_file_dataset(root, [40] * 10, test_per_class=0)
    sent = []

    def getstate(self):
        sent.append(1)
        return self.__dict__

    monkeypatch.setattr(SplitFileSourceImpl, "__getstate__", getstate, raising=False)
    index = build_index(parse_recipe(split_file_recipe(root)), workers=2)
    assert index.counts("train") == [40] * 10
    assert len(sent) <= 2, f"the source was pickled {len(sent)} times for 2 workers (fork: 0, spawn: 1 each)"


def test_plan_prints_where_its_index_came_from_and_needs_no_torch(tmp_path):
    """`plan` at iNaturalist's size must fit well under 1.5 GB: it never imports torch (half a gigabyte)."""
    root = tmp_path / "data"
    write_split_file_dataset(root, [5, 3, 2])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**split_file_recipe(root), "generator": {"strategy": "textual_inversion"}}))
    code = ("import sys; from fillup_data.cli import main; rc = main(['plan', sys.argv[1], '--gpus', '4']); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    env = {**os.environ, "FILLUP_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.rstrip().endswith("no torch"), run.stdout
    assert "index: indexed the source" in runs[0].stdout and "index: reused" in runs[1].stdout
