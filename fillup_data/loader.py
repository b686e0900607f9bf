"""Streaming loader: a build's WebDataset shards as batches, local or from the Hub, on one or many ranks.

A build is read through its ``manifest.json`` (contract): it names every shard with its split, origin
and sample count, and the real per-class counts that Balanced Softmax and the many/medium/few groups
need.  Shards are streamed, never downloaded whole: local files are opened directly, Hub shards are
read over HTTP from the URL ``huggingface_hub.hf_hub_url`` gives for the pinned revision.

Epoch semantics, chosen so that DDP never hangs at an epoch end:

* training: every rank yields exactly ``(total_samples // world_size) // batch_size`` full batches.
  Shards are shuffled per epoch (same order on every rank), dealt to ranks and then to DataLoader
  workers so that sample counts balance; a reader whose shards hold fewer samples than its quota
  re-reads them (a new order each pass), one with more stops early.  Readers never share a shard.
  When there are fewer shards than readers, readers share shards and keep every n-th sample instead
  (still disjoint, each reader reads the whole tar).
* evaluation: every sample exactly once, the last batch may be short; batch counts may differ by rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle as wds_buffer_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from fillup_data.errors import FillupError

SUBSETS = ("filled", "real", "synthetic")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^\s@]+))?$")


# --------------------------------------------------------------------------- one build
@dataclass(frozen=True)
class ShardRef:
    """One shard of one build: where to stream it from and what the manifest says it holds."""

    url: str  # absolute local path, or an http(s) URL
    path: str  # the path inside the build, as written in the manifest
    split: str
    origin: str
    num_samples: int
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)


def group_of(real_count: int, many_above: int, few_below: int) -> str:
    """Paper 4.2: many > 100, few < 20, medium otherwise (thresholds from the build's manifest)."""
    if real_count > many_above:
        return "many"
    if real_count < few_below:
        return "few"
    return "medium"


class Build:
    """A build's manifest and the place its files live (a local folder or a Hub dataset repo)."""

    def __init__(
        self,
        manifest: dict[str, Any],
        where: str,
        *,
        base_dir: Path | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        endpoint: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.manifest = manifest
        self.where = where
        self.base_dir = base_dir
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = endpoint
        self._headers = tuple(sorted((headers or {}).items()))
        _check_manifest(manifest, where)
        self.classes = sorted(manifest["classes"], key=lambda c: int(c["index"]))
        groups = manifest.get("groups") or {}
        self.many_above = int(groups.get("many_above", 100))
        self.few_below = int(groups.get("few_below", 20))

    # ---- opening
    @classmethod
    def open(cls, ref: str | os.PathLike, *, cache_dir: str | None = None, token: str | bool | None = None) -> "Build":
        """Open ``ref``: a build folder (``manifest.json`` inside) or a Hub id ``org/name[@revision]``."""
        path = Path(ref)
        if path.is_dir():
            return cls.open_local(path)
        text = str(ref)
        if path.exists():
            raise FillupError(f"{ref}: not a build folder (expected a directory with manifest.json)")
        m = _HUB_ID.match(text)
        if text.startswith((".", "/", "~")) or not m:
            raise FillupError(
                f"{ref}: no such build folder, and not a Hub dataset id (org/name[@revision]); pass the OUT "
                "folder of `fillup-data build` or a published dataset id"
            )
        return cls.open_hub(m.group("repo"), m.group("rev"), cache_dir=cache_dir, token=token)

    @classmethod
    def open_local(cls, folder: str | os.PathLike) -> "Build":
        folder = Path(folder).resolve()
        mpath = folder / "manifest.json"
        if not mpath.is_file():
            raise FillupError(f"{folder}: no manifest.json; is this the OUT folder of `fillup-data build`?")
        return cls(_read_json(mpath), str(mpath), base_dir=folder)

    @classmethod
    def open_hub(
        cls,
        repo_id: str,
        revision: str | None = None,
        *,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
    ) -> "Build":
        """Read the manifest with ``hf_hub_download`` (cached) and stream shards from ``hf_hub_url``.

        ``endpoint`` defaults to ``HF_ENDPOINT`` read now, not at import, so a test or a mirror set
        after ``huggingface_hub`` was imported is honoured.
        """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import build_hf_headers

        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        where = f"{repo_id}@{revision or 'main'}"
        try:
            mpath = hf_hub_download(
                repo_id, "manifest.json", repo_type="dataset", revision=revision,
                cache_dir=cache_dir, token=token, endpoint=endpoint,
            )
        except Exception as err:  # the hub raises many types: offline, 404, auth, connection
            raise FillupError(
                f"{where}: no local folder of that name, and manifest.json cannot be read from the Hub "
                f"({type(err).__name__}: {err}); check the path or repo id, the revision tag, your token "
                "(hf auth login) and HF_HUB_OFFLINE"
            ) from None
        headers = build_hf_headers(token=token)
        return cls(
            _read_json(Path(mpath)), f"{where}:manifest.json", repo_id=repo_id, revision=revision,
            endpoint=endpoint, headers=headers,
        )

    # ---- what the manifest says
    @property
    def name(self) -> str:
        return str(self.manifest.get("name", ""))

    @property
    def class_names(self) -> list[str]:
        return [str(c["name"]) for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def real_counts(self) -> list[int]:
        return [int(c["real"]) for c in self.classes]

    def shard_url(self, path: str) -> str:
        if self.base_dir is not None:
            return str(self.base_dir / path)
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, path, repo_type="dataset", revision=self.revision, endpoint=self.endpoint)

    def shards(self, split: str, origin: str | None = None) -> list[ShardRef]:
        out = []
        for s in self.manifest["shards"]:
            if s["split"] != split or (origin is not None and s["origin"] != origin):
                continue
            out.append(
                ShardRef(
                    url=self.shard_url(s["path"]), path=s["path"], split=s["split"], origin=s["origin"],
                    num_samples=int(s["num_samples"]), headers=self._headers,
                )
            )
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FillupError(f"{path}: cannot read the manifest ({err})") from None
    if not isinstance(data, dict):
        raise FillupError(f"{path}: the manifest is not a JSON object")
    return data


def _check_manifest(m: dict[str, Any], where: str) -> None:
    for key in ("classes", "shards"):
        if not isinstance(m.get(key), list):
            raise FillupError(f"{where}: missing or malformed '{key}' list; rebuild with `fillup-data build`")
    for i, c in enumerate(m["classes"]):
        for key in ("index", "name", "real"):
            if key not in c:
                raise FillupError(f"{where}: classes[{i}] has no '{key}'")
    idx = sorted(int(c["index"]) for c in m["classes"])
    if idx != list(range(len(idx))):
        raise FillupError(f"{where}: class indices are not 0..{len(idx) - 1}")
    for i, s in enumerate(m["shards"]):
        for key in ("path", "split", "origin", "num_samples"):
            if key not in s:
                raise FillupError(f"{where}: shards[{i}] has no '{key}'")


# --------------------------------------------------------------------------- real + synthetic
class TrainingData:
    """What a run reads: real shards from one build, synthetic from another (or the same) build.

    Real images often cannot be redistributed, so a user builds the real shards locally
    (``generator.strategy: none``) and adds the synthetic shards someone published; labels must
    then mean the same classes in both builds, which is checked here.
    """

    def __init__(self, real: Build, synthetic: Build):
        self.real = real
        self.synthetic = synthetic
        if synthetic is not real and synthetic.class_names != real.class_names:
            diff = next(
                (i for i, (a, b) in enumerate(zip(real.class_names, synthetic.class_names)) if a != b),
                min(real.num_classes, synthetic.num_classes),
            )
            raise FillupError(
                f"{real.where} and {synthetic.where} have different class lists (first difference at index "
                f"{diff}); the real and synthetic builds must come from the same class list"
            )

    @classmethod
    def open(
        cls, data: str | os.PathLike, real_data: str | os.PathLike | None = None, *,
        cache_dir: str | None = None, token: str | bool | None = None,
    ) -> "TrainingData":
        main = Build.open(data, cache_dir=cache_dir, token=token)
        real = Build.open(real_data, cache_dir=cache_dir, token=token) if real_data else main
        return cls(real, main)

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def real_counts(self) -> list[int]:
        """Real training images per class: the Balanced Softmax prior and the group thresholds."""
        return self.real.real_counts

    @property
    def groups(self) -> list[str]:
        return [group_of(n, self.real.many_above, self.real.few_below) for n in self.real_counts]

    def shards(self, subset: str, split: str) -> list[ShardRef]:
        if subset not in SUBSETS:
            raise FillupError(f"data subset {subset!r}: allowed {', '.join(SUBSETS)}")
        if split not in SPLITS:
            raise FillupError(f"split {split!r}: allowed {', '.join(SPLITS)}")
        if split == "test":
            found = self.real.shards("test") or self.synthetic.shards("test")
            if not found:
                raise FillupError(f"{self.real.where}: the build has no test split (no shards with split 'test')")
            return found
        out: list[ShardRef] = []
        if subset in ("filled", "real"):
            real = self.real.shards("train", "real")
            if not real:
                raise FillupError(
                    f"{self.real.where}: no real training shards (the build was published without real "
                    "images?); build them locally and pass --real-data BUILD"
                )
            out += real
        if subset in ("filled", "synthetic"):
            syn = self.synthetic.shards("train", "synthetic")
            if not syn and subset == "synthetic":
                raise FillupError(f"{self.synthetic.where}: no synthetic training shards")
            out += syn
        return out


# --------------------------------------------------------------------------- transforms
def train_transform(
    size: int = 224, *, crop: str = "random_resized", scale: tuple[float, float] = (0.08, 1.0),
    padding: int = 4, color_jitter: float = 0.4, randaugment: bool = False, randaugment_ops: int = 2,
    randaugment_magnitude: int = 9, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Paper B.4 (standard ResNet-50 protocol): random crop 224, horizontal flip, colour jitter,
    optional RandAugment.  ``crop="pad"`` is the CIFAR-style 4-pixel-padding crop for 32x32 images."""
    import torchvision.transforms as T

    ops: list[Any] = []
    if crop == "random_resized":
        ops.append(T.RandomResizedCrop(size, scale=tuple(scale), antialias=True))
    elif crop == "pad":
        ops += [T.Resize(size, antialias=True), T.RandomCrop(size, padding=padding, padding_mode="reflect")]
    else:
        raise FillupError(f"crop {crop!r}: allowed random_resized, pad")
    ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if randaugment:
        ops.append(T.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(
    size: int = 224, resize: int = 256, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``resize`` then center-crop ``size`` (256 -> 224 in the paper's protocol)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


# --------------------------------------------------------------------------- reading shards
def open_shard(shard: ShardRef, *, retries: int = 3, timeout: float = 60.0):
    """A readable binary stream of one shard: a local file, or an HTTP body streamed (never saved)."""
    if not shard.url.startswith(("http://", "https://")):
        try:
            return open(shard.url, "rb")
        except OSError as err:
            raise FillupError(f"{shard.url}: cannot open shard ({err.strerror}); is the build complete?") from None
    import requests
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        raise FillupError(
            f"{shard.url}: HF_HUB_OFFLINE=1 is set, so shard {shard.path} cannot be streamed; unset it, or "
            "download the build (hf download REPO --repo-type dataset --revision REV --local-dir DIR) and "
            "pass DIR as --data"
        )
    last: Exception | None = None
    for attempt in range(retries):
        try:
            # requests drops the Authorization header itself when the Hub redirects to another host (CDN).
            resp = requests.get(shard.url, headers=dict(shard.headers), stream=True, timeout=timeout)
        except requests.RequestException as err:
            last = err
            time.sleep(min(2**attempt, 10))
            continue
        if resp.status_code >= 500 or resp.status_code == 429:
            last = FillupError(f"HTTP {resp.status_code}")
            resp.close()
            time.sleep(min(2**attempt, 10))
            continue
        if resp.status_code != 200:
            resp.close()
            raise FillupError(
                f"{shard.url}: HTTP {resp.status_code} for shard {shard.path}; check the revision and your token"
            )
        resp.raw.decode_content = True
        return resp.raw
    raise FillupError(f"{shard.url}: cannot stream shard {shard.path} after {retries} tries ({last})")


@dataclass(frozen=True)
class ReadPart:
    """A reader's share of one shard: the samples ``i`` with ``i % stride == offset``."""

    shard: ShardRef
    stride: int = 1
    offset: int = 0

    @property
    def num_samples(self) -> int:
        return len(range(self.offset, self.shard.num_samples, self.stride))


def _deal(parts: list[ReadPart], n: int) -> list[list[ReadPart]]:
    """Split parts among ``n`` readers: whole shards balanced by sample count when there are enough,
    otherwise every reader takes every n-th sample of every part."""
    if n == 1:
        return [list(parts)]
    if len(parts) >= n:
        bins: list[list[ReadPart]] = [[] for _ in range(n)]
        load = [0] * n
        # Largest first onto the least-loaded reader; the stable sort keeps the epoch's shuffled
        # order among equal sizes, so which reader gets which shard changes every epoch.
        for p in sorted(parts, key=lambda p: -p.num_samples):
            i = min(range(n), key=lambda j: (load[j], j))
            bins[i].append(p)
            load[i] += p.num_samples
        return bins
    return [
        [ReadPart(p.shard, p.stride * n, p.offset + r * p.stride) for p in parts] for r in range(n)
    ]


def _split_quota(total: int, weights: list[int]) -> list[int]:
    """Integer split of ``total`` proportional to ``weights`` (largest remainders), summing to ``total``."""
    s = sum(weights)
    if s == 0:
        return [total // len(weights) + (i < total % len(weights)) for i in range(len(weights))]
    raw = [total * w / s for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(weights)), key=lambda i: -(raw[i] - out[i]))[: total - sum(out)]:
        out[i] += 1
    return out


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _decode_image(sample: dict[str, Any]) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        data = sample.get(ext)
        if data is not None:
            img = Image.open(io.BytesIO(data))
            return img.convert("RGB")
    raise FillupError(
        f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image member "
        f"({', '.join(IMAGE_EXTENSIONS)}); members: {sorted(k for k in sample if not k.startswith('__'))}"
    )


class ShardStream(IterableDataset):
    """Batches from a list of shards for one rank; DataLoader workers split the rank's share.

    ``batch_size`` is per rank.  Call ``set_epoch`` before iterating (workers are started per epoch,
    so they see the new value).
    """

    def __init__(
        self,
        shards: Sequence[ShardRef],
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        train: bool,
        num_classes: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 2000,
        return_keys: bool = False,
    ):
        if not shards:
            raise FillupError("no shards to read")
        if batch_size < 1:
            raise FillupError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.transform = transform
        self.train = train
        self.num_classes = num_classes
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(num_workers, 0)
        self.shuffle_buffer = shuffle_buffer
        self.return_keys = return_keys
        self.epoch = 0
        self.total_samples = sum(s.num_samples for s in self.shards)
        if train and self.batches_per_rank() == 0:
            raise FillupError(
                f"{self.total_samples} training samples cannot fill one batch of {batch_size} on each of "
                f"{world_size} ranks; lower the batch size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches_per_rank(self) -> int:
        """Training: the same on every rank (drop-last). Evaluation: this rank's share, last batch short."""
        if self.train:
            return (self.total_samples // self.world_size) // self.batch_size
        return sum(-(-sum(p.num_samples for p in ps) // self.batch_size) for ps in self._reader_parts(self.epoch))

    def __len__(self) -> int:
        return self.batches_per_rank()

    # ---- assignment
    def _rank_parts(self, epoch: int) -> list[ReadPart]:
        parts = [ReadPart(s) for s in self.shards]
        if self.train:
            # same permutation on every rank: it only depends on (seed, epoch)
            random.Random(_seed(self.seed, epoch, "shards")).shuffle(parts)
        return _deal(parts, self.world_size)[self.rank]

    def _reader_parts(self, epoch: int) -> list[list[ReadPart]]:
        return _deal(self._rank_parts(epoch), max(self.num_workers, 1))

    def reader_plan(self, epoch: int) -> list[tuple[list[ReadPart], int]]:
        """For each reader (worker) of this rank: its parts and how many batches it yields."""
        readers = self._reader_parts(epoch)
        if not self.train:
            return [(ps, -(-sum(p.num_samples for p in ps) // self.batch_size)) for ps in readers]
        quotas = _split_quota(self.batches_per_rank(), [sum(p.num_samples for p in ps) for ps in readers])
        return list(zip(readers, quotas))

    # ---- iteration
    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.num_workers, 1):
            raise FillupError(f"ShardStream built for {self.num_workers} workers is read by {workers}")
        epoch = self.epoch
        if info is not None:
            # augmentation randomness reproducible per (seed, epoch, rank, worker); only inside workers
            # so the main process's RNG is never reset behind the trainer's back
            torch.manual_seed(_seed(self.seed, epoch, self.rank, worker, "augment") % (2**63))
        parts, num_batches = self.reader_plan(epoch)[worker]
        if num_batches == 0:
            return
        if not parts or sum(p.num_samples for p in parts) == 0:
            raise FillupError(
                f"rank {self.rank} worker {worker} has no samples to read; use fewer DataLoader workers"
            )
        samples: Iterator[dict[str, Any]]
        if self.train:
            rng = random.Random(_seed(self.seed, epoch, self.rank, worker, "buffer"))
            samples = islice(self._passes(parts, rng), num_batches * self.batch_size)
        else:
            samples = self._read(parts)
        yield from self._batches(samples)

    def _passes(self, parts: list[ReadPart], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Shuffled passes over the parts until the consumer has its quota: shard order reshuffled
        each pass, then a sample buffer shuffle that is flushed at the end of each pass, so no sample
        repeats before every sample of the reader has been seen once."""
        order = list(parts)
        while True:
            rng.shuffle(order)
            yield from wds_buffer_shuffle(
                self._read(order), bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng
            )

    def _read(self, parts: Iterable[ReadPart]) -> Iterator[dict[str, Any]]:
        for part in parts:
            stream = open_shard(part.shard)
            try:
                files = tar_file_expander([{"url": part.shard.url, "stream": stream}])
                for i, sample in enumerate(group_by_keys(files)):
                    if i % part.stride == part.offset:
                        yield sample
            finally:
                stream.close()

    def _batches(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in samples:
            images.append(self.transform(_decode_image(sample)))
            labels.append(self._label(sample))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield self._collate(images, labels, keys)
                images, labels, keys = [], [], []
        if images:
            yield self._collate(images, labels, keys)

    def _label(self, sample: dict[str, Any]) -> int:
        raw = sample.get("cls")
        try:
            label = int(raw)
        except (TypeError, ValueError):
            raise FillupError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no integer .cls") from None
        if not 0 <= label < self.num_classes:
            raise FillupError(
                f"{sample.get('__url__')}: sample {sample.get('__key__')} has class {label}, outside "
                f"0..{self.num_classes - 1}; the shards do not belong to this manifest"
            )
        return label

    def _collate(self, images: list[torch.Tensor], labels: list[int], keys: list[str]) -> tuple:
        batch = (torch.stack(images), torch.tensor(labels, dtype=torch.long))
        return batch + (keys,) if self.return_keys else batch


class StreamLoader:
    """A DataLoader over a ShardStream with ``len()`` and ``set_epoch()``, like a sampler-based loader."""

    def __init__(self, stream: ShardStream, *, pin_memory: bool = False, prefetch_factor: int = 2):
        self.stream = stream
        kw: dict[str, Any] = {}
        if stream.num_workers > 0:
            kw["prefetch_factor"] = prefetch_factor
        self._loader = DataLoader(
            stream, batch_size=None, num_workers=stream.num_workers, pin_memory=pin_memory,
            persistent_workers=False, **kw,
        )

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._loader)


def make_loader(
    data: TrainingData,
    subset: str,
    split: str,
    batch_size: int,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    train: bool | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 2000,
    pin_memory: bool = False,
    return_keys: bool = False,
) -> StreamLoader:
    """The loader for one (subset, split) of ``data``; ``batch_size`` is per rank."""
    stream = ShardStream(
        data.shards(subset, split), batch_size, transform,
        train=(split == "train") if train is None else train, num_classes=data.num_classes, seed=seed,
        rank=rank, world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
        return_keys=return_keys,
    )
    return StreamLoader(stream, pin_memory=pin_memory)
