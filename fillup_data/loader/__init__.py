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

One module per role:

* :mod:`~fillup_data.loader.build` -- one build's manifest, local or on the Hub (:class:`Build`, :class:`ShardRef`);
* :mod:`~fillup_data.loader.training_data` -- real shards from one build, synthetic from another;
* :mod:`~fillup_data.loader.score_filter` -- the synthetic samples whose quality scores pass a filter;
* :mod:`~fillup_data.loader.transport` -- a shard's bytes, a local file or an HTTP body with retries;
* :mod:`~fillup_data.loader.dealing` -- shards dealt to ranks and workers, per-reader quotas;
* :mod:`~fillup_data.loader.samples` -- one shard's samples, checked against the manifest's count;
* :mod:`~fillup_data.loader.stream` -- the ``IterableDataset``, its DataLoader and :func:`make_loader`.

The image transforms are training presets and live in :mod:`fillup_data.train.presets`; they are
re-exported here so ``from fillup_data.loader import train_transform`` keeps working.
"""

from fillup_data.loader.build import Build, ShardRef
from fillup_data.loader.dealing import ReadPart
from fillup_data.loader.samples import IMAGE_EXTENSIONS
from fillup_data.loader.score_filter import SampleFilter
from fillup_data.loader.stream import ShardStream, StreamLoader, make_loader
from fillup_data.loader.training_data import SPLITS, SUBSETS, TrainingData
from fillup_data.loader.transport import open_shard
from fillup_data.schema.groups import group_of
from fillup_data.train.presets import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SPLITS", "SUBSETS", "Build", "ReadPart", "SampleFilter",
    "ShardRef", "ShardStream", "StreamLoader", "TrainingData", "eval_transform", "group_of", "make_loader",
    "open_shard", "train_transform",
]
