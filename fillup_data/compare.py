"""``fillup-data compare RUN...``: the paper's Table 1 layout (generation strategy -> overall / many /
medium / few top-1) from trained and evaluated runs.

Each run folder holds ``run.json`` (what was trained, on which build) and ``metrics.json`` (written by
``fillup-data eval``).  A run's strategy and guidance come from the manifest of the build it trained on
(``recipe.generator``).  Runs that differ only in their seed form one row (mean ± std over them); runs of
one strategy that differ in anything else (guidance, filter, stage, schedule...) get rows of their own,
labelled with what differs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fillup_data.errors import FillupError
from fillup_data.result_table import COLUMNS, format_cell, json_safe, mean_std, seed_row, top1
from fillup_data.schema.groups import GROUPS, group_of
from fillup_data.train.config import parse_train_config

# Table 1's column order; strategies not listed here follow, by name
TABLE1_ORDER = ("single_template", "clip_templates", "lm_prompts", "image_variation", "reimagine", "captions",
                "textual_inversion")
REAL_ONLY = "real data only"


@dataclass
class RunResult:
    path: Path
    record: dict[str, Any]
    metrics: dict[str, Any]
    strategy: str
    guidance_scale: float | None
    seed: int
    variant: dict[str, Any]  # everything that identifies the row besides the strategy: flattened, no seed


def _read_json(path: Path, run: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FillupError(f"{run}: no {path.name}; {what}") from None
    except (OSError, ValueError) as err:
        raise FillupError(f"{path}: cannot be read ({err}); {what}") from None
    if not isinstance(data, dict):
        raise FillupError(f"{path}: not a JSON object; {what}")
    return data


def _build_of(record: dict, run: Path):
    """The build the run trained its synthetic data from (where ``run.json`` recorded it)."""
    from fillup_data.loader.build import Build

    where = (record.get("builds") or {}).get("synthetic", {}).get("where") or record.get("data")
    if not where:
        raise FillupError(f"{run}/run.json names no build; it is not a `fillup-data train` run folder")
    ref = where[: -len(":manifest.json")] if where.endswith(":manifest.json") else Path(where)
    if isinstance(ref, Path) and ref.name == "manifest.json":
        ref = ref.parent
    try:
        return Build.open(ref)
    except FillupError as err:
        raise FillupError(f"{run}: cannot read the build it trained on ({err}); compare reads the strategy "
                          "from that build's manifest: restore the build at that path") from None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# build settings that decide speed or the last bits only, never the method: not a reason for another row
_NOT_METHOD = {"generator.batch_size", "generator.compile", "generator.dtype", "generator.guidance_scale",
               "generator.max_retries", "generator.revision"}


def build_variant(recipe: dict) -> dict[str, Any]:
    """The build's settings that define the synthetic images (generator, fill, and inversion for Textual
    Inversion), flattened as ``generator.language_model.model``; the build's seed is left out: builds that
    differ only in their seed are repeats, averaged like classifier seeds."""
    parts = {"generator": recipe.get("generator") or {}, "fill": recipe.get("fill") or {}}
    if (recipe.get("generator") or {}).get("strategy") == "textual_inversion":
        parts["inversion"] = {k: v for k, v in (recipe.get("inversion") or {}).items()
                              if k not in ("classes_per_pass", "classes_per_task", "compile", "pad_passes")}
    flat = _flatten(parts)
    return {k: v for k, v in flat.items() if k not in _NOT_METHOD and k != "generator.strategy"}


def read_run(run: Path) -> RunResult:
    run = Path(run)
    if not run.is_dir():
        raise FillupError(f"{run}: no such run folder (a --out folder of `fillup-data train`)")
    record = _read_json(run / "run.json", run, "pass the --out folder of `fillup-data train`")
    if not (run / "model.safetensors").is_file():
        raise FillupError(f"{run}: training has not finished (no model.safetensors): continue it with "
                          "`fillup-data train ... --resume`, then `fillup-data eval`")
    metrics = _read_json(run / "metrics.json", run, "evaluate it first: `fillup-data eval --data BUILD --run RUN`")
    missing = [c for c in ("stage", "config", "class_names") if c not in record]
    if missing:
        raise FillupError(f"{run}/run.json: no {missing[0]!r}; it is not a `fillup-data train` run record")
    bad = [c for c in COLUMNS if c not in metrics or not (metrics[c] is None or isinstance(metrics[c], (int, float)))]
    if bad:
        raise FillupError(f"{run}/metrics.json: no number for {bad[0]!r}; re-run `fillup-data eval` on the run")
    stage = record["stage"]
    # through today's schema, so a run recorded before a field existed (e.g. stageN.filter) has it at its
    # default and falls in the same row as a new run with the same settings
    config = parse_train_config(record["config"], f"{run}/run.json:config").model_dump(mode="json")
    data = (config.get(f"stage{stage}") or {}).get("data")
    recipe = _build_of(record, run).manifest.recipe or {}
    generator = recipe.get("generator") or {}
    if stage == 1 and data == "real":
        strategy, guidance = REAL_ONLY, None
    else:
        strategy, guidance = generator.get("strategy"), generator.get("guidance_scale")
        if not isinstance(strategy, str):
            raise FillupError(f"{run}: the manifest of its build names no recipe.generator.strategy; "
                              "compare needs builds made by `fillup-data build`")
    flat = _flatten(config)
    seed = flat.pop("seed", 0)
    variant = {"guidance": guidance, "stage": stage, **flat}
    if strategy != REAL_ONLY:  # what made the images: runs on builds that differ in it are other rows
        variant.update(build_variant(recipe))
    return RunResult(run, record, metrics, strategy, guidance, seed, variant)


def _order(strategy: str) -> tuple:
    if strategy == REAL_ONLY:
        return (-1, "")
    return (TABLE1_ORDER.index(strategy), "") if strategy in TABLE1_ORDER else (len(TABLE1_ORDER), strategy)


def _label(strategy: str, variant: dict, differing: list[str]) -> str:
    parts = []
    for k in differing:
        v = variant[k]
        parts.append(f"guidance {v:g}" if k == "guidance" and v is not None else
                     f"stage {'II' if v == 2 else 'I'}" if k == "stage" else f"{k}={v}")
    return strategy + (f" ({', '.join(parts)})" if parts else "")


def compare_runs(runs: list[Path]) -> dict[str, Any]:
    """Table 1's rows from ``runs``: one row per (strategy, everything but the seed)."""
    if not runs:
        raise FillupError("name at least one run folder")
    results = []
    seen: dict[Path, Path] = {}
    for run in runs:
        real = Path(run).resolve()
        if real in seen:
            raise FillupError(f"{run}: given twice (also as {seen[real]}); name each run once")
        seen[real] = Path(run)
        results.append(read_run(Path(run)))
    first = results[0]
    for r in results[1:]:
        if r.record["class_names"] != first.record["class_names"]:
            raise FillupError(f"{r.path} and {first.path} were trained on different class lists; compare runs of "
                              "one source")
        if r.metrics.get("num_test_samples") != first.metrics.get("num_test_samples"):
            n, m = r.metrics.get("num_test_samples"), first.metrics.get("num_test_samples")
            raise FillupError(f"{r.path} and {first.path} were evaluated on different test splits ({n} and {m} "
                              "images); evaluate them on the same build's test split")
    rows: dict[tuple, list[RunResult]] = {}
    for r in results:
        key = (r.strategy, json.dumps(r.variant, sort_keys=True))
        for other in rows.get(key, []):
            if other.seed == r.seed:
                raise FillupError(f"{r.path} and {other.path} are the same experiment with the same seed "
                                  f"({r.seed}); a row averages over seeds: name one of them")
        rows.setdefault(key, []).append(r)
    out_rows = []
    def row_order(item):  # Table 1's strategy order, then guidance, then the order the runs were named in
        (strategy, _), members = item
        g = members[0].guidance_scale
        return _order(strategy), g is None, g or 0.0, results.index(members[0])

    for (strategy, _), members in sorted(rows.items(), key=row_order):
        variants = [m[0].variant for (s, _), m in rows.items() if s == strategy]
        differing = [k for k in members[0].variant if len({json.dumps(v.get(k)) for v in variants}) > 1]
        ms = [m.metrics for m in members]
        out_rows.append({
            "label": _label(strategy, members[0].variant, differing),
            "strategy": strategy,
            "guidance_scale": members[0].guidance_scale,
            "stage": members[0].record["stage"],
            "runs": [str(m.path) for m in members],
            "seeds": [m.seed for m in members],
            **seed_row(ms),
            "top5": mean_std([top1(m, "top5") for m in ms]),
        })
    thresholds = first.record.get("groups") or {}
    groups = [group_of(n, thresholds.get("many_above", 100), thresholds.get("few_below", 20))
              for n in first.record.get("real_counts", [])]
    return {
        "unit": "percent top-1 on the balanced test split, mean ± std over the runs (seeds) of a row",
        "columns": list(COLUMNS),
        "num_test_samples": first.metrics.get("num_test_samples"),
        "groups": {g: groups.count(g) for g in GROUPS},
        "rows": out_rows,
    }


