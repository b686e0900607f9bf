"""Full-size rehearsal: every command a user runs, at the class shape of ImageNet-LT and iNaturalist 2018.

For each shape (``--shapes``) and each scale of its real image counts (``--scales``; 1 is the real shape, 0.5
halves every class's count, never below one image), this writes a source with that shape (ImageNet-LT list-file
layout, 16-px JPEGs, so that decoding costs little and every per-image and per-class code path runs at the real
counts), then runs, as separate processes and exactly as a user types them:

  validate, plan (first, then again: the kept index), plan --gpus 8, build (local, with `status` polled while it
  runs), build as two ranks at once, status, inspect, score, quality, the card, publish to a loopback Hub,
  datasets.load_dataset of each config from that Hub, one pass of the bundled loader over every shard as 8 DDP
  ranks, a Stage I training epoch, eval, compare.

For each it records wall time, peak memory (the process tree's summed RSS, sampled every 0.2 s, and the largest
single process's high-water mark from the kernel) and what the command wrote to stderr (bytes and lines; stderr is
a file here, as in a cluster job), and how each grows from one scale to the next. Plan and plan --gpus 8 use the
real recipe (SD 1.5, fill to the paper's target); the build makes ``--synthetic-per-class`` images per class with
``builtin:tiny-sd`` (random weights) and a 2-step Textual Inversion per class, so the class count, the real images
and every per-class code path are the real ones and only the synthetic count and the GPU work are scaled down.

    python benchmarks/rehearsal.py          # ImageNet-LT at scales 0.5 and 1, iNaturalist at 1 (~1.5 h on 2 cores)
    python benchmarks/rehearsal.py --shapes imagenet-lt --scales 0.1 --skip ranks train   # a quick look

Writes ``benchmarks/REHEARSAL.md`` (``--results``) with the date, commit, machine and command, and the raw
measurements as JSON beside it. The work folder (``--work``, default a temporary folder) holds the sources,
builds and every command's stdout/stderr; it is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from lt_shapes import SHAPES, class_counts, write_split_file_source
from provenance import git_commit  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
STEPS = ("validate", "plan", "plan-again", "plan-gpus", "plan-gpus-64", "build", "status-during", "ranks", "status", "inspect",
         "score", "quality", "card", "publish", "load-default", "load-real", "load-synthetic", "loader-ddp8",
         "train", "eval", "compare")
SKIPPABLE = ("ranks", "score", "quality", "publish", "load", "loader", "train")
# the targets of issue 21, checked at the largest scale of each shape
TARGETS_MB = {"plan": 1536, "plan-again": 1536, "plan-gpus": 1536, "status": 1536, "status-during": 1536,
              "inspect": 1536, "publish": 1536, "card": 1536, "quality": 4096}
DRIVER_TARGET_MB = 2048


# --------------------------------------------------------------------------- measuring a command
@dataclass
class Measure:
    step: str
    command: str
    seconds: float
    tree_peak_mb: float  # the process tree's summed RSS, sampled
    process_peak_mb: float  # the largest single process's high-water mark (kernel)
    root_peak_mb: float  # the command's own process (the build driver for `build`)
    stderr_bytes: int
    stderr_lines: int
    rc: int
    extra: dict = field(default_factory=dict)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
            kids.setdefault(int(stat[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _tree(pid: int) -> list[int]:
    kids, todo, seen = _children_map(), [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += kids.get(p, [])
    return seen


def _rss_and_hwm(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


class Sampler(threading.Thread):
    """Samples a process tree's memory every 0.2 s until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.tree_peak, self.root_hwm = pid, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = 0
            for p in _tree(self.pid):
                rss, hwm = _rss_and_hwm(p)
                total += rss
                if p == self.pid:
                    self.root_hwm = max(self.root_hwm, hwm)
            self.tree_peak = max(self.tree_peak, total)
            self._stop_event.wait(0.2)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Runner:
    def __init__(self, work: Path, env: dict):
        self.work, self.env = work, env
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Sampler, float]:
        out = open(self.work / "logs" / f"{name}.stdout", "wb")
        err = open(self.work / "logs" / f"{name}.stderr", "wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env or self.env, cwd=REPO)
        out.close(), err.close()
        sampler = Sampler(proc.pid)
        sampler.start()
        return proc, sampler, time.monotonic()

    def finish(self, name: str, argv: list[str], proc, sampler: Sampler, t0: float, timeout: float) -> Measure:
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        err = (self.work / "logs" / f"{name}.stderr").read_bytes()
        shown = " ".join(a if " " not in a else repr(a) for a in argv)
        return Measure(name, shown.replace(str(self.work), "$WORK").replace(sys.executable, "python"), seconds,
                       sampler.tree_peak / 2**20, usage.ru_maxrss / 1024, max(sampler.root_hwm, 0) / 2**20,
                       len(err), err.count(b"\n"), proc.returncode)

    def run(self, name: str, argv: list[str], timeout: float = 7200, env: dict | None = None,
            during=None) -> Measure:
        """``during(stop_event) -> dict``: runs in a thread while the command runs (it must not wait on it)."""
        proc, sampler, t0 = self.start(name, argv, env)
        extra: dict = {}
        stop = threading.Event()
        thread = None
        if during is not None:
            thread = threading.Thread(target=lambda: extra.update(during(stop)), daemon=True)
            thread.start()
        m = self.finish(name, argv, proc, sampler, t0, timeout)
        stop.set()
        if thread is not None:
            thread.join()
        m.extra.update(extra)
        return m

    def stdout(self, name: str) -> str:
        return (self.work / "logs" / f"{name}.stdout").read_text(errors="replace")

    def stderr(self, name: str) -> str:
        return (self.work / "logs" / f"{name}.stderr").read_text(errors="replace")


# --------------------------------------------------------------------------- recipes
def plan_recipe(shape_name: str, root: Path) -> dict:
    """The real recipe's settings (SD 1.5, Textual Inversion, the paper's fill target) on the shaped source."""
    target = {"imagenet-lt": 1300, "places-lt": 1000, "inat2018": 1000}[shape_name]
    return {
        "name": f"rehearsal-{shape_name}", "version": "1.0.0", "seed": 0,
        "source": {"kind": "split_file", "root": str(root), "train": "train.txt", "test": "test.txt",
                   "class_names": "classes.txt"},
        "fill": {"policy": "fill_to", "target": target},
        "generator": {"model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "strategy": "textual_inversion",
                      "prompt": "a photo of a {token}", "guidance_scale": 1.0, "num_inference_steps": 50,
                      "scheduler": "ddim", "resolution": 512},
        "inversion": {"num_vectors": 4, "init_word": "object", "learning_rate": 5.0e-3, "batch_size": 2,
                      "steps_per_image": 100, "min_steps": 2000, "max_steps": 10000, "checkpoint_every": 100},
        "shards": {"image_format": "jpg", "quality": 95, "max_samples": 10000},
        "publish": {"include_real": False, "license": "creativeml-openrail-m"},
    }


def build_recipe(shape_name: str, root: Path, per_class: int) -> dict:
    """What a build can do on 2 cores: every class inverted (one step, from all its images) and ``per_class``
    images each, with the tiny random model at 16 px: the GPU work scaled down, every per-class path kept."""
    rec = plan_recipe(shape_name, root)
    rec["fill"] = {"policy": "addon", "target": per_class}
    rec["generator"] = {"model": "builtin:tiny-sd", "strategy": "textual_inversion", "prompt": "a photo of a {token}",
                        "guidance_scale": 1.0, "num_inference_steps": 2, "scheduler": "ddim", "resolution": 16,
                        "batch_size": 16}
    rec["inversion"] = {"num_vectors": 4, "init_word": "object", "batch_size": 1, "steps_per_image": 1,
                        "min_steps": 1, "max_steps": 1, "checkpoint_every": 1, "classes_per_pass": 16,
                        "flip": False, "resolution": 16}
    return rec


TRAIN_CONFIG = {
    "name": "rehearsal", "seed": 0, "model": {"arch": "tiny_cnn", "width": 8},
    "data": {"image_size": 16, "eval_resize": 16, "crop": "pad", "color_jitter": 0.0, "randaugment": False,
             "shuffle_buffer": 256, "num_workers": 0},
    "stage1": {"data": "filled", "epochs": 1, "batch_size": 512, "lr": 0.05, "schedule": "constant",
               "loss": "balanced_softmax"},
    "amp": False, "eval_batch_size": 1000,
}

LOADER_PASS = """
import json, sys, time
from fillup_data.loader import TrainingData, make_loader
from fillup_data.train.presets import eval_transform
data = TrainingData.open(sys.argv[1])
total, seen, keys = 0, 0, set()
for subset, split in (("filled", "train"), ("real", "test")):
    n = sum(s.num_samples for s in data.shards(subset, split))
    total += n
    for rank in range(8):
        loader = make_loader(data, subset, split, 256, eval_transform(16, 16), train=False, rank=rank, world_size=8,
                             num_workers=0, return_keys=True)
        for batch in loader:
            keys.update(batch[2])
            seen += len(batch[2])
print(json.dumps({"samples": total, "read": seen, "distinct": len(keys)}))
"""

LOAD_CONFIG = """
import json, sys, itertools
from datasets import load_dataset
repo, config, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
if rows:  # streaming, as a user of a large config would: the first rows of each split, typed
    ds = load_dataset(repo, config, revision="v1.0.0", streaming=True)
    out = {}
    for split, d in ds.items():
        first = list(itertools.islice(d, rows))
        out[split] = {"rows_read": len(first), "cls": str(d.features["cls"])[:60],
                      "json_keys": sorted(first[0]["json"]) if first else []}
else:  # the whole config to Arrow
    ds = load_dataset(repo, config, revision="v1.0.0")
    out = {split: {"rows": d.num_rows, "cls": str(d.features["cls"])[:60]} for split, d in ds.items()}
print(json.dumps(out))
"""

CARD = """
import sys
from pathlib import Path
from fillup_data.schema.manifest import Manifest
from fillup_data.shards.card import render_card
manifest = Manifest.read(Path(sys.argv[1]) / "manifest.json")
text = render_card(manifest.to_dict(), include_real=False)
print(len(text), "characters")
"""

HUB = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.hubserver import HubServer
with HubServer() as hub:
    print(hub.endpoint, flush=True)
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline and sys.stdin.readline():
        pass
"""


# The default run fits in about an hour and a half on 2 cores: ImageNet-LT at two scales (how each command
# grows when the images double) and iNaturalist at its real shape (8x the classes, 3.8x the images).
DEFAULT_SCALES = {"imagenet-lt": (0.5, 1.0), "inat2018": (1.0,)}


def scales_of(args, shape_name: str) -> list[float]:
    return sorted(args.scales if args.scales else DEFAULT_SCALES.get(shape_name, (1.0,)))


# --------------------------------------------------------------------------- one shape at one scale
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fillup_data.cli", *args]


def poll_status(runner: Runner, out: Path, every: float):
    """While a build runs: `fillup-data status OUT` every ``every`` seconds, each measured."""
    def during(stop: threading.Event) -> dict:
        polls = []
        while not stop.wait(every):
            if (out / ".fillup" / "plan.json").is_file():
                polls.append(runner.run(f"status-during-{len(polls)}", cli("status", str(out))))
        return {"status_polls": [asdict(p) for p in polls]}
    return during


def rehearse(shape_name: str, scale: float, args, work: Path, env: dict, hub_endpoint: str | None) -> list[Measure]:
    shape = SHAPES[shape_name]
    here = work / f"{shape_name}-x{scale:g}"
    runner = Runner(here, env)
    counts = class_counts(shape, scale)
    results: list[Measure] = []

    def record(m: Measure) -> Measure:
        results.append(m)
        status = "ok" if m.rc == 0 else f"EXIT {m.rc}"
        print(f"  {m.step:<16} {m.seconds:8.1f} s  tree {m.tree_peak_mb:7.0f} MB  process {m.process_peak_mb:7.0f} MB  "
              f"stderr {m.stderr_lines:6,} lines  {status}", flush=True)
        if m.rc != 0:
            print(runner.stderr(m.step)[-3000:], flush=True)
        return m

    t0 = time.monotonic()
    written = write_split_file_source(here / "source", counts, shape.test_per_class)
    source = Measure("source", "(lt_shapes.write_split_file_source)", time.monotonic() - t0, 0, 0, 0, 0, 0, 0,
                     {"classes": len(counts), "train": sum(counts), "test": shape.test_per_class * len(counts),
                      "bytes": written["bytes"]})
    results.append(source)
    print(f"{shape_name} x{scale:g}: {len(counts):,} classes, {sum(counts):,} real train + "
          f"{source.extra['test']:,} test images written in {source.seconds:.0f} s", flush=True)
    plan_yaml, build_yaml, train_yaml = here / "plan.yaml", here / "build.yaml", here / "train.yaml"
    plan_yaml.write_text(yaml.safe_dump(plan_recipe(shape_name, here / "source"), sort_keys=False))
    build_yaml.write_text(yaml.safe_dump(build_recipe(shape_name, here / "source", args.synthetic_per_class),
                                         sort_keys=False))
    train_yaml.write_text(yaml.safe_dump(TRAIN_CONFIG, sort_keys=False))
    out, ranked = here / "build", here / "build-ranks"
    skip = set(args.skip)

    record(runner.run("validate", cli("validate", str(plan_yaml))))
    record(runner.run("plan", cli("plan", str(plan_yaml))))
    record(runner.run("plan-again", cli("plan", str(plan_yaml))))
    m = record(runner.run("plan-gpus", cli("plan", str(plan_yaml), "--gpus", "8")))
    m.extra["estimate"] = _estimate_lines(runner.stdout("plan-gpus"))
    # the baseline the auto inversion tasks replace: fixed slices of 64 classes in class order
    m = record(runner.run("plan-gpus-64", cli("plan", str(plan_yaml), "--gpus", "8",
                                              "--set", "inversion.classes_per_task=64")))
    m.extra["estimate"] = _estimate_lines(runner.stdout("plan-gpus-64"))
    m = record(runner.run("build", cli("build", str(build_yaml), "--out", str(out)),
                          during=poll_status(runner, out, args.status_every)))
    polls = m.extra.pop("status_polls", [])
    if polls:
        worst = max(polls, key=lambda p: p["tree_peak_mb"])
        results.append(Measure("status-during", worst["command"], max(p["seconds"] for p in polls), worst["tree_peak_mb"],
                               max(p["process_peak_mb"] for p in polls), worst["root_peak_mb"],
                               max(p["stderr_bytes"] for p in polls), max(p["stderr_lines"] for p in polls),
                               max(p["rc"] for p in polls), {"polls": len(polls)}))
    m.extra["summary"] = runner.stdout("build").strip().splitlines()[-4:]
    if "ranks" not in skip and (args.ranks_at_every_scale or (shape_name == args.shapes[0]
                                                              and scale == min(scales_of(args, shape_name)))):
        started = [runner.start(f"ranks-{r}", cli("build", str(build_yaml), "--out", str(ranked), "--rank", str(r),
                                                  "--world-size", "2")) for r in range(2)]
        done = [runner.finish(f"ranks-{r}", [], *started[r], timeout=7200) for r in range(2)]
        same = _same_bytes(out, ranked)
        record(Measure("ranks", "fillup-data build ... --rank R --world-size 2 (R = 0, 1 at once)",
                       max(d.seconds for d in done), max(d.tree_peak_mb for d in done),
                       max(d.process_peak_mb for d in done), max(d.root_peak_mb for d in done),
                       sum(d.stderr_bytes for d in done), sum(d.stderr_lines for d in done),
                       max(abs(d.rc) for d in done), {"bytes_as_local_build": same}))
    record(runner.run("status", cli("status", str(out))))
    record(runner.run("inspect", cli("inspect", str(out))))
    if "score" not in skip:
        record(runner.run("score", cli("score", str(out), "--clip-model", "builtin:tiny-clip")))
        if "quality" not in skip:
            record(runner.run("quality", cli("quality", str(out))))
    record(runner.run("card", [sys.executable, "-c", CARD, str(out)]))
    if "publish" not in skip and hub_endpoint:
        repo = f"rehearsal/{shape_name}-x{scale:g}".replace(".", "-")
        hub_env = _hub_env(env, hub_endpoint, here)
        m = record(runner.run("publish", cli("publish", str(out), "--repo", repo, "--tag", "v1.0.0", "--include-real"),
                              env=hub_env))
        m.extra["summary"] = [line.strip() for line in runner.stdout("publish").splitlines()
                              if "file(s)" in line or line.startswith("published")]
        if "load" not in skip:
            # the synthetic config whole; default and real (hundreds of thousands of rows) streamed, 10,000 rows
            for config, rows in (("default", 10_000), ("real", 10_000), ("synthetic", 0)):
                m = record(runner.run(f"load-{config}", [sys.executable, "-c", LOAD_CONFIG, repo, config, str(rows)],
                                      env=hub_env))
                m.extra["result"] = runner.stdout(f"load-{config}").strip()[-400:]
    if "loader" not in skip:
        m = record(runner.run("loader-ddp8", [sys.executable, "-c", LOADER_PASS, str(out)]))
        m.extra["result"] = runner.stdout("loader-ddp8").strip()[-300:]
    if "train" not in skip:
        run = here / "run1"
        record(runner.run("train", cli("train", "--data", str(out), "--config", str(train_yaml), "--stage", "1",
                                       "--out", str(run))))
        record(runner.run("eval", cli("eval", "--data", str(out), "--run", str(run))))
        record(runner.run("compare", cli("compare", str(run))))
    for m in results:
        m.extra.setdefault("images", sum(counts) + shape.test_per_class * len(counts))
    return results


def _estimate_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.startswith(("on 8", "  limited", "shards:", "work:", "  inversion", "  generation"))]


def _same_bytes(a: Path, b: Path) -> bool | None:
    if not (a / "manifest.json").is_file() or not (b / "manifest.json").is_file():
        return None
    import hashlib

    def digests(root: Path) -> dict[str, str]:
        files = [p for d in ("data", "tokens") for p in sorted((root / d).rglob("*")) if p.is_file()]
        files.append(root / "index.parquet")
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    return digests(a) == digests(b)


def _hub_env(env: dict, endpoint: str, home: Path) -> dict:
    env = {k: v for k, v in env.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
               HF_HOME=str(home / "hf_home"), HF_DATASETS_CACHE=str(home / "hf_datasets_cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="30", HF_TOKEN="hf_loopback_rehearsal",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


# --------------------------------------------------------------------------- the report
def _fmt_mb(v: float) -> str:
    return f"{v:,.0f}"


def _growth(a: float, b: float) -> str:
    return "–" if not a or a <= 0 else f"{b / a:.2f}×"


def _command(argv) -> str:
    return f"`python benchmarks/rehearsal.py {' '.join(argv or [])}`".replace(" `", "`")


def report(runs: dict, meta: dict, args, started: str, commit: str, elapsed: float) -> str:
    lines = [
        "# Full-size rehearsal", "",
        f"Last written by {_command(args.argv)}, run {started} UTC at commit {commit} ({elapsed / 60:.1f} minutes), "
        f"on {os.cpu_count()} CPU cores, {_mem_total_gb():.0f} GB RAM, no GPU, Python {platform.python_version()}, "
        f"{_versions()}. Each shape's section names the command and commit that measured it.", "",
        "Each row is one command, run as its own process with stderr going to a file (as in a cluster job). "
        "*tree* is the process tree's summed RSS (sampled every 0.2 s: worker pools included), *process* the "
        "largest single process's peak (kernel high-water mark), *own* the command's own process (the build "
        "driver). Growth is the ratio between the two scales (real images doubled, classes fixed). "
        f"Scaled down: synthetic images, {args.synthetic_per_class} per class with `builtin:tiny-sd` at 16 px (the plan rows "
        "use the real recipe's fill and SD 1.5 settings), and Textual Inversion, one step per class from all its images "
        "(every class). Not scaled: classes, real images, per-class files (tokens, diffusers exports). The two-rank build "
        "runs at the first shape's smaller scale only (it is a second build of the same shape); *ranks* sums both "
        "ranks' stderr and shows the larger rank's memory.", "",
    ]
    for shape_name, by_scale in runs.items():
        scales = sorted(by_scale)
        shape = SHAPES[shape_name]
        lines += [f"## {shape_name}: {shape.classes:,} classes ({shape.many} many / {shape.medium} medium / "
                  f"{shape.few} few), {shape.total:,} real training images at scale 1, largest {shape.largest}, "
                  f"smallest {shape.smallest}; {shape.test_per_class} test images per class", "",
                  f"Shape from {shape.source}.", ""]
        for scale in scales:
            m = meta.get(shape_name, {}).get(scale) or {}
            lines.append(f"- x{scale:g}: {_command(m.get('argv'))}, run {m.get('started')} UTC at commit "
                         f"{m.get('commit')}")
        lines.append("")
        head = "| command | " + " | ".join(f"x{s:g}: s | tree MB | process MB | own MB | stderr lines"
                                             for s in scales)
        head += " | growth: time / tree MB |" if len(scales) > 1 else " |"
        lines += [head, "|---|" + "---:|" * (5 * len(scales) + (1 if len(scales) > 1 else 0))]
        for step in ("source",) + STEPS:
            ms = [next((m for m in by_scale[s] if m["step"] == step), None) for s in scales]
            if all(m is None for m in ms):
                continue
            cells = []
            for m in ms:
                if m is None:
                    cells.append("– | – | – | – | –")
                    continue
                flag = "" if m["rc"] == 0 else f" (exit {m['rc']})"
                cells.append(f"{m['seconds']:.1f}{flag} | {_fmt_mb(m['tree_peak_mb'])} | {_fmt_mb(m['process_peak_mb'])} | "
                             f"{_fmt_mb(m['root_peak_mb'])} | {m['stderr_lines']:,}")
            row = f"| {step} | " + " | ".join(cells)
            if len(scales) > 1 and ms[0] and ms[-1]:
                row += f" | {_growth(ms[0]['seconds'], ms[-1]['seconds'])} / {_growth(ms[0]['tree_peak_mb'], ms[-1]['tree_peak_mb'])}"
            elif len(scales) > 1:
                row += " | –"
            lines.append(row + " |")
        lines += [""] + _checks(shape_name, by_scale[scales[-1]], by_scale.get(scales[0]) if len(scales) > 1 else None)
        lines += [""] + _details(by_scale[scales[-1]], scales[-1]) + [""]
    lines += _class_growth(runs)
    return "\n".join(lines) + "\n"


def _class_growth(runs: dict) -> list[str]:
    """Each command at iNaturalist's shape against ImageNet-LT's, both at scale 1: 8.1x the classes, 3.8x the images."""
    a, b = runs.get("imagenet-lt", {}).get(1.0), runs.get("inat2018", {}).get(1.0)
    if not a or not b:
        return []
    ca, cb = SHAPES["imagenet-lt"], SHAPES["inat2018"]
    lines = [f"## From ImageNet-LT to iNaturalist (both at scale 1: {cb.classes / ca.classes:.1f}x the classes, "
             f"{cb.total / ca.total:.1f}x the real images)", "",
             "| command | ImageNet-LT s | iNaturalist s | time | ImageNet-LT tree MB | iNaturalist tree MB | memory |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for step in STEPS:
        ma = next((m for m in a if m["step"] == step), None)
        mb = next((m for m in b if m["step"] == step), None)
        if ma and mb:
            lines.append(f"| {step} | {ma['seconds']:.1f} | {mb['seconds']:.1f} | {_growth(ma['seconds'], mb['seconds'])} | "
                         f"{_fmt_mb(ma['tree_peak_mb'])} | {_fmt_mb(mb['tree_peak_mb'])} | "
                         f"{_growth(ma['tree_peak_mb'], mb['tree_peak_mb'])} |")
    return lines + [""]


def _checks(shape_name: str, ms: list[dict], smaller: list[dict] | None) -> list[str]:
    by = {m["step"]: m for m in ms}
    out = [f"Targets (issue 21) at the largest scale:"]
    for step, limit in TARGETS_MB.items():
        if step in by:
            v = by[step]["tree_peak_mb"]
            out.append(f"- `{step}` peak {v:,.0f} MB (target < {limit:,} MB): {'met' if v < limit else 'MISSED'}")
    if "build" in by:
        v = by["build"]["root_peak_mb"]
        out.append(f"- build driver peak {v:,.0f} MB (target < {DRIVER_TARGET_MB:,} MB): "
                   f"{'met' if v < DRIVER_TARGET_MB else 'MISSED'}")
        minutes = by["build"]["seconds"] / 60
        rate = by["build"]["stderr_lines"] / max(minutes, 1e-9)
        out.append(f"- build stderr: {by['build']['stderr_lines']:,} lines ({by['build']['stderr_bytes']:,} bytes) in "
                   f"{minutes:.1f} min = {rate:.1f} lines per minute (one worker: the build process)")
    if "plan" in by and "plan-again" in by:
        a, b = by["plan"]["seconds"], by["plan-again"]["seconds"]
        out.append(f"- second plan {b:.1f} s = {b / a:.0%} of the first {a:.1f} s (target at most 25%): "
                   f"{'met' if b <= a / 4 else 'MISSED'}")
    if "ranks" in by:
        out.append(f"- two ranks: bytes of data/, tokens/ and index.parquet equal to the local build: "
                   f"{by['ranks']['extra'].get('bytes_as_local_build')}")
    return out


def _details(ms: list[dict], scale: float) -> list[str]:
    out = [f"<details><summary>Commands and outputs at x{scale:g}</summary>", ""]
    for m in ms:
        if m["step"] == "source":
            continue
        out.append(f"- `{m['step']}`: `{m['command']}`")
        for key in ("estimate", "summary", "result", "polls", "bytes_as_local_build"):
            if key in m["extra"]:
                value = m["extra"][key]
                text = "; ".join(value) if isinstance(value, list) else str(value)
                out.append(f"  - {key}: {text}")
    return out + ["", "</details>"]


def _mem_total_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def _versions() -> str:
    code = ("import torch, diffusers, datasets, huggingface_hub; "
            "print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, datasets {datasets.__version__}, '"
            "f'huggingface_hub {huggingface_hub.__version__}')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["imagenet-lt", "inat2018"], choices=sorted(SHAPES))
    ap.add_argument("--scales", nargs="+", type=float, default=None,
                    help="multipliers of every class's real image count (1 = the real shape), for every shape "
                         f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_SCALES.items())}, 1 otherwise)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the shapes and scales of an earlier run in the results JSON that this run does not "
                         "measure again (each keeps its own commit and command in the report)")
    ap.add_argument("--synthetic-per-class", type=int, default=1,
                    help="synthetic images the build makes per class (scaled down from the real fill)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SKIPPABLE, help="leave these steps out")
    ap.add_argument("--ranks-at-every-scale", action="store_true",
                    help="build as two ranks at every shape and scale (default: the first shape's smallest scale "
                         "only: it is a second build of the same shape)")
    ap.add_argument("--status-every", type=float, default=20.0, help="seconds between `status` polls during the build")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "REHEARSAL.md"), help="Markdown report to write")
    args = ap.parse_args(argv)
    args.argv = argv
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    commit = git_commit(REPO)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fillup-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILLUP_PROGRESS")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               FILLUP_CACHE=str(work / "cache"), TOKENIZERS_PARALLELISM="false")
    hub = None
    t0 = time.monotonic()
    runs: dict[str, dict[float, list[dict]]] = {}
    meta: dict[str, dict[float, dict]] = {}
    results_json = Path(args.results).with_suffix(".json")
    if args.merge and results_json.is_file():
        earlier = json.loads(results_json.read_text())
        for shape_name, by_scale in earlier["runs"].items():
            for scale, ms in by_scale.items():
                runs.setdefault(shape_name, {})[float(scale)] = ms
                meta.setdefault(shape_name, {})[float(scale)] = earlier.get("meta", {}).get(shape_name, {}).get(
                    scale, {k: earlier.get(k) for k in ("started", "commit", "argv")})
    this_run = {"started": started, "commit": commit, "argv": argv}

    def save() -> None:
        results_json.write_text(json.dumps(
            {"runs": {k: {str(s): v for s, v in sorted(d.items())} for k, d in runs.items()},
             "meta": {k: {str(s): v for s, v in sorted(d.items())} for k, d in meta.items()}}, indent=1))
    try:
        endpoint = None
        if "publish" not in args.skip:
            hub_log = open(work / "hub.log", "w")  # the server's own complaints (a client hanging up mid-stream)
            hub = subprocess.Popen([sys.executable, "-c", HUB, str(REPO), str(6 * 3600)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=hub_log, text=True, env=env)
            endpoint = hub.stdout.readline().strip()
        for shape_name in args.shapes:
            for scale in scales_of(args, shape_name):
                ms = rehearse(shape_name, scale, args, work, env, endpoint)
                runs.setdefault(shape_name, {})[scale] = [asdict(m) for m in ms]
                meta.setdefault(shape_name, {})[scale] = this_run
                save()
                if not args.keep:  # the next scale needs the disk more than this one's outputs
                    shutil.rmtree(work / f"{shape_name}-x{scale:g}", ignore_errors=True)
    finally:
        if hub is not None:
            hub.stdin.close()
            hub.wait(timeout=30)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = report(runs, meta, args, started, commit, time.monotonic() - t0)
    Path(args.results).write_text(text)
    print(f"wrote {args.results} ({(time.monotonic() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
