"""``fillup-data score`` and ``fillup-data quality``; hooked into fillup_data/cli.py by ``register``."""

from __future__ import annotations

import argparse

from fillup_data.schema.scores import DEFAULT_CLIP_MODEL, NEAR_COPY, TINY_CLIP

POOLED_SAMPLE = 10_000  # = fillup_data.quality.report.POOLED_SAMPLE (a test holds them equal); no numpy at --help


def register(subparsers) -> None:
    from fillup_data.cli import workers_arg

    p = subparsers.add_parser(
        "score", help="add quality scores of every sample to index.parquet (CLIP score, classifier confidence, "
                      "nearest real image)",
        description="Adds the columns clip_score, class_confidence, real_similarity and nearest_real_key to "
                    "OUT/index.parquet; shards are only read. Resumable: relaunch to redo only unfinished shards.")
    p.add_argument("out", help="a finished build folder")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help=f"a transformers CLIP model: hub id or local folder (default {DEFAULT_CLIP_MODEL}; "
                        f"{TINY_CLIP}: a tiny random offline model for tests)")
    p.add_argument("--classifier", default=None, metavar="RUN",
                   help="a finished run folder of `fillup-data train` (e.g. a Stage II run on this build) for "
                        "class_confidence; without a classifier that column is NaN")
    p.add_argument("--classifier-arch", default=None, metavar="NAME", help="a torchvision model name (with "
                   "--classifier-weights) instead of --classifier")
    p.add_argument("--classifier-weights", default=None, metavar="FILE.safetensors",
                   help="its state dict, with a head of the build's number of classes")
    p.add_argument("--classifier-image-size", type=int, default=224, help="with --classifier-arch: center crop")
    p.add_argument("--classifier-resize", type=int, default=256, help="with --classifier-arch: short side resize")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser(
        "quality", help="write OUT/quality/: per-class score distributions, FID and precision/recall, near-copies, "
                        "best and worst images (needs `score` first)")
    p.add_argument("out", help="a scored build folder")
    p.add_argument("--near-copy", type=float, default=NEAR_COPY,
                   help="real_similarity at or above which a synthetic image counts as a near-copy")
    p.add_argument("--per-class", type=int, default=8, help="best and worst images shown per class")
    p.add_argument("--pooled-sample", type=int, default=POOLED_SAMPLE, metavar="N",
                   help=f"the pooled precision/recall (quadratic in the images) compares at most N real and N "
                        f"synthetic images, a seeded sample (default {POOLED_SAMPLE:,}); FID uses every image")
    p.add_argument("--workers", type=workers_arg, default=None,
                   help="processes drawing the per-class figures from 64 classes on (default: the usable CPUs, "
                        "at most 8)")
    p.set_defaults(func=cmd_quality)


def cmd_score(args: argparse.Namespace) -> int:
    from fillup_data.quality.scoring import score_build

    summary = score_build(
        args.out, clip_model=args.clip_model, classifier_run=args.classifier, classifier_arch=args.classifier_arch,
        classifier_weights=args.classifier_weights, classifier_image_size=args.classifier_image_size,
        classifier_resize=args.classifier_resize, device=args.device, batch_size=args.batch_size,
        progress=not args.quiet)
    print(summary.format())
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fillup_data.quality.report import REPORT, write_quality_report

    summary = write_quality_report(args.out, per_class=args.per_class, near_copy=args.near_copy,
                                   progress=not args.quiet, pooled_sample=args.pooled_sample, workers=args.workers)
    o = summary["overall"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    print(f"wrote {Path(args.out) / REPORT}: {len(summary['classes'])} classes; all classes pooled: FID {fmt(o['fid'])}, "
          f"precision {fmt(o['precision'])}, recall {fmt(o['recall'])}, near-copies {o['near_copies']}")
    return 0
