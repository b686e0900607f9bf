"""The model side of a build, used by the invert and generate stages (``fillup_data.stages``), by
``preview`` and by ``regenerate``: inverting classes, exporting tokens, generating a synthetic shard,
and regenerating any synthetic sample from its metadata.

Resumable at two grains: a class whose token file is complete is not trained again (an interrupted
class resumes from its last checkpoint), and a synthetic shard with a completion record is not
generated again.  Images are generated in chunks and streamed into the shard writer, so memory
does not grow with the shard size: one background thread encodes and writes a chunk while the next
one is generated (a bounded queue: at most one chunk waits), in shard order, so the bytes are those
of a serial write.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from fillup_data import fastpath
from fillup_data.errors import FillupError
from fillup_data.plan import Plan, ShardPlan
from fillup_data.recipe import Recipe
from fillup_data.schema import sample as sample_schema
from fillup_data.shards.index_parquet import index_row
from fillup_data.shards.writer import ShardWriter, encode_image
from fillup_data.stages.invert import token_path

# Micro-batches generated per chunk before the chunk goes to the writer thread: bounded memory per
# shard (a chunk being written, one waiting, one being generated).
_CHUNK_BATCHES = 8
_QUEUED_CHUNKS = 1


def synthetic_metadata(recipe: Recipe, class_index: int, class_name: str, prompt: str, seed: int, token_step: int,
                       source_key: str = "") -> dict:
    """A generated sample's metadata (``fillup_data.schema.sample``) with the recipe's generator settings."""
    g = recipe.generator
    return sample_schema.synthetic_metadata(
        class_index, class_name, strategy=g.strategy, prompt=prompt, seed=seed, token_step=token_step,
        guidance_scale=g.guidance_scale, num_inference_steps=g.num_inference_steps, model=g.model,
        source_key=source_key)


def strategy_context(recipe: Recipe, plan: Plan | None, plan_classes: list, out: Path, real_from_source: bool = False):
    """What the build's strategy reads: token files (textual_inversion), the real images of each class in
    plan order (strategies that start from real images: from the build's completed real shards, or from
    the source for ``preview``, which writes none), the build folder (stored prompts)."""
    from fillup_data.generation import real_images
    from fillup_data.generation.strategies import StrategyContext, strategy_class

    cls = strategy_class(recipe.generator.strategy)
    tokens = {}
    if cls.inverts:
        tokens = {c.index: token_path(out, c.index) for c in plan_classes if token_path(out, c.index).is_file()}
    if cls.uses_real_images:
        if plan is None:
            raise FillupError(f"generator.strategy {cls.name}: the plan's real samples are needed")
        if real_from_source:
            return real_images.from_source(recipe, plan, out, tokens)
        return real_images.from_real_shards(out, plan, tokens)
    return StrategyContext(out=out, token_files=tokens)


def make_generator(recipe: Recipe, plan_classes: list, out: Path, pipe, plan: Plan | None = None,
                   real_from_source: bool = False):
    """The build's SyntheticGenerator. ``generator.batch_size: auto`` is resolved once per build and
    pinned in ``out`` (every worker, rank and resume then uses the same micro-batch, which decides
    the pixels); an explicit size is used as given."""
    from fillup_data.generation import SyntheticGenerator
    from fillup_data.generation.sampler import DenoisingSampler, resolve_batch_size

    names = [c.name for c in plan_classes]
    context = strategy_context(recipe, plan, plan_classes, out, real_from_source)
    cfg = recipe.generator
    if cfg.batch_size == "auto":
        size = fastpath.pin_setting(out, "generator.batch_size", lambda: resolve_batch_size(DenoisingSampler(pipe), cfg))
        cfg = cfg.model_copy(update={"batch_size": size})
    return SyntheticGenerator(pipe, cfg, names, context=context)


class _ShardWriterThread:
    """Encodes generated chunks and writes them into ``writer`` in a background thread, in the order
    they were queued. An error on either side stops both: ``put``/``finish`` re-raise the thread's
    error in the caller; ``stop`` ends the thread before the caller aborts the writer."""

    def __init__(self, writer, write_chunk):
        self._writer = writer
        self._write_chunk = write_chunk
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"write {writer.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._queue.get()
                if chunk is None:
                    return
                self._write_chunk(chunk, self._stop)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.error = err
            self._stop.set()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if not self._thread.is_alive():
            raise RuntimeError(f"the thread writing {self._writer.path.name} ended early")

    def put(self, chunk) -> None:
        """Queue ``chunk``; blocks while the queue is full, and raises the thread's error if it died."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until everything queued is written; re-raise the thread's error."""
        self.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Stop after the sample being written (the caller failed): nothing more is written."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join()


def write_synthetic_shard(recipe: Recipe, plan: Plan, shard: ShardPlan, out: Path, generator, bar) -> tuple[list, list, int, int, str]:
    from fillup_data.generation import SampleSpec

    writer = ShardWriter(out / shard.path, recipe.shards.image_format)
    metas, retries = [], []

    def write_chunk(chunk, stop: threading.Event) -> None:  # in the writer thread
        for s, g in chunk:
            if stop.is_set():
                return
            name = plan.classes[s.class_index].name
            meta = synthetic_metadata(recipe, s.class_index, name, g.prompt, g.seed, s.token_step, g.source_key)
            writer.write(s.key, s.class_index, encode_image(g.image, recipe.shards), meta)
            metas.append(meta)
            retries.append(g.retries)

    chunk = generator.batch_size * _CHUNK_BATCHES
    background = _ShardWriterThread(writer, write_chunk)
    try:
        try:
            for start in range(0, len(shard.samples), chunk):
                part = shard.samples[start : start + chunk]
                specs = [SampleSpec(s.class_index, s.seed, s.token_step, s.ordinal) for s in part]
                background.put(list(zip(part, generator.generate(specs))))
                bar.update(len(part))
            background.finish()
        except BaseException:
            background.stop()  # the thread must be done with the tar before it is aborted
            raise
        num_bytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    rows = [index_row(rec, shard.path, shard.split, m, r) for rec, m, r in zip(writer.records, metas, retries)]
    return rows, metas, sum(retries), num_bytes, sha


# invert_all etc. live with the invert stage; regenerate in its own module (kept importable from here)
from fillup_data.regenerate import regenerate  # noqa: E402
from fillup_data.stages.invert import export_final_tokens, invert_all, load_class_images  # noqa: E402

__all__ = ["export_final_tokens", "invert_all", "load_class_images", "make_generator", "regenerate",
           "synthetic_metadata", "token_path", "write_synthetic_shard"]
