"""The paper's Table 6 protocol in miniature, on the demo world (``make experiment``).

One build (long-tailed real set, Textual Inversion per class, fill-up), then four classifiers, each
trained with several seeds and evaluated on the balanced test split:

- CE baseline: long-tailed real data, cross-entropy;
- BS: long-tailed real data, Balanced Softmax;
- Fill-Up Stage I: real + synthetic (filled up), Balanced Softmax over real counts;
- Fill-Up Stage I + II: Stage I, then real data only, Balanced Softmax.

Reported: overall / many / medium / few top-1, mean and standard deviation over seeds, plus the
world classifier's accuracy on each class's synthetic images (the world's "classification accuracy
score" of the generator).  Everything runs in one process, one torch job at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fillup_data.schema.groups import GROUPS, count_groups

METHODS = (
    ("CE baseline", "ce", [("1", ["stage1.data=real", "stage1.loss=cross_entropy"])]),
    ("BS", "bs", [("1", ["stage1.data=real", "stage1.loss=balanced_softmax"])]),
    ("Fill-Up Stage I + BS", "fillup1", [("1", ["stage1.data=filled", "stage1.loss=balanced_softmax"])]),
    ("Fill-Up Stage I + II + BS", "fillup2", [("1", ["stage1.data=filled", "stage1.loss=balanced_softmax"]),
                                              ("2", ["stage2.data=real", "stage2.loss=balanced_softmax"])]),
)
# the table's columns: overall accuracy, then the paper's groups
COLUMNS = ("overall", *GROUPS)


def _cli(args: list[str]) -> None:
    from fillup_data.cli import main

    rc = main([str(a) for a in args])
    if rc:
        raise SystemExit(f"fillup-data {' '.join(map(str, args[:2]))} failed with status {rc}")


def synthetic_fidelity(build: Path) -> dict:
    """World-classifier accuracy (shape and colour both right) on every class's synthetic images."""
    import io

    from PIL import Image

    from fillup_data.schema.manifest import Manifest
    from fillup_data.shards.index_parquet import read_index
    from fillup_data.toyworld.classifier import classify, load_classifier

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


def provenance(argv: list[str]) -> dict:
    """Date, commit and command of a result, so a table says where it came from."""
    import datetime
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        commit = head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return {"date": datetime.date.today().isoformat(), "commit": commit,
            "command": "python -m fillup_data.experiment " + " ".join(map(str, argv[1:]))}


def run(recipe: Path, train_config: Path, seeds: list[int], out: Path, results: Path, extra: list[str],
        train_extra: list[str] = (), command: list[str] | None = None) -> dict:
    t0 = time.time()
    prov = provenance(sys.argv if command is None else command)  # the code this run loads
    out.mkdir(parents=True, exist_ok=True)
    build = out / "build"
    sets = [x for o in extra for x in ("--set", o)]
    _cli(["build", recipe, "--out", build, "--quiet", *sets])
    runs: dict[str, list[dict]] = {}
    for title, tag, stages in METHODS:
        for seed in seeds:
            prev = None
            for stage, overrides in stages:
                run_dir = out / "runs" / f"{tag}-seed{seed}-stage{stage}"
                if not (run_dir / "model.safetensors").is_file():
                    args = ["train", "--data", build, "--config", train_config, "--stage", stage, "--out", run_dir,
                            "--device", "cpu", "--set", f"seed={seed}"]
                    for o in [*train_extra, *overrides]:
                        args += ["--set", o]
                    if stage == "2":
                        args += ["--init", prev]
                    if run_dir.exists():  # a killed run: continue it
                        args.append("--resume")
                    _cli(args)
                prev = run_dir
            _cli(["eval", "--data", build, "--run", prev, "--device", "cpu"])
            metrics = json.loads((prev / "metrics.json").read_text())
            runs.setdefault(title, []).append(metrics)
    table = {}
    for title, ms in runs.items():
        row = {}
        for g in COLUMNS:
            vals = [_top1(m, g) for m in ms]
            ok = [v for v in vals if v == v]  # a group with no classes has no accuracy (NaN)
            row[g] = {"mean": statistics.fmean(ok) if ok else None,
                      "std": statistics.stdev(ok) if len(ok) > 1 else (0.0 if ok else None), "values": vals}
        table[title] = row
    fidelity = synthetic_fidelity(build)
    # only the classes' groups are read: the build is this run's own
    classes = json.loads((build / "manifest.json").read_text())["classes"]
    result = {"seeds": seeds, "table": table, "fidelity": fidelity, "minutes": (time.time() - t0) / 60,
              "provenance": prov,
              "recipe": str(recipe), "train_config": str(train_config),
              "groups": count_groups(classes)}
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo_experiment.json").write_text(json.dumps(_no_nan(result), indent=2) + "\n")
    (results / "demo_experiment.md").write_text(format_table(result) + "\n")
    return result


def _top1(metrics: dict, group: str) -> float:
    v = metrics.get(group)
    return float("nan") if v is None else float(v)  # JSON has no NaN: the table writes None


def _no_nan(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def format_table(result: dict) -> str:
    g = result["groups"]
    p = result.get("provenance")
    lines = [f"{p['date']}, commit {p['commit']}, `{p['command']}`.", ""] if p else []
    lines += [
        f"Top-1 accuracy (%) on the balanced test split, mean ± std over seeds {result['seeds']} "
        f"(classes: {g['many']} many, {g['medium']} medium, {g['few']} few).",
        "",
        "| method | overall | many | medium | few |",
        "|---|---:|---:|---:|---:|",
    ]
    for title, row in result["table"].items():
        cells = ["–" if row[k]["mean"] is None else f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in COLUMNS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    fid = result["fidelity"]
    lines += ["", f"Synthetic-image fidelity (world classifier, shape and colour both right; chance "
                  f"{fid['chance']:.3f}): {fid['overall_both']:.3f} overall.", "",
              "| class | group | real | synthetic | both right | shape | colour |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, v in fid["per_class"].items():
        lines.append(f"| {name} | {v['group']} | {v['real']} | {v['n']} | {v['both']:.2f} | {v['shape']:.2f} | "
                     f"{v['colour']:.2f} |")
    lines += ["", f"Wall time {result['minutes']:.1f} min."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/demo_experiment.yaml")
    p.add_argument("--train-config", default="recipes/train/demo_experiment.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/experiment", help="build and run folders (relaunch to resume)")
    p.add_argument("--results", default="results", help="where the table goes")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override the build recipe")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[],
                   help="override the train recipe for every run")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    result = run(Path(a.recipe), Path(a.train_config), a.seeds, Path(a.out), Path(a.results), a.overrides, a.train_overrides)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
