"""The paper's Table 1 in miniature on the demo world (``make compare``).

Every recipe of ``recipes/compare/`` builds the same source with one generation strategy; a classifier
is trained on each build's synthetic images only (``recipes/train/compare.yaml``), once per seed, and
evaluated on the balanced real test split; ``fillup-data compare`` makes the table (strategy -> overall /
many / medium / few top-1, mean ± std over seeds).  Each build's synthetic images are also scored with
the world classifier (shape and colour both right), the world's own measure of what each strategy drew.
Everything runs in one process, one torch job at a time; relaunching resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fillup_data.demo import experiment_steps as steps
from fillup_data.compare import compare_runs, format_markdown
from fillup_data.result_table import json_safe, provenance, provenance_line

RECIPES = Path("recipes/compare")


def run(recipes: list[Path], train_config: Path, seeds: list[int], out: Path, results: Path,
        build_extra: list[str] = (), train_extra: list[str] = (), command: str | None = None) -> dict:
    t0 = time.time()
    prov = provenance(command or "python -m fillup_data.demo.compare_experiment " + " ".join(sys.argv[1:]))
    from fillup_data.demo.experiment import synthetic_fidelity

    sets = [x for o in build_extra for x in ("--set", o)]
    run_dirs, fidelity, minutes = [], {}, {}
    for recipe in recipes:
        name = recipe.stem
        build = out / "builds" / name
        t = time.time()
        steps.run_cli(["build", recipe, "--out", build, "--quiet", *sets])
        minutes[f"build {name}"] = (time.time() - t) / 60
        for seed in seeds:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            t = time.time()
            steps.train_once(build, train_config, run_dir, "1", [f"seed={seed}", *train_extra])
            steps.evaluate(build, run_dir)
            minutes[f"train+eval {name} seed {seed}"] = (time.time() - t) / 60
            run_dirs.append(run_dir)
        if json.loads((build / "manifest.json").read_text(encoding="utf-8"))["recipe"]["source"]["kind"] == "demo":
            fidelity[name] = synthetic_fidelity(build)["overall_both"]  # the world classifier knows only its world
    table = compare_runs(run_dirs)
    result = {"provenance": prov, "seeds": seeds, "recipes": [str(r) for r in recipes],
              "train_config": str(train_config), "table": table, "fidelity": fidelity,
              "minutes": (time.time() - t0) / 60, "minutes_by_step": minutes}
    results.mkdir(parents=True, exist_ok=True)
    (results / "compare.json").write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
    (results / "compare.md").write_text(format_result(result) + "\n", encoding="utf-8")
    return result


def format_result(result: dict) -> str:
    lines = [provenance_line(result["provenance"]), "", format_markdown(result["table"]), "",
             "Synthetic-image fidelity (world classifier, shape and colour both right; chance 0.016):", "",
             "| build | both right |", "|---|---:|"]
    lines += [f"| {name} | {v:.3f} |" for name, v in result["fidelity"].items()]
    steps_line = ", ".join(f"{k} {v:.1f}" for k, v in result.get("minutes_by_step", {}).items())
    lines += ["", f"Wall time {result['minutes']:.1f} min (by step, minutes: {steps_line})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=None,
                   help=f"build recipes, one per strategy (default: {RECIPES}/*.yaml)")
    p.add_argument("--train-config", default="recipes/train/compare.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/compare", help="builds and run folders (relaunch to resume)")
    p.add_argument("--results", default="results", help="where compare.md and compare.json go")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override every build recipe")
    p.add_argument("--train-set", dest="train_overrides", action="append", default=[],
                   help="override the train recipe for every run")
    a = p.parse_args(argv)
    recipes = [Path(r) for r in a.recipes] if a.recipes else sorted(RECIPES.glob("*.yaml"))
    if not recipes:
        p.error(f"no recipes in {RECIPES}; pass --recipes")
    import torch

    torch.set_num_threads(2)
    command = "python -m fillup_data.demo.compare_experiment " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(recipes, Path(a.train_config), a.seeds, Path(a.out), Path(a.results), a.overrides,
                 a.train_overrides, command=command)
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
