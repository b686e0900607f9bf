"""`fillup-data train` and `fillup-data eval` (contract verbs); hooked into fillup_data/cli.py.

Both run as a plain process or under ``torchrun --nproc_per_node N -m fillup_data.cli train ...``.
Handlers return an exit status; FillupError propagates to the main CLI, which prints it (status 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fillup_data.errors import FillupError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="a build folder (OUT of `fillup-data build`) or a Hub dataset id org/name[@revision]")
    p.add_argument("--real-data", default=None,
                   help="a build with the real shards (e.g. your local real-only build) when --data holds only "
                        "synthetic ones; classes must match")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank (default: recipe)")
    p.add_argument("--cache-dir", default=None, help="huggingface_hub cache for the manifest (default: HF_HOME)")


# train flags that set the trained stage's filter (fillup_data.loader.score_filter.SampleFilter)
FILTER_FLAGS = (
    ("--min-clip-score", "min_clip_score", float, "keep synthetic samples with clip_score >= X"),
    ("--max-real-similarity", "max_real_similarity", float,
     "drop near-copies of real images: keep real_similarity <= X"),
    ("--min-class-confidence", "min_class_confidence", float, "keep class_confidence >= X (0..1)"),
    ("--top-k-per-class", "top_k_per_class", int,
     "then keep the K best synthetic samples of each class by clip_score (ties by key)"),
)


def filter_overrides(args: argparse.Namespace) -> list[str]:
    """The filter flags as ``--set stage<N>.filter.<field>=value`` overrides (applied after the others)."""
    return [f"stage{args.stage}.filter.{field}={getattr(args, field)!r}"
            for _, field, _, _ in FILTER_FLAGS if getattr(args, field) is not None]


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a classifier on a build (Balanced Softmax, two stages)",
        description="Stage I on the filled-up data, then Stage II on real data from the Stage I weights "
                    "(paper 3.2, B.4). Example: fillup-data train --data OUT --config recipes/train/demo.yaml "
                    "--stage 1 --out RUN1; then --stage 2 --init RUN1 --out RUN2.",
    )
    _common(p)
    p.add_argument("--config", required=True, help="train recipe YAML (recipes/train/*.yaml)")
    p.add_argument("--stage", type=int, required=True, choices=(1, 2))
    p.add_argument("--out", required=True, help="run folder to create (checkpoints, log, final weights)")
    p.add_argument("--init", default=None, help="Stage II: the finished Stage I run folder")
    p.add_argument("--resume", action="store_true", help="continue --out from its last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a train recipe field, e.g. --set stage1.epochs=10 (repeatable)")
    f = p.add_argument_group(
        "score filter", "keep only the synthetic samples whose index.parquet scores pass (run `fillup-data score "
        "OUT` first); the same as the recipe's stage<N>.filter fields; real samples are always kept")
    for flag, field, kind, what in FILTER_FLAGS:
        f.add_argument(flag, dest=field, type=kind, default=None, metavar="K" if kind is int else "X", help=what)
    p.set_defaults(func=run_train)
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="evaluate a run on the test split: top-1/top-5, many/medium/few, per-class CSV and plot",
        description="Scores RUN/model.safetensors (the last epoch; no checkpoint is chosen on the test split) "
                    "and writes metrics.json, per_class.csv and per_class_accuracy.png.",
    )
    _common(p)
    p.add_argument("--run", required=True, help="a finished run folder of `fillup-data train`")
    p.add_argument("--out", default=None, help="where to write the metrics (default: the run folder)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: recipe eval_batch_size)")
    p.set_defaults(func=run_eval)
    return p


def run_train(args: argparse.Namespace) -> int:
    from fillup_data.train.config import load_train_config
    from fillup_data.train.distributed import init_distributed, shutdown
    from fillup_data.train.trainer import TrainRequest, train

    if args.stage == 1 and args.init:
        raise FillupError("--init is for --stage 2 (Stage I starts from scratch or from model.weights)")
    cfg = load_train_config(args.config, [*args.overrides, *filter_overrides(args)])
    env = init_distributed(args.device)
    ok = False
    try:
        final = train(TrainRequest(
            data=args.data, config=cfg, stage=args.stage, out=Path(args.out), real_data=args.real_data,
            init=Path(args.init) if args.init else None, resume=args.resume, num_workers=args.num_workers,
            cache_dir=args.cache_dir,
        ), env)
        if env.is_main:
            print(f"stage {args.stage} done: {final}")
        ok = True
    finally:
        shutdown(env, ok)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from fillup_data.train.distributed import init_distributed, shutdown
    from fillup_data.schema.groups import GROUPS
    from fillup_data.train.evaluate import evaluate_run

    env = init_distributed(args.device)
    ok = False
    try:
        m = evaluate_run(args.data, Path(args.run), env, real_data=args.real_data,
                         out=Path(args.out) if args.out else None, batch_size=args.batch_size,
                         num_workers=args.num_workers, cache_dir=args.cache_dir)
        if env.is_main:
            def fmt(v):
                return "  -  " if v is None else f"{v:5.1f}"
            print(f"top-1 {m['top1']:.2f}  top-5 {m['top5']:.2f}  " + "  ".join(
                f"{g} {fmt(m[g])} ({m[g + '_classes']} classes)" for g in GROUPS))
            print(f"wrote {Path(args.out or args.run) / 'metrics.json'}")
        ok = True
    finally:
        shutdown(env, ok)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m fillup_data.train.cli``) until the main CLI hooks the verbs in."""
    import sys

    parser = argparse.ArgumentParser(prog="fillup-data")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FillupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
