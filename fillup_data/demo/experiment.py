"""The paper's Table 6 protocol in miniature, on the demo world (``make experiment``).

One build per build seed (the recipe's ``seed``: it draws the long-tailed real set, the Textual
Inversion and the synthetic images), then four classifiers on each, each trained with several seeds and
evaluated on the balanced test split of its build:

- CE baseline: long-tailed real data, cross-entropy;
- BS: long-tailed real data, Balanced Softmax;
- Fill-Up Stage I: real + synthetic (filled up), Balanced Softmax over real counts;
- Fill-Up Stage I + II: Stage I, then real data only, Balanced Softmax.

Reported: overall / many / medium / few top-1, mean and standard deviation over every (build seed,
classifier seed) run, the per-build means, plus the world classifier's accuracy on each class's
synthetic images (the world's "classification accuracy score" of the generator).  Everything runs in
one process, one torch job at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fillup_data.demo import experiment_steps as steps
from fillup_data.result_table import COLUMNS, format_cell, json_safe, provenance, provenance_line, seed_row
from fillup_data.schema.groups import count_groups

METHODS = (
    ("CE baseline", "ce", [("1", ["stage1.data=real", "stage1.loss=cross_entropy"])]),
    ("BS", "bs", [("1", ["stage1.data=real", "stage1.loss=balanced_softmax"])]),
    ("Fill-Up Stage I + BS", "fillup1", [("1", ["stage1.data=filled", "stage1.loss=balanced_softmax"])]),
    ("Fill-Up Stage I + II + BS", "fillup2", [("1", ["stage1.data=filled", "stage1.loss=balanced_softmax"]),
                                              ("2", ["stage2.data=real", "stage2.loss=balanced_softmax"])]),
)


def synthetic_fidelity(build: Path) -> dict:
    """World-classifier accuracy (shape and colour both right) on every class's synthetic images."""
    import io

    from PIL import Image

    from fillup_data.schema.manifest import Manifest
    from fillup_data.shards.index_parquet import read_index
    from fillup_data.demo.toyworld.classifier import classify, load_classifier

    manifest = Manifest.read(build / "manifest.json")
    rows = [r for r in read_index(build / "index.parquet") if r["is_synthetic"]]
    model = load_classifier()
    per_class = {}
    for c in manifest.classes:
        mine = [r for r in rows if r["label"] == c.index]
        if not mine:
            continue
        images = []
        for r in mine:
            with open(build / r["shard"], "rb") as f:
                f.seek(r["image_offset"])
                images.append(Image.open(io.BytesIO(f.read(r["image_size"]))).convert("RGB"))
        colour, shape = c.name.split(" ", 1)
        preds = classify(model, images)
        per_class[c.name] = {
            "n": len(images), "group": c.group, "real": c.real,
            "both": sum(p == (shape, colour) for p in preds) / len(preds),
            "shape": sum(p[0] == shape for p in preds) / len(preds),
            "colour": sum(p[1] == colour for p in preds) / len(preds),
        }
    n = sum(v["n"] for v in per_class.values())
    overall = sum(v["both"] * v["n"] for v in per_class.values()) / n if n else float("nan")
    return {"overall_both": overall, "chance": 1 / 64, "per_class": per_class}


def run(recipe: Path, train_config: Path, seeds: list[int], out: Path, results: Path, extra: list[str],
        train_extra: list[str] = (), command: list[str] | None = None, build_seeds: list[int] = (0,)) -> dict:
    t0 = time.time()
    argv = sys.argv if command is None else command
    prov = provenance("python -m fillup_data.demo.experiment " + " ".join(map(str, argv[1:])))  # the code this run loads
    out.mkdir(parents=True, exist_ok=True)
    sets = [x for o in extra for x in ("--set", o)]
    runs: dict[str, list[dict]] = {}
    per_build: dict[str, dict[str, list[dict]]] = {}
    fidelity: dict[int, dict] = {}
    classes = None
    for b in build_seeds:
        build = out / "builds" / f"seed{b}"
        steps.run_cli(["build", recipe, "--out", build, "--quiet", *sets, "--set", f"seed={b}"])
        for title, tag, stages in METHODS:
            for seed in seeds:
                prev = None
                for stage, overrides in stages:
                    run_dir = out / "runs" / f"build{b}" / f"{tag}-seed{seed}-stage{stage}"
                    steps.train_once(build, train_config, run_dir, stage, [f"seed={seed}", *train_extra, *overrides],
                                     init=prev if stage == "2" else None)
                    prev = run_dir
                metrics = steps.evaluate(build, prev)
                runs.setdefault(title, []).append(metrics)
                per_build.setdefault(title, {}).setdefault(str(b), []).append(metrics)
        fidelity[b] = synthetic_fidelity(build)
        # only the classes' groups are read: the build is this run's own (every build seed has the same classes)
        classes = json.loads((build / "manifest.json").read_text())["classes"]
    table = {title: seed_row(ms) for title, ms in runs.items()}
    build_means = {title: {b: seed_row(ms)["overall"]["mean"] for b, ms in by.items()} for title, by in per_build.items()}
    result = {"seeds": seeds, "build_seeds": list(build_seeds), "table": table, "build_means": build_means,
              "fidelity": merge_fidelity(fidelity), "minutes": (time.time() - t0) / 60,
              "provenance": prov,
              "recipe": str(recipe), "train_config": str(train_config),
              "groups": count_groups(classes)}
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo_experiment.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
    (results / "demo_experiment.md").write_text(format_table(result) + "\n")
    return result