def format_markdown(table: dict[str, Any]) -> str:
    g = table["groups"]
    lines = [
        f"Top-1 accuracy (%) on the balanced test split ({table['num_test_samples']} images; classes: "
        f"{g['many']} many, {g['medium']} medium, {g['few']} few), mean ± std over the runs (seeds) of each row.",
        "",
        "| strategy | runs (seeds) | " + " | ".join(COLUMNS) + " | top-5 |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for row in table["rows"]:
        seeds = ", ".join(str(s) for s in row["seeds"])
        lines.append(f"| {row['label']} | {len(row['runs'])} ({seeds}) | "
                     + " | ".join(format_cell(row[c]) for c in COLUMNS + ("top5",)) + " |")
    return "\n".join(lines)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="Table 1 of the paper from trained runs: strategy -> overall / many / medium / few top-1",
        description="Reads each run's run.json and metrics.json (`fillup-data eval`) and the manifest of the build "
                    "it trained on; runs differing only in seed are one row (mean ± std).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders of `fillup-data train`, evaluated")
    p.add_argument("--format", choices=("md", "json"), default="md", help="Markdown table (default) or JSON")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    table = compare_runs([Path(r) for r in args.runs])
    if args.format == "json":
        print(json.dumps(json_safe(table), indent=2))
    else:
        print(format_markdown(table))
    return 0
