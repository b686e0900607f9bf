"""Streaming loader: manifest, subsets, exact epochs, rank/worker splits, Hub layout, real+synthetic."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fillup_data.errors import FillupError
from fillup_data.loader import (
    Build, ShardStream, TrainingData, eval_transform, group_of, make_loader, train_transform,
)

torch.set_num_threads(1)

JSON_KEYS = ("label", "class_name", "is_synthetic", "strategy", "prompt", "seed", "token_step",
             "guidance_scale", "num_inference_steps", "model", "source_path")
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (200, 30, 200), (30, 200, 200)]


def _image_bytes(label: int, i: int, size: int, fmt: str) -> bytes:
    rng = np.random.default_rng(label * 10007 + i)
    arr = np.clip(np.array(COLORS[label % len(COLORS)], dtype=float) + rng.normal(0, 25, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_fixture_build(
    out: Path, *, real: list[int], synthetic: list[int] | None = None, test: int = 4, shard_size: int = 10,
    size: int = 16, fmt: str = "jpg", names: list[str] | None = None, include_real: bool = True,
) -> Path:
    """A build in the contract layout (manifest.json + data/*.tar), small enough for unit tests."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    synthetic = synthetic or [0] * len(real)
    names = names or [f"class {i}" for i in range(len(real))]
    samples: dict[tuple[str, str], list[tuple[int, int]]] = {
        ("train", "real"): [(c, i) for c, n in enumerate(real) for i in range(n)] if include_real else [],
        ("train", "synthetic"): [(c, 1000 + i) for c, n in enumerate(synthetic) for i in range(n)],
        ("test", "real"): [(c, 5000 + i) for c in range(len(real)) for i in range(test)] if include_real else [],
    }
    shards = []
    for (split, origin), items in samples.items():
        np.random.default_rng(len(items)).shuffle(items)  # classes mixed in every shard
        for s in range(0, len(items), shard_size):
            path = f"data/{split}-{origin}-{s // shard_size:05d}.tar"
            chunk = items[s:s + shard_size]
            with tarfile.open(out / path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for j, (c, i) in enumerate(chunk):
                    key = f"{split}-{origin}-{s // shard_size:05d}-{j:06d}"
                    meta = dict.fromkeys(JSON_KEYS, "")
                    meta.update(label=c, class_name=names[c], is_synthetic=origin == "synthetic",
                                strategy="textual_inversion" if origin == "synthetic" else "real",
                                seed=i, token_step=-1, guidance_scale=1.0, num_inference_steps=-1)
                    _add(tar, f"{key}.cls", str(c).encode())
                    _add(tar, f"{key}.{fmt}", _image_bytes(c, i, size, fmt))
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
            data = (out / path).read_bytes()
            shards.append({"path": path, "split": split, "origin": origin, "num_samples": len(chunk),
                           "num_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "name": out.name, "version": "1.0.0", "fingerprint": "f" * 64,
        "recipe": {"shards": {"image_format": fmt}},
        "classes": [{"index": i, "name": names[i], "real": real[i], "synthetic": synthetic[i], "test": test,
                     "group": group_of(real[i], 100, 20)} for i in range(len(real))],
        "groups": {"many_above": 100, "few_below": 20},
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


REAL = [40, 20, 12, 6, 3, 2]
SYN = [0, 20, 28, 34, 37, 38]


@pytest.fixture
def build(tmp_path):
    return write_fixture_build(tmp_path / "b", real=REAL, synthetic=SYN, shard_size=10)


def _keys(loader) -> list[list[str]]:
    return [list(b[2]) for b in loader]


def _tf():
    return eval_transform(16, 16)


# --------------------------------------------------------------------------- manifest and subsets
def test_manifest_counts_groups_and_subsets(build):
    data = TrainingData.open(build)
    assert data.real_counts == REAL
    assert data.class_names[0] == "class 0"
    # thresholds from the manifest; few_below=20 -> 20 is medium, 12 is few
    assert data.groups == ["medium", "medium", "few", "few", "few", "few"]
    n = lambda subset, split: sum(s.num_samples for s in data.shards(subset, split))  # noqa: E731
    assert n("real", "train") == sum(REAL)
    assert n("synthetic", "train") == sum(SYN)
    assert n("filled", "train") == sum(REAL) + sum(SYN)
    assert n("real", "test") == 4 * len(REAL)
    with pytest.raises(FillupError, match="allowed"):
        data.shards("balanced", "train")


def test_group_thresholds_match_the_paper():
    assert [group_of(n, 100, 20) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]


def test_every_sample_once_in_eval_and_labels_match(build):
    data = TrainingData.open(build)
    loader = make_loader(data, "filled", "train", 7, _tf(), train=False, return_keys=True)
    seen, labels = [], []
    for images, y, keys in loader:
        assert images.shape[1:] == (3, 16, 16)
        seen += keys
        labels += y.tolist()
    assert len(seen) == len(set(seen)) == sum(REAL) + sum(SYN)
    assert np.bincount(labels, minlength=6).tolist() == [r + s for r, s in zip(REAL, SYN)]
    assert len(loader) == sum(1 for _ in loader)


# --------------------------------------------------------------------------- epochs, ranks, workers
@pytest.mark.parametrize("world", [1, 2, 3])
def test_same_batches_on_every_rank_and_disjoint_shards(build, world):
    data = TrainingData.open(build)
    total = sum(REAL) + sum(SYN)
    per_rank = []
    for rank in range(world):
        loader = make_loader(data, "filled", "train", 8, _tf(), seed=5, rank=rank, world_size=world,
                             return_keys=True)
        batches = _keys(loader)
        assert all(len(b) == 8 for b in batches)
        assert len(batches) == len(loader) == (total // world) // 8
        per_rank.append(batches)
    shards = [{k.rsplit("-", 1)[0] for b in r for k in b} for r in per_rank]
    for a in range(world):
        for b in range(a + 1, world):
            assert not shards[a] & shards[b], "two ranks read the same shard"


def test_epochs_reshuffle_and_are_reproducible(build):
    data = TrainingData.open(build)
    loader = make_loader(data, "filled", "train", 8, _tf(), seed=1, return_keys=True)
    e0 = [k for b in _keys(loader) for k in b]
    again = [k for b in _keys(loader) for k in b]
    loader.set_epoch(1)
    e1 = [k for b in _keys(loader) for k in b]
    assert e0 == again
    assert e0 != e1
    assert len(set(e0)) == len(e0)  # no repeats inside an epoch when one rank reads everything


def test_the_shuffle_buffer_is_a_seeded_permutation():
    import random

    from fillup_data.loader.stream import buffer_shuffle

    for n, size in ((0, 4), (1, 4), (9, 1), (50, 8), (50, 200)):
        out = list(buffer_shuffle(iter(range(n)), size, random.Random(3)))
        assert sorted(out) == list(range(n))
        assert out == list(buffer_shuffle(iter(range(n)), size, random.Random(3)))
    assert list(buffer_shuffle(iter(range(9)), 1, random.Random(0))) == list(range(9))  # buffer of one: no shuffle
    assert list(buffer_shuffle(iter(range(50)), 8, random.Random(0))) != list(range(50))


def test_fewer_shards_than_readers_split_samples(tmp_path):
    one = write_fixture_build(tmp_path / "one", real=[10, 9, 8], shard_size=100)  # a single train shard
    data = TrainingData.open(one)
    assert len(data.shards("real", "train")) == 1
    keys = []
    for rank in range(2):
        loader = make_loader(data, "real", "train", 4, _tf(), rank=rank, world_size=2, return_keys=True)
        got = [k for b in _keys(loader) for k in b]
        assert len(got) == len(loader) * 4 == (27 // 2) // 4 * 4
        keys.append(set(got))
    assert not keys[0] & keys[1]


def test_dataloader_workers_split_and_keep_the_epoch_length(build):
    data = TrainingData.open(build)
    loader = make_loader(data, "filled", "train", 8, _tf(), seed=3, num_workers=2, return_keys=True)
    batches = _keys(loader)
    flat = [k for b in batches for k in b]
    assert len(batches) == len(loader) == (sum(REAL) + sum(SYN)) // 8
    assert len(set(flat)) == len(flat)
    # the two workers read disjoint shards
    plan = loader.stream.reader_plan(0)
    a, b = ({p.shard.path for p in parts} for parts, _ in plan)
    assert not a & b and sum(q for _, q in plan) == len(loader)


def test_a_reader_with_too_few_samples_wraps_around(tmp_path):
    # 3 shards of 10, 10 and 1 samples on 2 ranks: the ranks hold 10 and 11 samples; both yield 2 batches of 5
    b = write_fixture_build(tmp_path / "w", real=[7, 7, 7], shard_size=10)
    data = TrainingData.open(b)
    lens = [len(_keys(make_loader(data, "real", "train", 5, _tf(), rank=r, world_size=2, return_keys=True)))
            for r in range(2)]
    assert lens == [2, 2]


def test_batch_larger_than_data_is_an_error(build):
    with pytest.raises(FillupError, match="lower the batch size"):
        make_loader(TrainingData.open(build), "real", "train", 1000, _tf())


# --------------------------------------------------------------------------- transforms and formats
def test_train_transform_sizes_and_randaugment():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    assert train_transform(24, randaugment=True)(img).shape == (3, 24, 24)
    assert train_transform(32, crop="pad")(img.resize((32, 32))).shape == (3, 32, 32)
    assert eval_transform(24, 28)(img).shape == (3, 24, 24)
    with pytest.raises(FillupError):
        train_transform(24, crop="zoom")


def test_png_shards(tmp_path):
    b = write_fixture_build(tmp_path / "png", real=[5, 5], fmt="png", shard_size=4)
    batches = list(make_loader(TrainingData.open(b), "real", "test", 3, _tf(), train=False))
    assert sum(len(y) for _, y in batches) == 8


# --------------------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path, build):
    with pytest.raises(FillupError, match="no such build folder"):
        Build.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FillupError, match="no manifest.json"):
        Build.open(tmp_path / "empty")
    m = json.loads((build / "manifest.json").read_text())
    del m["classes"][0]["real"]
    (build / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FillupError, match=r"classes\[0\] has no 'real'"):
        Build.open(build)


def test_label_outside_the_class_list(tmp_path):
    b = write_fixture_build(tmp_path / "x", real=[4, 4], shard_size=8)
    m = json.loads((b / "manifest.json").read_text())
    m["classes"] = m["classes"][:1]  # the shards hold label 1, the manifest knows one class
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FillupError, match="outside 0..0"):
        list(make_loader(TrainingData.open(b), "real", "train", 2, _tf()))


def test_missing_shard_file(build):
    (build / "data" / "train-real-00000.tar").unlink()
    with pytest.raises(FillupError, match="cannot open shard"):
        list(make_loader(TrainingData.open(build), "real", "train", 4, _tf(), train=False))


# --------------------------------------------------------------------------- the Hub layout
class _HubHandler(http.server.SimpleHTTPRequestHandler):
    """Serves ROOT/datasets/{repo}/resolve/{rev}/{path} with the headers hf_hub_download needs."""

    def end_headers(self):
        self.send_header("X-Repo-Commit", "0" * 40)
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", '"' + hashlib.sha256(path.read_bytes()).hexdigest()[:40] + '"')
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback 'Hub': returns a function that publishes a build folder as repo@rev."""
    import huggingface_hub.constants as hc

    root = tmp_path / "hubroot"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_HubHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")

    def publish(build_dir: Path, repo: str, rev: str) -> None:
        import shutil

        shutil.copytree(build_dir, root / "datasets" / repo / "resolve" / rev)

    yield publish
    server.shutdown()


def test_reads_a_build_laid_out_as_on_the_hub(build, hub, tmp_path):
    hub(build, "org/demo-fillup", "v1.0.0")
    b = Build.open("org/demo-fillup@v1.0.0", cache_dir=str(tmp_path / "cache"))
    assert b.repo_id == "org/demo-fillup" and b.revision == "v1.0.0"
    shard = b.shards("train", "real")[0]
    assert shard.url.startswith("http://127.0.0.1:") and "/datasets/org/demo-fillup/resolve/v1.0.0/data/" in shard.url
    data = TrainingData(b, b)
    local = make_loader(TrainingData.open(build), "filled", "train", 8, _tf(), seed=2, return_keys=True)
    remote = make_loader(data, "filled", "train", 8, _tf(), seed=2, return_keys=True)
    got = list(remote)
    assert [k for _, _, k in got] == _keys(local)  # same samples, same order as from the local folder
    assert torch.equal(got[0][0], next(iter(local))[0])


def test_unknown_revision_on_the_hub(build, hub, tmp_path):
    hub(build, "org/demo-fillup", "v1.0.0")
    with pytest.raises(FillupError, match="v9.9.9"):
        Build.open("org/demo-fillup@v9.9.9", cache_dir=str(tmp_path / "cache"))


def test_local_real_with_remote_synthetic(tmp_path, hub):
    names = [f"class {i}" for i in range(len(REAL))]
    real_only = write_fixture_build(tmp_path / "real", real=REAL, names=names, shard_size=10)
    syn_only = write_fixture_build(tmp_path / "syn", real=REAL, synthetic=SYN, names=names, shard_size=10,
                                   include_real=False)
    hub(syn_only, "org/syn", "v2.0.0")
    data = TrainingData.open("org/syn@v2.0.0", real_data=real_only, cache_dir=str(tmp_path / "cache"))
    shards = data.shards("filled", "train")
    assert {s.origin for s in shards if s.url.startswith("http")} == {"synthetic"}
    assert {s.origin for s in shards if not s.url.startswith("http")} == {"real"}
    loader = make_loader(data, "filled", "train", 6, _tf(), train=False, return_keys=True)
    keys = [k for b in _keys(loader) for k in b]
    assert len(keys) == sum(REAL) + sum(SYN)
    assert data.real_counts == REAL and len(data.shards("real", "test")) > 0
    # Stage II reads only the local real shards
    assert all(not s.url.startswith("http") for s in data.shards("real", "train"))
    # the published synthetic build alone has no real images: a clear error, not an empty epoch
    with pytest.raises(FillupError, match="--real-data"):
        TrainingData.open("org/syn@v2.0.0", cache_dir=str(tmp_path / "cache")).shards("real", "train")


def test_real_and_synthetic_builds_must_share_classes(tmp_path):
    a = write_fixture_build(tmp_path / "a", real=[3, 3], names=["cat", "dog"])
    b = write_fixture_build(tmp_path / "b", real=[3, 3], synthetic=[2, 2], names=["cat", "fox"])
    with pytest.raises(FillupError, match="different class lists"):
        TrainingData.open(b, real_data=a)


def test_shardstream_requires_shards():
    with pytest.raises(FillupError, match="no shards"):
        ShardStream([], 4, _tf(), train=True, num_classes=2)


def test_offline_mode_names_the_shard_and_the_fix(build, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    hub(build, "org/demo-fillup", "v1.0.0")
    data = TrainingData.open("org/demo-fillup@v1.0.0", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(FillupError, match="HF_HUB_OFFLINE=1 is set, so shard data/"):
        list(make_loader(data, "real", "train", 4, _tf()))


# --------------------------------------------------------------------------- shards that disagree with the manifest
def _bound_shard_opens(monkeypatch, limit: int = 40) -> list[str]:
    """Count shard opens and stop a loader that re-opens shards without end (the bug this pins)."""
    import fillup_data.loader.samples as samples

    real_open, opened = samples.open_shard, []

    def counting_open(shard, **kw):
        opened.append(shard.path)
        if len(opened) > limit:
            raise RuntimeError(f"{len(opened)} shard opens: the loader is looping over a shard that yields nothing")
        return real_open(shard, **kw)

    monkeypatch.setattr(samples, "open_shard", counting_open)
    return opened


def _write_empty_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT):
        pass  # a real, valid tar with no members (10 KiB of end-of-archive blocks)


@pytest.mark.parametrize("where", ["local", "hub"])
def test_an_empty_shard_is_an_error_naming_it_not_an_endless_loop(tmp_path, monkeypatch, hub, where):
    b = write_fixture_build(tmp_path / "e", real=[5, 5], shard_size=10)  # one train shard of 10 samples
    _write_empty_tar(b / "data" / "train-real-00000.tar")
    if where == "hub":
        hub(b, "org/empty", "v1")
        b = "org/empty@v1"
    data = TrainingData.open(b, cache_dir=str(tmp_path / "cache"))
    opened = _bound_shard_opens(monkeypatch)
    with pytest.raises(FillupError, match=r"shard data/train-real-00000\.tar holds 0 samples, its manifest says 10"):
        list(make_loader(data, "real", "train", 4, _tf()))
    assert opened == ["data/train-real-00000.tar"]


def _sample_offsets(tar_path: Path) -> list[int]:
    """Byte offset of each sample's first member header."""
    with tarfile.open(tar_path) as tar:
        return [m.offset for m in tar.getmembers() if m.name.endswith(".cls")]


def test_a_shard_cut_between_samples_is_an_error_with_both_counts(build, monkeypatch):
    path = build / "data" / "train-real-00001.tar"
    path.write_bytes(path.read_bytes()[: _sample_offsets(path)[3]])  # a download cut short: 3 whole samples
    data = TrainingData.open(build)
    with pytest.raises(FillupError, match=r"shard data/train-real-00001\.tar holds 3 samples, its manifest says 10"):
        list(make_loader(data, "real", "train", 4, _tf(), train=False))
    # training: the reader stops at the short shard instead of re-reading the others to make up its quota
    _bound_shard_opens(monkeypatch)
    with pytest.raises(FillupError, match=r"train-real-00001\.tar holds 3 samples"):
        list(make_loader(data, "real", "train", 4, _tf()))


def test_a_shard_cut_inside_an_image_is_an_error_naming_it(build):
    path = build / "data" / "train-real-00002.tar"
    start = _sample_offsets(path)[4]
    with tarfile.open(path) as tar:
        image = next(m for m in tar.getmembers() if m.offset > start and m.name.endswith(".jpg"))
    path.write_bytes(path.read_bytes()[: image.offset_data + image.size // 2])
    with pytest.raises(FillupError, match=r"cannot read shard data/train-real-00002\.tar after 4 samples"):
        list(make_loader(TrainingData.open(build), "real", "train", 4, _tf(), train=False))


def test_an_undecodable_image_names_the_shard_and_the_sample(tmp_path):
    b = write_fixture_build(tmp_path / "u", real=[3, 3], shard_size=10)
    path = b / "data" / "train-real-00000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            _add(tar, m.name, b"not a jpeg" if m.name.endswith("-000002.jpg") else data)
    with pytest.raises(FillupError, match=r"train-real-00000\.tar: sample train-real-00000-000002 has an undecodable"):
        list(make_loader(TrainingData.open(b), "real", "train", 2, _tf(), train=False))


@pytest.mark.parametrize("bad", [
    "../outside.tar", "data/../../outside.tar", "/etc/passwd", "https://example.com/x.tar",
    "file:///etc/passwd", "tokens/00000.safetensors", "data//x.tar", "data\\..\\x.tar", "data", 7,
])
def test_shard_paths_must_stay_under_data(tmp_path, bad):
    b = write_fixture_build(tmp_path / "p", real=[3, 3])
    m = json.loads((b / "manifest.json").read_text())
    m["shards"][1]["path"] = bad
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FillupError, match=r"manifest\.json: shards\[1\]\.path .* is not a file under data/"):
        Build.open(b)


def test_a_downloaded_manifest_with_a_path_outside_the_build(build, hub, tmp_path):
    m = json.loads((build / "manifest.json").read_text())
    m["shards"][0]["path"] = "../../../org/other/resolve/main/data/train-real-00000.tar"
    (build / "manifest.json").write_text(json.dumps(m))
    hub(build, "org/evil", "v1")
    with pytest.raises(FillupError, match=r"org/evil@v1:manifest\.json: shards\[0\]\.path '\.\./\.\./\.\./org/other"):
        Build.open("org/evil@v1", cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("bad", [None, -3, "ten"])
def test_shard_sample_counts_must_be_counts(tmp_path, bad):
    b = write_fixture_build(tmp_path / "n", real=[3, 3])
    m = json.loads((b / "manifest.json").read_text())
    m["shards"][0]["num_samples"] = bad
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FillupError, match=r"shards\[0\]\.num_samples .* is not a count"):
        Build.open(b)
