"""``fillup-data quality OUT``: the per-class quality report of a scored build.

Writes ``OUT/quality/``: ``summary.json`` (every number), ``README.md`` (rendered from it), overall and
per-class score histograms, and per class a grid of its best and worst synthetic images by
``clip_score`` with real training images below them (plus a synthetic-only grid, which a repo
published without real images links instead).  FID and precision/recall (k=3) compare a class's
synthetic images with its real training images on the CLIP features ``score`` stored.  Same
input, same bytes: PNGs carry no software or time stamp, JSON is written sorted.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fillup_data.errors import FillupError
from fillup_data.quality.metrics import K_NEAREST, frechet_distance, precision_recall
from fillup_data.quality.scoring import NEAR_COPY
from fillup_data.quality.shard_scores import read_shard_scores
from fillup_data.schema.groups import GROUPS
from fillup_data.schema.manifest import Manifest
from fillup_data.schema.scores import SCORE_BY_NAME, SCORE_NAMES
from fillup_data.shards.index_parquet import read_stored_image

QUALITY_DIR = "quality"
REPORT = f"{QUALITY_DIR}/README.md"
SUMMARY = f"{QUALITY_DIR}/summary.json"
HISTOGRAMS = ("clip_score", "class_confidence", "real_similarity")
_THUMB = 64


def _scored_rows(out: Path, manifest: Manifest) -> list[dict]:
    import pyarrow.parquet as pq

    path = out / "index.parquet"
    if manifest.scores is None:
        raise FillupError(f"{out / 'manifest.json'}: the build has no scores; run `fillup-data score {out}` first")
    if not path.is_file():
        raise FillupError(f"{path}: no index.parquet; relaunch the build, then `fillup-data score {out}`")
    names = pq.read_schema(path).names
    missing = [c for c in SCORE_NAMES if c not in names]
    if missing:
        raise FillupError(f"{path}: no {missing[0]!r} column (the build was rebuilt after scoring?); run "
                          f"`fillup-data score {out}` again")
    return pq.read_table(path, columns=["key", "shard", "split", "image_offset", "image_size", "label",
                                        "is_synthetic", *SCORE_NAMES]).to_pylist()


def _features(out: Path, manifest: Manifest, rows: list[dict]) -> dict[str, np.ndarray]:
    """CLIP image features of every row, from the results ``score`` stored for the recorded identity."""
    identity = manifest.scores.get("identity")
    feats: dict[str, np.ndarray] = {}
    for shard in sorted({r["shard"] for r in rows}):
        entry = manifest.shard(shard)
        res = read_shard_scores(out, shard, entry.sha256 if entry else "", identity)
        if res is None:
            raise FillupError(f"{out / '.fillup' / 'scores'}: no stored CLIP features of {shard} for the recorded "
                              f"scores; run `fillup-data score {out}` again (it reuses what is stored)")
        feats.update(zip(res.keys, res.features))
    return feats


def _finite_mean(values) -> float | None:
    v = np.array(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _set_stats(real: np.ndarray, syn: np.ndarray, syn_rows: list[dict], real_rows: list[dict],
               near_copy: float) -> dict:
    fid = frechet_distance(syn, real)
    precision, recall = precision_recall(real, syn)
    dim = real.shape[1] if real.ndim == 2 and len(real) else (syn.shape[1] if syn.ndim == 2 and len(syn) else 0)
    stats = {
        "real": len(real_rows), "synthetic": len(syn_rows),
        "fid": None if np.isnan(fid) else round(fid, 6),
        # FID's covariance has dim*(dim+1)/2 entries: with fewer images than dimensions it is rank-deficient
        # and the value is dominated by that bias (it also falls as n grows), so it is flagged
        "fid_reliable": bool(min(len(real_rows), len(syn_rows)) > dim) and not np.isnan(fid),
        "precision": None if np.isnan(precision) else round(precision, 6),
        "recall": None if np.isnan(recall) else round(recall, 6),
        "near_copies": int(sum(1 for r in syn_rows if r["real_similarity"] >= near_copy)),
    }
    for col in HISTOGRAMS:
        for side, sel in (("synthetic", syn_rows), ("real", real_rows)):
            m = _finite_mean([r[col] for r in sel])
            stats[f"{col}_{side}_mean"] = None if m is None else round(m, 6)
    return stats


def _save_png(fig_or_image, path: Path) -> None:
    """PNG bytes that depend on the pixels only (no Software/date chunk), written atomically."""
    from fillup_data.state import write_bytes_durably

    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", metadata={"Software": None})
    write_bytes_durably(path, buf.getvalue())


def _histograms(syn_rows: list[dict], real_rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in HISTOGRAMS if np.isfinite(np.array([r[c] for r in syn_rows + real_rows], float)).any()]
    fig, axes = plt.subplots(1, max(len(cols), 1), figsize=(3.2 * max(len(cols), 1), 2.6), dpi=100, squeeze=False)
    for ax, col in zip(axes[0], cols):
        values = {side: np.array([r[col] for r in sel], float) for side, sel in (("synthetic", syn_rows),
                                                                                   ("real", real_rows))}
        values = {k: v[np.isfinite(v)] for k, v in values.items()}
        pooled = np.concatenate(list(values.values()))
        lo, hi = float(pooled.min()), float(pooled.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
        for side, colour in (("real", "#3b6fb6"), ("synthetic", "#f0a04b")):
            if len(values[side]):
                ax.hist(values[side], bins=bins, alpha=0.6, color=colour, label=f"{side} ({len(values[side])})")
        ax.set_title(col, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, path)
    plt.close(fig)


def _thumb(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return image.resize((_THUMB, _THUMB), Image.NEAREST if s * 2 <= _THUMB else Image.BICUBIC)


def _grid(out: Path, rows_of_images: list[list[dict]], path: Path) -> None:
    """One row of thumbnails per list (grey where a row is short), 4 px gaps; no text, so no font."""
    n = max((len(r) for r in rows_of_images), default=0) or 1
    gap = 4
    canvas = Image.new("RGB", (n * (_THUMB + gap) + gap, len(rows_of_images) * (_THUMB + gap) + gap), (255, 255, 255))
    for y, row in enumerate(rows_of_images):
        for x in range(n):
            tile = _thumb(read_stored_image(out, row[x])) if x < len(row) else Image.new("RGB", (_THUMB, _THUMB), (230,) * 3)
            canvas.paste(tile, (gap + x * (_THUMB + gap), gap + y * (_THUMB + gap)))
    _save_png(canvas, path)


def class_files(index: int) -> dict[str, str]:
    stem = f"{QUALITY_DIR}/classes/{index:05d}"
    return {"scores": f"{stem}-scores.png", "grid": f"{stem}-grid.png", "grid_synthetic": f"{stem}-grid-synthetic.png"}


def write_quality_report(out: str | Path, *, per_class: int = 8, near_copy: float = NEAR_COPY,
                         progress: bool = True) -> dict:
    """Compute the report's numbers, draw its figures, write ``quality/`` and record it in the manifest."""
    from tqdm.auto import tqdm

    from fillup_data.shards.writer import sha256_file
    from fillup_data.state import STATE_DIR, BuildLock, write_bytes_durably

    out = Path(out)
    if per_class < 1:
        raise FillupError(f"--per-class: must be at least 1, got {per_class}")
    if not 0 < near_copy <= 1:
        raise FillupError(f"--near-copy: a cosine similarity in (0, 1], got {near_copy}")
    # read under the build's lock: a build, `score` or another `quality` may rewrite the manifest and index
    with BuildLock.acquire(out / STATE_DIR):
        manifest = Manifest.read(out / "manifest.json")
        rows = _scored_rows(out, manifest)
        feats = _features(out, manifest, rows)
        train = [r for r in rows if r["split"] == "train"]
        syn_all = [r for r in train if r["is_synthetic"]]
        real_all = [r for r in train if not r["is_synthetic"]]
        dim = len(next(iter(feats.values()))) if feats else 0

        def matrix(sel):
            return np.stack([feats[r["key"]] for r in sel]) if sel else np.zeros((0, dim), np.float32)

        overall = _set_stats(matrix(real_all), matrix(syn_all), syn_all, real_all, near_copy)
        _histograms(syn_all, real_all, f"{manifest.name} {manifest.version}: all classes",
                    out / QUALITY_DIR / "scores.png")
        classes = []
        for c in tqdm(sorted(manifest.classes, key=lambda c: c.index), desc="quality", unit="class",
                      disable=not progress):
            syn = [r for r in syn_all if r["label"] == c.index]
            real = [r for r in real_all if r["label"] == c.index]
            stats = _set_stats(matrix(real), matrix(syn), syn, real, near_copy)
            files = class_files(c.index)
            _histograms(syn, real, f"class {c.index}: {c.name}", out / files["scores"])
            # best and worst by clip_score; ties (and NaN) broken by key, so the choice is deterministic
            ranked = sorted((r for r in syn if np.isfinite(r["clip_score"])), key=lambda r: (-r["clip_score"], r["key"]))
            best, worst = ranked[:per_class], ranked[::-1][:per_class]
            _grid(out, [best, worst, sorted(real, key=lambda r: r["key"])[:per_class]], out / files["grid"])
            _grid(out, [best, worst], out / files["grid_synthetic"])
            classes.append({"index": c.index, "name": c.name, "group": c.group, **stats, "files": files})
        summary = {"name": manifest.name, "version": manifest.version, "near_copy": near_copy, "k": K_NEAREST,
                   "per_class": per_class, "feature_dim": dim, "scores": manifest.scores, "overall": overall,
                   "groups": _group_stats(classes), "classes": classes}
        write_bytes_durably(out / SUMMARY, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
        write_bytes_durably(out / REPORT, render_report(summary, include_real=True).encode("utf-8"))
        listed = [REPORT, SUMMARY, f"{QUALITY_DIR}/scores.png"] + [f for c in classes for f in c["files"].values()]
        manifest.quality = {
            "report": REPORT, "near_copy": near_copy, "scores_identity": manifest.scores.get("identity"),
            "files": [{"path": p, "num_bytes": (out / p).stat().st_size, "sha256": sha256_file(out / p),
                       "real_pixels": p.endswith("-grid.png")} for p in listed],
        }
        manifest.write(out / "manifest.json")
        from fillup_data.quality.scoring import refresh_card

        refresh_card(out, manifest)
    return summary


def _group_stats(classes: list[dict]) -> dict:
    """Per group: classes, images, near-copies, and the mean of the per-class values that are defined."""
    out = {}
    for g in GROUPS:
        cs = [c for c in classes if c["group"] == g]
        out[g] = {"classes": len(cs), "real": sum(c["real"] for c in cs), "synthetic": sum(c["synthetic"] for c in cs),
                  "near_copies": sum(c["near_copies"] for c in cs)}
        for key in ("fid", "precision", "recall"):
            m = _finite_mean([c[key] for c in cs if c[key] is not None])
            out[g][f"mean_{key}"] = None if m is None else round(m, 6)
    return out


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render_report(summary: dict, include_real: bool = True) -> str:
    """The report's Markdown from ``summary.json``; without real images it links the synthetic-only grids."""
    s = summary["scores"] or {}
    o = summary["overall"]
    lines = [
        f"# Quality report: {summary['name']} {summary['version']}",
        "",
        f"Scored with CLIP `{s.get('clip_model')}` (prompt `{s.get('prompt')}`), classifier "
        f"`{s.get('classifier') or 'none'}`. FID and precision/recall (k={summary['k']}, Kynkäänniemi et al. 2019) "
        f"compare each class's synthetic training images with its real training images on the same L2-normalised "
        f"CLIP image features ({summary['feature_dim']} dimensions); near-copies are synthetic images whose "
        f"`real_similarity` is at least {summary['near_copy']}.",
        "",
        "Columns of `index.parquet`: " + "; ".join(f"`{n}`: {SCORE_BY_NAME[n].doc}" for n in SCORE_NAMES) + ".",
        "",
        "## All classes pooled",
        "",
        "| real | synthetic | FID | precision | recall | near-copies | clip_score synthetic / real |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {o['real']:,} | {o['synthetic']:,} | {_fmt(o['fid'])}{'' if o['fid_reliable'] else ' *'} | "
        f"{_fmt(o['precision'])} | {_fmt(o['recall'])} | {o['near_copies']:,} | "
        f"{_fmt(o['clip_score_synthetic_mean'])} / {_fmt(o['clip_score_real_mean'])} |",
        "",
        "![score distributions, all classes](scores.png)",
        "",
        "## By group (means of the per-class values that are defined)",
        "",
        "| group | classes | real | synthetic | FID | precision | recall | near-copies |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g, v in summary["groups"].items():
        lines.append(f"| {g} | {v['classes']} | {v['real']:,} | {v['synthetic']:,} | {_fmt(v['mean_fid'])} | "
                     f"{_fmt(v['mean_precision'])} | {_fmt(v['mean_recall'])} | {v['near_copies']:,} |")
    lines += [
        "",
        "## Per class",
        "",
        f"\\* FID from fewer images than the {summary['feature_dim']} feature dimensions in either set: its "
        "covariance is rank-deficient and the value mostly reflects the sample size; compare such values only "
        f"between builds with the same counts. – : not defined (FID needs 2 images per set, precision/recall "
        f"more than k={summary['k']}).",
        "",
        "| class | group | real | synthetic | FID | precision | recall | near-copies | clip_score syn / real | figures |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    grid_key = "grid" if include_real else "grid_synthetic"
    for c in summary["classes"]:
        files = {k: v.removeprefix(f"{QUALITY_DIR}/") for k, v in c["files"].items()}
        name = str(c["name"]).replace("|", "\\|")
        lines.append(
            f"| {c['index']} {name} | {c['group']} | {c['real']:,} | {c['synthetic']:,} | "
            f"{_fmt(c['fid'])}{'' if c['fid'] is None or c['fid_reliable'] else ' *'} | {_fmt(c['precision'])} | "
            f"{_fmt(c['recall'])} | {c['near_copies']:,} | {_fmt(c['clip_score_synthetic_mean'])} / "
            f"{_fmt(c['clip_score_real_mean'])} | [scores]({files['scores']}), [grid]({files[grid_key]}) |")
    rows = ("best synthetic by clip_score, worst synthetic, real training images" if include_real
            else "best synthetic by clip_score, worst synthetic (real images are not in this repository)")
    lines += ["", f"Grids, top to bottom: {rows}; {summary['per_class']} per row.", ""]
    return "\n".join(lines)


def report_files(out: Path, manifest: dict, include_real: bool) -> tuple[list[tuple[str, bytes | Path]], list[str]]:
    """What ``publish`` uploads of the report: the files the manifest lists (never what a link says);
    without real images, the grids showing real pixels stay out and the README links the synthetic-only
    grids.  Returns (path, file or bytes) pairs and the paths left out."""
    quality = manifest.get("quality")
    if not quality:
        return [], []
    files, left_out = [], []
    for f in quality["files"]:
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["num_bytes"]:
            raise FillupError(f"{p}: missing or changed since `fillup-data quality` listed it in manifest.json; run "
                              f"`fillup-data quality {out}` again")
        if f.get("real_pixels") and not include_real:
            left_out.append(f["path"])
        elif f["path"] == REPORT and not include_real:
            summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
            files.append((REPORT, render_report(summary, include_real=False).encode("utf-8")))
        else:
            files.append((f["path"], p))
    return files, left_out
