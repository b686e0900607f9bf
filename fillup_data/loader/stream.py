"""The ``IterableDataset`` over one rank's shards, its DataLoader, and :func:`make_loader`.

Epoch semantics (see :mod:`fillup_data.loader`): training readers yield a fixed quota of full batches,
re-reading their shards in a new order when they hold fewer samples than the quota; evaluation reads
every sample once.
"""

from __future__ import annotations

import random
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fillup_data.errors import FillupError
from fillup_data.loader.build import ShardRef
from fillup_data.loader.dealing import ReadPart, deal, derived_seed, split_quota
from fillup_data.loader.samples import decode_image, read_part
from fillup_data.loader.training_data import TrainingData


def buffer_shuffle(samples: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's sample shuffle buffer, written out because the library keeps it private
    (``webdataset.filters._shuffle``): the same reads and the same draws, so epochs keep their order.
    Fills the buffer (two reads per step while filling), then emits a random sample per sample read,
    then flushes."""
    buf: list[Any] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(samples))
            except StopIteration:
                pass
        if len(buf) >= bufsize:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list[Any], rng: random.Random) -> Any:
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


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
        self.total_samples = sum(s.num_kept for s in self.shards)  # after the score filter, if any
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
            random.Random(derived_seed(self.seed, epoch, "shards")).shuffle(parts)
        return deal(parts, self.world_size)[self.rank]

    def _reader_parts(self, epoch: int) -> list[list[ReadPart]]:
        return deal(self._rank_parts(epoch), max(self.num_workers, 1))

    def reader_plan(self, epoch: int) -> list[tuple[list[ReadPart], int]]:
        """For each reader (worker) of this rank: its parts and how many batches it yields."""
        readers = self._reader_parts(epoch)
        if not self.train:
            return [(ps, -(-sum(p.num_samples for p in ps) // self.batch_size)) for ps in readers]
        quotas = split_quota(self.batches_per_rank(), [sum(p.num_samples for p in ps) for ps in readers])
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
            torch.manual_seed(derived_seed(self.seed, epoch, self.rank, worker, "augment") % (2**63))
        parts, num_batches = self.reader_plan(epoch)[worker]
        if num_batches == 0:
            return
        if not parts or sum(p.num_samples for p in parts) == 0:
            raise FillupError(
                f"rank {self.rank} worker {worker} has no samples to read; use fewer DataLoader workers"
            )
        samples: Iterator[dict[str, Any]]
        if self.train:
            rng = random.Random(derived_seed(self.seed, epoch, self.rank, worker, "buffer"))
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
            yield from buffer_shuffle(self._read(order), self.shuffle_buffer, rng)

    def _read(self, parts: Iterable[ReadPart]) -> Iterator[dict[str, Any]]:
        for part in parts:
            yield from read_part(part)

    def _batches(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple]:
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in samples:
            images.append(self.transform(decode_image(sample)))
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