def merge_fidelity(per_build: dict[int, dict]) -> dict:
    """The builds' synthetic-image fidelity together: per class, images summed and rates weighted by them;
    ``overall_both`` over all images; each build's own overall kept."""
    per_class: dict[str, dict] = {}
    for fid in per_build.values():
        for name, v in fid["per_class"].items():
            acc = per_class.setdefault(name, {"n": 0, "group": v["group"], "real": [], "both": 0.0, "shape": 0.0,
                                              "colour": 0.0})
            acc["n"] += v["n"]
            acc["real"].append(v["real"])
            for k in ("both", "shape", "colour"):
                acc[k] += v[k] * v["n"]
    for acc in per_class.values():
        for k in ("both", "shape", "colour"):
            acc[k] /= acc["n"]
    n = sum(v["n"] for v in per_class.values())
    overall = sum(v["both"] * v["n"] for v in per_class.values()) / n if n else float("nan")
    return {"overall_both": overall, "chance": 1 / 64, "per_class": per_class,
            "per_build_overall_both": {str(b): f["overall_both"] for b, f in per_build.items()}}


def format_table(result: dict) -> str:
    g = result["groups"]
    p = result.get("provenance")
    lines = [provenance_line(p), ""] if p else []
    lines += [
        f"Top-1 accuracy (%) on the balanced test split, mean ± std over {len(result['build_seeds'])} build seeds "
        f"{result['build_seeds']} x {len(result['seeds'])} classifier seeds {result['seeds']} "
        f"(classes: {g['many']} many, {g['medium']} medium, {g['few']} few).",
        "",
        "| method | overall | many | medium | few |",
        "|---|---:|---:|---:|---:|",
    ]
    for title, row in result["table"].items():
        cells = [format_cell(row[k]) for k in COLUMNS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if len(result["build_seeds"]) > 1:
        lines += ["", "Overall top-1 per build seed (mean over classifier seeds): how much the build (its real "
                      "images, tokens and synthetic images) moves the result.", "",
                  "| method | " + " | ".join(f"build seed {b}" for b in result["build_seeds"]) + " |",
                  "|---|" + "---:|" * len(result["build_seeds"])]
        for title, by in result["build_means"].items():
            lines.append(f"| {title} | " + " | ".join(f"{by[str(b)]:.1f}" for b in result["build_seeds"]) + " |")
    lines += ["", format_fidelity(result["fidelity"])]
    lines += ["", f"Wall time {result['minutes']:.1f} min."]
    return "\n".join(lines)


def format_fidelity(fid: dict) -> str:
    """The world classifier's table: shape and colour both right per class of synthetic images."""
    per_build = fid.get("per_build_overall_both", {})
    lines = [f"Synthetic-image fidelity (world classifier, shape and colour both right; chance "
             f"{fid['chance']:.3f}): {fid['overall_both']:.3f} overall"
             + (" (per build seed: " + ", ".join(f"{v:.3f}" for v in per_build.values()) + ")"
                if len(per_build) > 1 else "") + ".", "",
             "| class | group | real | synthetic | both right | shape | colour |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, v in fid["per_class"].items():
        real = v["real"] if isinstance(v["real"], list) else [v["real"]]
        lines.append(f"| {name} | {v['group']} | {'/'.join(str(r) for r in dict.fromkeys(real))} | {v['n']} | "
                     f"{v['both']:.2f} | {v['shape']:.2f} | {v['colour']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/demo_experiment.yaml")
    p.add_argument("--train-config", default="recipes/train/demo_experiment.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    p.add_argument("--build-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="build seeds (the recipe's seed: real images, tokens, synthetic images)")
    p.add_argument("--out", default="out/experiment", help="build and run folders (relaunch to resume)")
    p.add_argument("--results", default="results", help="where the table goes")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override the build recipe")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[],
                   help="override the train recipe for every run")
    p.add_argument("--fidelity-of", metavar="BUILD", default=None,
                   help="only print the world classifier's fidelity table for an existing build (e.g. out/demo)")
    a = p.parse_args(argv)
    if a.fidelity_of:
        print(format_fidelity(synthetic_fidelity(Path(a.fidelity_of))))
        return 0
    import torch

    torch.set_num_threads(2)
    result = run(Path(a.recipe), Path(a.train_config), a.seeds, Path(a.out), Path(a.results), a.overrides, a.train_overrides,
                 build_seeds=a.build_seeds)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
