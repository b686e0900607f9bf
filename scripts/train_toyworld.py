#!/usr/bin/env python
"""Reproduce the shipped toyworld weights (fillup_data/demo/toyworld/pipeline/ and the world classifier).

    python scripts/train_toyworld.py all --work build/toyworld-train     # classifier, generator, export
    python scripts/train_toyworld.py classifier                          # the world classifier (~7 min on 2 cores)
    python scripts/train_toyworld.py generator --work build/toyworld-train   # resumable
    python scripts/train_toyworld.py export --work build/toyworld-train  # writes the pipeline folder
    python scripts/train_toyworld.py measure --work build/toyworld-train # numbers for benchmarks/RESULTS.md
    python scripts/train_toyworld.py measure --parts checks              # only what the tests assert

The defaults are the shipped generator's settings: the exact space-to-depth autoencoder, the "large"
UNet (6.6M parameters), 5,000 steps of batch 128, 15% of the images with the harder backgrounds. On a GPU
machine add ``--device cuda --data-workers 4`` (same data stream; about 6 minutes on an H200, many hours
on 2 CPU cores); ``scripts/toyworld_gpu.sh`` is the one-sitting GPU run that trained the shipped weights.
``--autoencoder trained`` (with the ``vae`` stage) is the earlier VAE approximation.

Seeded: the same commands give the same weights on the same machine and library versions.
Relaunching a stage resumes it from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    from fillup_data.demo.toyworld import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["generator", "vae", "classifier", "export", "all", "measure"])
    p.add_argument("--work", default="build/toyworld-train", help="checkpoints and logs (resumable)")
    p.add_argument("--steps", type=int, default=None, help="generator steps (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="pipeline folder (default: the package's demo/toyworld/pipeline)")
    p.add_argument("--ti-steps", type=int, default=600, help="Textual Inversion steps in `measure`")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: chosen per step by measurement)")
    p.add_argument("--parts", nargs="+", default=None, help="measure only these parts: classifier words inversion checks hard")
    p.add_argument("--autoencoder", choices=["trained", "exact"], default="exact",
                   help="the generator's autoencoder: the trained VAE approximation, or exact space-to-depth "
                        "(fixed per --work dir: a resumed run or its export must name the same)")
    p.add_argument("--device", default="cpu",
                   help="where the models run (cuda on a GPU machine); the data is drawn on the CPU, the same for any device")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes drawing the world's images ahead of the model (a GPU run needs several)")
    p.add_argument("--unet", choices=["base", "large"], default="large", help="the generator UNet's width")
    p.add_argument("--hard-fraction", type=float, default=None,
                   help="share of the generator's pretraining images with the harder backgrounds (world.draw(hard=True); "
                        "default 0.15)")
    p.add_argument("--batch-size", type=int, default=None, help="generator images per step (default 128)")
    p.add_argument("--classifier-steps", type=int, default=1200, help="world classifier training steps")
    p.add_argument("--classifier-out", default=None, help="world classifier weights (default: the package's)")
    args = p.parse_args(argv)
    if args.stage == "vae" and args.autoencoder == "exact":
        p.error("the exact autoencoder has no weights to train; run `generator` and `export` with --autoencoder exact")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = train.GeneratorTrainConfig(seed=args.seed, autoencoder=args.autoencoder, unet=args.unet)
    for name in ("steps", "batch_size", "hard_fraction"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.stage == "all":
        stages = ["classifier", "vae", "generator", "export"] if args.autoencoder == "trained" else ["classifier", "generator", "export"]
    else:
        stages = [args.stage]
    for stage in stages:
        if stage == "generator":
            train.train_generator(work, cfg, threads=args.threads, device=args.device, data_workers=args.data_workers)
        elif stage == "vae":
            from fillup_data.demo.toyworld import vae

            vae.train_vae(work / "vae", seed=args.seed)
        elif stage == "classifier":
            from fillup_data.demo.toyworld import classifier

            classifier.train_classifier(args.classifier_out, steps=args.classifier_steps, seed=args.seed, device=args.device,
                                        data_workers=args.data_workers)
        elif stage == "measure":
            import json

            from fillup_data.demo.toyworld import load_toyworld
            from fillup_data.demo.toyworld.classifier import load_classifier
            from fillup_data.demo.toyworld.evaluate import MEASURE_PARTS, measure

            commit = _commit()  # before the run: the code it loads is this checkout's
            pipe = load_toyworld(device=args.device) if args.out is None else _load(args.out, args.device)
            work.mkdir(parents=True, exist_ok=True)
            result = measure(pipe, load_classifier(args.classifier_out), ti_steps=args.ti_steps, parts=args.parts or MEASURE_PARTS,
                             work_dir=work)
            (work / "measure.json").write_text(json.dumps(result, indent=1) + "\n")
            import datetime
            import platform

            import torch

            from fillup_data.demo.toyworld.evaluate import results_markdown

            machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
            if args.device != "cpu":
                machine += f", models on {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}"
            command = "python scripts/train_toyworld.py " + " ".join(argv if argv is not None else sys.argv[1:])
            md = results_markdown(result, machine=machine, date=datetime.date.today().isoformat(), command=command,
                                  commit=commit)
            (work / "measure.md").write_text(md)
            print(md)
            print(f"wrote {work / 'measure.json'} and {work / 'measure.md'}")
        elif stage == "export":
            from fillup_data.demo.toyworld import export

            export.export_pipeline(work, cfg, args.out)
    return 0


def _commit() -> str:
    """The checkout's commit, marked when the tree differs from it (the numbers then are not that commit's)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


def _load(folder, device="cpu"):
    from fillup_data.models.pipeline import load_pipeline

    return load_pipeline(str(folder), dtype="float32", device=device, scheduler="ddim")


if __name__ == "__main__":
    sys.exit(main())
