"""The ``fillup-data`` command line (contract verbs: validate, plan, build, status, inspect, publish,
train, eval).  Bad input exits with status 2 and a message, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

from fillup_data import __version__
from fillup_data.errors import FillupError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe field (repeatable), e.g. --set fill.target=500")


def _load(args):
    from fillup_data.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_validate(args) -> int:
    from fillup_data.build import model_revision
    from fillup_data.recipe import fingerprint

    recipe = _load(args)
    print(f"{args.recipe}: valid recipe {recipe.name} {recipe.version} "
          f"(source {recipe.source.kind}, fill {recipe.fill.policy}, strategy {recipe.generator.strategy})")
    print(f"fingerprint {fingerprint(recipe, model_revision(recipe))}")
    if args.show:
        import yaml

        print(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    return 0


def cmd_plan(args) -> int:
    from fillup_data.index import build_index
    from fillup_data.plan import format_group_table, make_plan

    recipe = _load(args)
    t0 = time.time()
    index = build_index(recipe, workers=args.workers)
    plan = make_plan(recipe, index)
    print(f"{recipe.name} {recipe.version}: {len(plan.classes)} classes, imbalance factor {plan.imbalance_factor:.1f}, "
          f"fill {recipe.fill.policy}{'' if recipe.fill.target is None else ' ' + str(recipe.fill.target)}, "
          f"strategy {plan.strategy}")
    print(format_group_table(plan))
    by_origin = {}
    for s in plan.shards:
        by_origin[f"{s.split}-{s.origin}"] = by_origin.get(f"{s.split}-{s.origin}", 0) + 1
    print(f"shards: " + ", ".join(f"{k} {v}" for k, v in by_origin.items()))
    if index.skipped:
        print("skipped images: " + ", ".join(f"{n} {r}" for r, n in index.skip_counts().items()))
    print(f"images to generate: {plan.num_synthetic:,}   (planned in {time.time() - t0:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"classes": [c.__dict__ for c in plan.classes],
                                               "groups": plan.group_table()}, indent=2))
    return 0


def cmd_build(args) -> int:
    from fillup_data.build import run_build

    recipe = _load(args)
    summary = run_build(recipe, args.out, workers=args.workers, force=args.force, progress=not args.quiet)
    print(summary.format())
    return 0


def cmd_status(args) -> int:
    from fillup_data.build import STATE_DIR

    out = Path(args.out)
    state = out / STATE_DIR
    if not (state / "build.json").is_file():
        raise FillupError(f"{out}: not a fillup-data build (no {STATE_DIR}/build.json)")
    plan_path = state / "plan.json"
    planned = json.loads(plan_path.read_text())["shards"] if plan_path.is_file() else []
    done = {p.stem for p in (state / "shards").glob("*.json")}
    n_done = sum(1 for s in planned if Path(s).stem in done)
    tokens = len(list((out / "tokens").glob("*.safetensors"))) if (out / "tokens").is_dir() else 0
    finished = (out / "manifest.json").is_file()
    print(f"{out}: {'finished' if finished else 'in progress'}; shards {n_done}/{len(planned)} done; token files {tokens}")
    return 0


def cmd_inspect(args) -> int:
    from fillup_data.shards.manifest import read_manifest
    from fillup_data.shards.writer import sha256_file

    out = Path(args.out)
    manifest = read_manifest(out)
    bad = 0
    from tqdm.auto import tqdm

    for s in tqdm(manifest["shards"], desc="verify shards", unit="shard"):
        path = out / s["path"]
        if not path.is_file():
            print(f"MISSING  {s['path']}")
            bad += 1
            continue
        sha = sha256_file(path)
        try:
            with tarfile.open(path) as tar:
                keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        except tarfile.TarError as err:
            print(f"BROKEN   {s['path']}: {err}")
            bad += 1
            continue
        if sha != s["sha256"]:
            print(f"SHA256   {s['path']}: {sha} != manifest {s['sha256']}")
            bad += 1
        elif len(keys) != s["num_samples"]:
            print(f"COUNT    {s['path']}: {len(keys)} samples != manifest {s['num_samples']}")
            bad += 1
    print(f"{manifest['name']} {manifest['version']} (fingerprint {manifest['fingerprint'][:12]}): "
          f"{len(manifest['classes'])} classes, imbalance factor {manifest.get('imbalance_factor')}")
    print(_manifest_group_table(manifest))
    total = sum(s["num_samples"] for s in manifest["shards"])
    print(f"{len(manifest['shards'])} shards, {total:,} samples: "
          + ("all sha256 and sample counts match the manifest" if not bad else f"{bad} shard(s) FAILED verification"))
    return 0 if not bad else 1


def _manifest_group_table(manifest: dict) -> str:
    head = f"{'group':<8}{'classes':>9}{'real':>11}{'synthetic':>12}{'total':>11}{'test':>9}"
    lines = [head, "-" * len(head)]
    for g in ("many", "medium", "few", "all"):
        cs = [c for c in manifest["classes"] if g == "all" or c["group"] == g]
        r, s, t = (sum(c[k] for c in cs) for k in ("real", "synthetic", "test"))
        if g == "all":
            lines.append("-" * len(head))
        lines.append(f"{g:<8}{len(cs):>9}{r:>11,}{s:>12,}{r + s:>11,}{t:>9,}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fillup-data", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fillup-data {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and print its fingerprint")
    _add_recipe_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved recipe")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="index the source and print the fill-up plan per group")
    _add_recipe_args(p)
    p.add_argument("--workers", type=int, default=1, help="processes that verify images")
    p.add_argument("--json", help="also write the plan's class table to this JSON file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("build", help="run (or resume) a build: tokens + shards + manifest + card")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="output folder (relaunch with the same folder to resume)")
    p.add_argument("--workers", type=int, default=None, help="CPU processes for indexing and real shards")
    p.add_argument("--force", action="store_true", help="delete OUT if it holds another recipe's build")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("status", help="how far a build has got")
    p.add_argument("out")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("inspect", help="verify every shard's sha256 and count against the manifest")
    p.add_argument("out")
    p.set_defaults(func=cmd_inspect)

    for hook in _optional_hooks():
        hook(sub)
    return parser


def _optional_hooks():
    """Verbs that live with their subsystems (publish, train, eval, preview, export-token)."""
    hooks = []
    for module, names in (
        ("fillup_data.hub", ("add_publish_parser",)),
        ("fillup_data.train.cli", ("add_train_parser", "add_eval_parser")),
        ("fillup_data.generation.cli", ("add_preview_parser", "add_export_parser")),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("fillup_data"):
                continue
            raise
        hooks += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return hooks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FillupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fillup-data ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: relaunch the same command to resume where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
