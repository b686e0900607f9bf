"""The dataset card's two figures: class distribution before/after fill-up, and real vs synthetic samples.

Samples are read straight from the tars through ``index.parquet`` byte offsets: no tar is scanned.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from fillup_data.schema.groups import DEFAULT_FEW_BELOW, DEFAULT_MANY_ABOVE, GROUPS
from fillup_data.shards.index_parquet import read_stored_image

DISTRIBUTION_PNG = "assets/class_distribution.png"
SAMPLES_PNG = "assets/samples.png"
# Linked instead of SAMPLES_PNG by a card published without real images: real images may not be redistributed.
SYNTHETIC_SAMPLES_PNG = "assets/samples-synthetic.png"


def plot_distribution(manifest: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(manifest["classes"], key=lambda c: (-c["real"], c["index"]))
    real = [c["real"] for c in classes]
    total = [c["real"] + c["synthetic"] for c in classes]
    x = range(len(classes))
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    ax.fill_between(x, total, step="mid", color="#f0a04b", alpha=0.85, label="after fill-up (real + synthetic)")
    ax.fill_between(x, real, step="mid", color="#3b6fb6", alpha=0.95, label="real (long-tailed)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(0.8, min([r for r in real if r > 0] or [1]) * 0.5))
    groups = manifest.get("groups") or {"many_above": DEFAULT_MANY_ABOVE, "few_below": DEFAULT_FEW_BELOW}
    for y, name in ((groups["many_above"], "many"), (groups["few_below"], "few")):
        ax.axhline(y, color="gray", lw=0.6, ls="--")
        ax.text(len(classes) - 0.5, y, f" {name}", va="bottom", ha="right", fontsize=7, color="gray")
    ax.set_xlabel("classes, sorted by real training images")
    ax.set_ylabel("training images (log)")
    ax.set_title(f"{manifest['name']} {manifest['version']}: images per class")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(-0.5, len(classes) - 0.5)
    with warnings.catch_warnings():  # a crowded axis only loses margin; the warning would reach every build's log
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def pick_classes(manifest: dict, per_group: int = 2) -> list[int]:
    """A few head, medium and tail classes (largest first within each group)."""
    picked = []
    for g in GROUPS:
        cs = sorted((c for c in manifest["classes"] if c["group"] == g), key=lambda c: (-c["real"], c["index"]))
        if g == "few":
            cs = cs[::-1]  # the tail's tail is the interesting part
        picked += [c["index"] for c in cs[:per_group]]
    return picked


def sample_grid(out: Path, manifest: dict, path: Path, per_side: int = 4, cell: int = 96,
                include_real: bool = True) -> Path:
    """Rows of head, medium and tail classes: real training images beside synthetic ones (or synthetic only)."""
    from fillup_data.generation.preview import preview_grid
    from fillup_data.shards.index_parquet import read_index

    classes = pick_classes(manifest)
    # only the picked classes' rows: the whole index is millions of rows at iNaturalist's size
    rows = read_index(out / "index.parquet", columns=["key", "shard", "split", "image_offset", "image_size",
                                                      "label", "is_synthetic"], filters=[("label", "in", classes)])
    by = {}
    for r in sorted(rows, key=lambda r: r["key"]):
        if r["split"] == "train":
            by.setdefault((r["label"], r["is_synthetic"]), []).append(r)
    real = {c: [read_stored_image(out, r) for r in by.get((c, False), [])[:per_side]] for c in classes} if include_real else {}
    synthetic = {c: [read_stored_image(out, r) for r in by.get((c, True), [])[: per_side * (1 if include_real else 2)]]
                 for c in classes}
    names = [f"{c['name']} ({c['group']}, {c['real']})" for c in sorted(manifest["classes"], key=lambda c: c["index"])]
    return preview_grid(real, synthetic, names, path, thumb=cell)
