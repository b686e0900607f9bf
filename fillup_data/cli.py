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


def workers_arg(value: str) -> int:
    """``--workers N`` or ``auto`` (the CPUs this process may use: a Slurm allocation, not the node)."""
    if value == "auto":
        from fillup_data.executors.devices import usable_cpus

        return usable_cpus()
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {value!r}")
    return n


def _load(args):
    from fillup_data.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_validate(args) -> int:
    from fillup_data.recipe import fingerprint, model_revision

    recipe = _load(args)
    print(f"{args.recipe}: valid recipe {recipe.name} {recipe.version} "
          f"(source {recipe.source.kind}, fill {recipe.fill.policy}, strategy {recipe.generator.strategy})")
    print(f"fingerprint {fingerprint(recipe, model_revision(recipe))}")
    if args.show:
        import yaml

        print(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    return 0


def cmd_plan(args) -> int:
    from fillup_data.cost import choose_rates, format_cost, work_of
    from fillup_data.index import index_for_plan
    from fillup_data.plan import format_group_table, make_plan

    recipe = _load(args)
    if args.gpus is not None and args.gpus < 1:
        raise FillupError(f"--gpus: must be at least 1, got {args.gpus}")
    t0 = time.time()
    index, how = index_for_plan(recipe, workers=args.workers, reindex=args.reindex)
    print(f"index: {how} ({time.time() - t0:.1f}s)")
    plan = make_plan(recipe, index)
    print(f"{recipe.name} {recipe.version}: {len(plan.classes)} classes, imbalance factor {plan.imbalance_factor:.1f}, "
          f"fill {recipe.fill.policy}{'' if recipe.fill.target is None else ' ' + str(recipe.fill.target)}, "
          f"strategy {plan.strategy}")
    print(format_group_table(plan))
    by_origin = {}
    for s in plan.shards:
        by_origin[f"{s.split}-{s.origin}"] = by_origin.get(f"{s.split}-{s.origin}", 0) + 1
    print("shards: " + ", ".join(f"{k} {v}" for k, v in by_origin.items()))
    if index.skipped:
        print("skipped images: " + ", ".join(f"{n} {r}" for r, n in index.skip_counts().items()))
    print(f"images to generate: {plan.num_synthetic:,}   (planned in {time.time() - t0:.1f}s)")
    from fillup_data.stages.prompts import prompt_work_line

    if (line := prompt_work_line(recipe, plan)) is not None:
        print(line)
    work = work_of(recipe, plan)
    rates, why = choose_rates(recipe) if (work.synthetic_images or work.inversion_class_steps) else (None, "")
    print(format_cost(recipe, work, rates, why, gpus=args.gpus))
    if args.json:
        Path(args.json).write_text(json.dumps({"classes": [c.__dict__ for c in plan.classes],
                                               "groups": plan.group_table()}, indent=2))
    return 0


def cmd_bench(args) -> int:
    from fillup_data.bench import run_bench

    recipe = _load(args)
    result = run_bench(recipe, device=args.device, quick=args.quick)
    print(result.format())
    return 0


def cmd_build(args) -> int:
    from fillup_data.build import run_build

    recipe = _load(args)
    summary = run_build(recipe, args.out, workers=args.workers, force=args.force, progress=not args.quiet,
                        recipe_path=args.recipe, executor=_executor(args))
    print(summary.format())
    return 0


def _executor(args):
    """``--executor local|ray`` or ``--rank R --world-size W`` (else from Slurm array / torchrun variables)."""
    from fillup_data.executors import LocalExecutor, RankExecutor, RayExecutor, rank_from_env

    if (args.rank is None) != (args.world_size is None):
        raise FillupError("--rank and --world-size go together (or neither: then SLURM_ARRAY_TASK_ID/"
                          "SLURM_ARRAY_TASK_COUNT or RANK/WORLD_SIZE are read when set)")
    ranked = (args.rank, args.world_size) if args.rank is not None else (
        rank_from_env() if args.executor == "local" else None)
    if ranked is not None and ranked[1] > 1:
        if args.executor == "ray":
            raise FillupError("--executor ray runs the whole build from one driver: drop --rank/--world-size")
        return RankExecutor(ranked[0], ranked[1], lease_seconds=args.lease_seconds, poll_seconds=args.poll_seconds)
    if args.executor == "ray":
        return RayExecutor(args.ray_address, gpus_per_worker=args.gpus_per_worker, max_retries=args.max_retries)
    return LocalExecutor(max_retries=args.max_retries)


def cmd_status(args) -> int:
    from fillup_data.build import phase_lines, read_progress

    print(read_progress(args.out).format(Path(args.out)))
    for line in phase_lines(args.out):
        print(line)
    return 0


def cmd_inspect(args) -> int:
    from fillup_data.schema.manifest import Manifest
    from fillup_data.shards.writer import sha256_file

    out = Path(args.out)
    manifest = Manifest.read(out / "manifest.json")
    bad = 0
    from fillup_data.progress import track

    for s in track(manifest.shards, desc="verify shards", unit="shard"):
        path = out / s.path
        if not path.is_file():
            print(f"MISSING  {s.path}")
            bad += 1
            continue
        sha = sha256_file(path)
        try:
            with tarfile.open(path) as tar:
                keys = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        except tarfile.TarError as err:
            print(f"BROKEN   {s.path}: {err}")
            bad += 1
            continue
        if sha != s.sha256:
            print(f"SHA256   {s.path}: {sha} != manifest {s.sha256}")
            bad += 1
        elif len(keys) != s.num_samples:
            print(f"COUNT    {s.path}: {len(keys)} samples != manifest {s.num_samples}")
            bad += 1
    print(f"{manifest.name} {manifest.version} (fingerprint {manifest.fingerprint[:12]}): "
          f"{len(manifest.classes)} classes, imbalance factor {manifest.imbalance_factor}")
    print(_manifest_group_table(manifest))
    total = sum(s.num_samples for s in manifest.shards)
    print(f"{len(manifest.shards)} shards, {total:,} samples: "
          + ("all sha256 and sample counts match the manifest" if not bad else f"{bad} shard(s) FAILED verification"))
    return 0 if not bad else 1


def _pick_classes(spec: str, names: list[str]) -> list[int]:
    picked = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part.isdigit() and int(part) < len(names):
            picked.append(int(part))
        elif part in names:
            picked.append(names.index(part))
        else:
            raise FillupError(f"--classes: {part!r} is neither a class index (0..{len(names) - 1}) nor a class name")
    if not picked:
        raise FillupError("--classes: name at least one class (indices or names, comma-separated)")
    return picked


def cmd_preview(args) -> int:
    """Invert a few classes with the recipe's settings and draw real vs synthetic, before a full build."""
    from fillup_data.generation import SampleSpec, preview_grid
    from fillup_data.index import index_for_plan
    from fillup_data.generation.strategies import strategy_class
    from fillup_data.plan import make_plan, sample_seed
    from fillup_data import synthesis

    recipe = _load(args)
    if recipe.generator.strategy == "none":
        raise FillupError("generator.strategy is none: there is nothing to preview")
    t0 = time.time()
    index, _ = index_for_plan(recipe, workers=args.workers)
    plan = make_plan(recipe, index)
    classes = _pick_classes(args.classes, index.class_names)
    work = Path(args.tokens) if args.tokens else Path(args.out).with_suffix("").with_name(Path(args.out).stem + "-tokens")
    strategy = strategy_class(recipe.generator.strategy)
    pipe = strategy.load_pipeline(recipe.generator, device=None)
    if strategy.inverts:
        synthesis.invert_all(recipe, plan, index, work, pipe, progress=True, classes=classes)
    if strategy.prepares:  # the prompts a build would make first (lm_prompts, captions), for these classes
        from fillup_data.stages.prompts import PromptMaker, make_prompts, prompt_groups

        prompt_groups(recipe, plan)  # refuses what a build would refuse (captions of a class without images)
        device = str(pipe.unet.device)
        make_prompts(recipe, plan, work, classes, lambda: PromptMaker(recipe, plan, device=device), progress=True)
    generator = synthesis.make_generator(recipe, plan.classes, work, pipe, plan=plan, real_from_source=True)
    real, synthetic = {}, {}
    for c in classes:
        items = [it for it in index.items["train"] if it.label == c][: args.n]
        real[c] = synthesis.load_class_images(recipe, items)
        steps = plan.classes[c].token_steps or (-1,)
        # the same seeds and round-robin checkpoints a build gives the class's first n samples
        specs = [SampleSpec(c, sample_seed(recipe.seed, c, k), steps[k % len(steps)], k) for k in range(args.n)]
        synthetic[c] = [g.image for g in generator.generate(specs, progress=True)]
    preview_grid(real, synthetic, index.class_names, args.out)
    print(f"preview of {len(classes)} class(es), {args.n} real and {args.n} synthetic each: {args.out} "
          f"(tokens in {work}; {time.time() - t0:.1f}s)")
    return 0


def cmd_regenerate(args) -> int:
    from fillup_data.regenerate import regenerate_sample

    res = regenerate_sample(Path(args.out), args.key)
    res.image.save(args.image)
    print(f"regenerated {args.key} -> {args.image}: {res.summary()}")
    if args.require_exact and not res.exact:
        return 1
    return 0


def cmd_export_token(args) -> int:
    from fillup_data.inversion import export_diffusers, read_token_file

    token = read_token_file(Path(args.token_file))
    step = args.step if args.step is not None else token.checkpoint_steps[-1]
    if step not in token.checkpoint_steps:
        raise FillupError(f"{args.token_file}: no checkpoint at step {step}; it has {token.checkpoint_steps}")
    export_diffusers(token, step, Path(args.out), token_name=args.token)
    print(f"class {token.class_index} {token.class_name!r}, step {step} -> {args.out} "
          f"(diffusers format: pipe.load_textual_inversion({args.out!r}))")
    return 0


def _manifest_group_table(manifest) -> str:
    from fillup_data.schema.groups import GROUPS

    head = f"{'group':<8}{'classes':>9}{'real':>11}{'synthetic':>12}{'total':>11}{'test':>9}"
    lines = [head, "-" * len(head)]
    for g in (*GROUPS, "all"):
        cs = [c for c in manifest.classes if g == "all" or c.group == g]
        r, s, t = (sum(c.real for c in cs), sum(c.synthetic for c in cs), sum(c.test for c in cs))
        if g == "all":
            lines.append("-" * len(head))
        lines.append(f"{g:<8}{len(cs):>9}{r:>11,}{s:>12,}{r + s:>11,}{t:>9,}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fillup-data",
        description="Balance long-tailed image datasets with a text-to-image model (Fill-Up): build, inspect, "
        "publish and train on versioned WebDataset shards.",
    )
    parser.add_argument("--version", action="version", version=f"fillup-data {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and print its fingerprint")
    _add_recipe_args(p)
    p.add_argument("--show", action="store_true", help="print the resolved recipe")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="index the source and print the fill-up plan per group")
    _add_recipe_args(p)
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="processes that decode images when the source is indexed (default: auto, every usable CPU)")
    p.add_argument("--reindex", action="store_true",
                   help="decode the source again even when its kept index is still valid")
    p.add_argument("--json", help="also write the plan's class table to this JSON file")
    p.add_argument("--gpus", type=int, default=None, help="also estimate the wall-clock time on this many GPUs")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="measure this machine's generation and inversion rates for `plan`")
    _add_recipe_args(p)
    p.add_argument("--quick", action="store_true", help="a few timed micro-batches and steps (under 2 minutes)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("build", help="run (or resume) a build: tokens + shards + manifest + card")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="output folder (relaunch with the same folder to resume)")
    p.add_argument("--workers", type=workers_arg, default=None,
                   help="CPU processes for indexing and real shards (default: every usable CPU, at most 8; or auto)")
    p.add_argument("--force", action="store_true",
                   help="if OUT holds another recipe's build, delete that build's files (never other files) and start over")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one worker per visible GPU (in-process on CPU); ray: actors on a Ray cluster")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="the Ray cluster to join (default: the one this process joined, else a new local one)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPUs per Ray actor (fractions share a GPU)")
    p.add_argument("--max-retries", type=int, default=3, help="resubmissions of a task lost with its worker or node")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (with --world-size)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks sharing the build folder")
    p.add_argument("--lease-seconds", type=float, default=120.0,
                   help="a rank's task claim not renewed for this long is taken over by a running rank")
    p.add_argument("--poll-seconds", type=float, default=5.0, help="how often a waiting rank looks at the folder")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("status", help="how far a build has got")
    p.add_argument("out")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("inspect", help="verify every shard's sha256 and count against the manifest")
    p.add_argument("out")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("preview", help="invert a few classes and draw real vs synthetic images before a full build")
    _add_recipe_args(p)
    p.add_argument("--classes", required=True, help="class indices or names, comma-separated")
    p.add_argument("--n", type=int, default=8, help="images per class and side")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--tokens", help="folder for the preview's token and prompts files (default: next to --out)")
    p.add_argument("--workers", type=workers_arg, default="auto", help="processes that decode images when indexing")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("regenerate", help="regenerate one synthetic sample of a build from its metadata")
    p.add_argument("out", help="build folder")
    p.add_argument("--key", required=True, help="the sample's __key__")
    p.add_argument("--image", required=True, help="image file to write")
    p.add_argument("--require-exact", action="store_true",
                   help="exit with status 1 unless the stored image's bytes are reproduced")
    p.set_defaults(func=cmd_regenerate)

    p = sub.add_parser("export-token", help="write one checkpoint of a class token in diffusers format")
    p.add_argument("token_file", help="tokens/NNNNN.safetensors of a build")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--token", default=None, help="token string in the file (default <fillup-NNNNN>)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_token)

    # verbs that live with their subsystems
    from fillup_data.compare import register as add_compare_parser
    from fillup_data.hub import add_publish_parser
    from fillup_data.quality.cli import register as add_quality_parsers
    from fillup_data.train.cli import add_eval_parser, add_train_parser

    for add in (add_publish_parser, add_train_parser, add_eval_parser, add_quality_parsers, add_compare_parser):
        add(sub)
    for p in sub.choices.values():  # the same flag on every command
        if "--quiet" not in p._option_string_actions:
            p.add_argument("--quiet", action="store_true",
                           help="no progress bars or lines and no information lines: warnings and the summary only")
    return parser


def main(argv: list[str] | None = None) -> int:
    from fillup_data import progress

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = progress.configure(quiet=getattr(args, "quiet", False))
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
    finally:
        progress.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
