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
re-exported here so ``from fillup_data.loader import train_transform`` keeps working. Each name loads
its module on first use, so reading a train config or a filter does not import torch.
"""

from fillup_data.lazy import lazy_names

_WHERE = {
    "Build": "fillup_data.loader.build", "ShardRef": "fillup_data.loader.build",
    "ReadPart": "fillup_data.loader.dealing", "IMAGE_EXTENSIONS": "fillup_data.loader.samples",
    "SampleFilter": "fillup_data.loader.score_filter", "ShardStream": "fillup_data.loader.stream",
    "StreamLoader": "fillup_data.loader.stream", "make_loader": "fillup_data.loader.stream",
    "SPLITS": "fillup_data.loader.training_data", "SUBSETS": "fillup_data.loader.training_data",
    "TrainingData": "fillup_data.loader.training_data", "open_shard": "fillup_data.loader.transport",
    "group_of": "fillup_data.schema.groups", "IMAGENET_MEAN": "fillup_data.train.presets",
    "IMAGENET_STD": "fillup_data.train.presets", "eval_transform": "fillup_data.train.presets",
    "train_transform": "fillup_data.train.presets",
}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE)
