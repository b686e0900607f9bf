"""Loader throughput: fillup_data.loader against a bare webdataset pipeline, same shards, same transforms.

Both sides read the same tars, decode with PIL, apply the same torchvision train transform (paper B.4:
RandomResizedCrop + flip + colour jitter, optionally RandAugment), shuffle with the same buffer size
and batch; they run alternately in one process (A B A B ...) and the median images/s of each is
reported.  Our loader adds the manifest, rank/worker shard dealing, per-epoch seeding and the exact
epoch length on top; the ratio shows what that costs (target: at most 10% overhead).

    python benchmarks/loader.py                       # makes a temporary 256x256 JPEG build
    python benchmarks/loader.py --data out/demo --size 32 --crop pad
    python benchmarks/loader.py --workers 2 --rounds 5 --images 4000
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from provenance import git_commit  # benchmarks/ is on sys.path when a script here runs

import numpy as np
import torch
from PIL import Image


def make_bench_build(out: Path, images: int, classes: int, side: int, shard_size: int) -> Path:
    """A throw-away build in the contract layout: JPEG images of ``side`` px (smooth noise, ~ photo-sized files)."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for s in range(0, images, shard_size):
        path = f"data/train-real-{s // shard_size:05d}.tar"
        with tarfile.open(out / path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(s, min(s + shard_size, images)):
                small = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                label = j % classes
                for ext, data in (("cls", str(label).encode()), ("jpg", buf.getvalue()),
                                  ("json", json.dumps({"label": label}).encode())):
                    info = tarfile.TarInfo(f"s{j:07d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        data = (out / path).read_bytes()
        shards.append({"path": path, "split": "train", "origin": "real",
                       "num_samples": min(shard_size, images - s), "num_bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    counts = [images // classes + (i < images % classes) for i in range(classes)]
    manifest = {"name": "bench", "version": "0.0.0", "fingerprint": "", "recipe": {},
                "classes": [{"index": i, "name": f"c{i}", "real": n, "synthetic": 0, "test": 0}
                            for i, n in enumerate(counts)],
                "groups": {"many_above": 100, "few_below": 20}, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def run_ours(data, subset, tf, batch, workers, buffer) -> tuple[int, float]:
    from fillup_data.loader import make_loader

    loader = make_loader(data, subset, "train", batch, tf, train=True, num_workers=workers, shuffle_buffer=buffer)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n, time.perf_counter() - t0


def run_bare(urls, tf, batch, workers, buffer) -> tuple[int, float]:
    """The plain webdataset recipe from its README, with the same transform, buffer and batching."""
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False, seed=0)
        .shuffle(buffer)
        .decode("pil")
        .to_tuple("jpg;jpeg;png;webp", "cls")
        .map_tuple(tf, int)
        .batched(batch, partial=False)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n, time.perf_counter() - t0


def provenance() -> str:
    """What a results table needs next to each number: when, which commit, which libraries, how busy the box was."""
    import torchvision
    import webdataset

    commit = git_commit()
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
            f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"webdataset {webdataset.__version__}, {os.cpu_count()} CPUs, load average {load_average()}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an existing build folder (default: a temporary one is made)")
    ap.add_argument("--subset", default="filled", choices=("filled", "real", "synthetic"))
    ap.add_argument("--images", type=int, default=2000, help="temporary build: number of images")
    ap.add_argument("--side", type=int, default=256, help="temporary build: image side in px")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--size", type=int, default=224, help="crop size of the train transform")
    ap.add_argument("--crop", default="random_resized", choices=("random_resized", "pad"))
    ap.add_argument("--randaugment", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--buffer", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fillup_data.loader import TrainingData, train_transform

    tmp = None
    if args.data:
        root = Path(args.data)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fillup-bench-")
        root = make_bench_build(Path(tmp.name), args.images, 10, args.side, args.shard_size)
    data = TrainingData.open(root)
    shards = data.shards(args.subset, "train")
    urls = [s.url for s in shards]
    tf = train_transform(args.size, crop=args.crop, randaugment=args.randaugment)

    print(provenance(), flush=True)
    ours, bare = [], []
    run_ours(data, args.subset, tf, args.batch, args.workers, args.buffer)  # warm-up: imports, page cache
    for r in range(args.rounds):
        for name, fn in (("ours", lambda: run_ours(data, args.subset, tf, args.batch, args.workers, args.buffer)),
                         ("bare", lambda: run_bare(urls, tf, args.batch, args.workers, args.buffer)))[:: 1 if r % 2 == 0 else -1]:
            n, sec = fn()
            (ours if name == "ours" else bare).append(n / sec)
            print(f"round {r + 1} {name:4s}: {n} images in {sec:.2f}s = {n / sec:.1f} images/s", flush=True)
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"\nload average at the end: {load_average()}")
    print(f"shards {len(urls)}, images/epoch {sum(s.num_samples for s in shards)}, crop {args.size}, "
          f"batch {args.batch}, workers {args.workers}, threads {args.threads}, randaugment {args.randaugment}")
    print(f"median images/s: fillup_data.loader {o:.1f} | bare webdataset {b:.1f} | ratio {o / b:.3f} "
          f"(overhead {100 * (1 - o / b):+.1f}%)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
