"""The world classifier: a small CNN with a shape head and a colour head, the judge of generated images.

Trained on freshly drawn world images of *all* 64 (shape, colour) pairs (held-out ones included:
it judges the generator, it is not part of it). Its weights ship with the package as safetensors
(~0.3 MB) with a JSON header naming the class lists, so scores mean the same on every machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fillup_data.demo import world
from fillup_data.errors import FillupError

WEIGHTS_NAME = "world_classifier.safetensors"

# Every world image is a pure function of the seed of its ``sample_world`` batch. Training step
# ``s`` of a run with ``seed`` draws batch ``seed * SEED_STRIDE + s``, so a run's batches lie in
# ``training_seeds(seed, steps)``; evaluation draws from EVAL_SEED up, above every training batch of
# any allowed run (seed < MAX_TRAIN_SEED, steps <= SEED_STRIDE), so it never scores a training image.
SEED_STRIDE = 1_000_003
MAX_TRAIN_SEED = 1_000
EVAL_SEED = MAX_TRAIN_SEED * SEED_STRIDE


def training_seeds(seed: int, steps: int) -> range:
    """The ``sample_world`` seeds of the batches ``train_classifier(seed=seed, steps=steps)`` trains on."""
    return range(seed * SEED_STRIDE, seed * SEED_STRIDE + steps)


class WorldClassifier(nn.Module):
    """4 conv stages (32x32 -> 4x4), global average pool, two linear heads."""

    def __init__(self, width: int = 32, n_shapes: int = len(world.SHAPES), n_colours: int = len(world.COLOURS)):
        super().__init__()
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
            block(2 * w, 4 * w), nn.MaxPool2d(2),
            block(4 * w, 4 * w),
        )  # fmt: skip
        self.shape_head = nn.Linear(4 * w, n_shapes)
        self.colour_head = nn.Linear(4 * w, n_colours)
        self.width = width

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels``: ``[B, 3, 32, 32]`` in [-1, 1]; returns (shape logits, colour logits)."""
        h = self.features(pixels).mean(dim=(2, 3))
        return self.shape_head(h), self.colour_head(h)


def to_pixels(images) -> torch.Tensor:
    """PIL images / uint8 HWC arrays -> ``[B, 3, 32, 32]`` in [-1, 1] (resized with BOX if not 32x32)."""
    arrs = []
    for im in images:
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.Resampling.BOX)
            im = np.asarray(im)
        arrs.append(np.asarray(im, dtype=np.uint8))
    batch = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def all_combos() -> list[tuple[str, str]]:
    return [(s, c) for s in world.SHAPES for c in world.COLOURS]


def _draw_batch(seed: int, n: int, hard_fraction: float = 0.0):
    images, _, labels = world.sample_world(seed, n, combos=all_combos(), hard_fraction=hard_fraction)
    return to_pixels(images), torch.from_numpy(labels)


# The share of the classifier's training images with the harder backgrounds (world.draw(hard=True)),
# the share the generator is pretrained with, so it judges generated images of either kind.
TRAIN_HARD_FRACTION = 0.3


class _ClassifierBatches(torch.utils.data.Dataset):
    """Item ``s``: training step ``s``'s batch (a pure function of the step, for DataLoader workers)."""

    def __init__(self, seeds: range, batch_size: int, hard_fraction: float):
        self.seeds, self.batch_size, self.hard_fraction = seeds, batch_size, hard_fraction

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, step: int):
        return _draw_batch(self.seeds[step], self.batch_size, self.hard_fraction)


@dataclass
class ClassifierReport:
    shape_accuracy: float
    colour_accuracy: float
    both_accuracy: float
    n: int


def evaluate_classifier(model: WorldClassifier, n: int = 4096, seed: int = EVAL_SEED, transform=None,
                        hard_fraction: float = 0.0) -> ClassifierReport:
    """Accuracy on ``n`` fresh world images (one batch of seed ``seed``, from EVAL_SEED up: never trained on);
    ``transform`` maps each ``[B, 3, 32, 32]`` chunk first (a VAE round trip, say); ``hard_fraction`` of
    them with the harder backgrounds (1.0: all)."""
    if seed < EVAL_SEED:
        raise FillupError(f"evaluation seed {seed} may be a training batch's; use a seed >= EVAL_SEED ({EVAL_SEED})")
    model.eval()
    pixels, labels = _draw_batch(seed, n, hard_fraction)
    transform = transform or (lambda x: x)
    device = next(model.parameters()).device
    with torch.no_grad():
        preds = [torch.stack([ls.argmax(1), lc.argmax(1)], 1).cpu()
                 for ls, lc in (model(transform(p.to(device))) for p in pixels.split(256))]
    pred = torch.cat(preds)
    ok = pred == labels
    return ClassifierReport(float(ok[:, 0].float().mean()), float(ok[:, 1].float().mean()), float(ok.all(1).float().mean()), n)


def train_classifier(
    out: str | Path | None = None, *, steps: int = 1200, batch_size: int = 128, seed: int = 0, progress: bool = True,
    hard_fraction: float = TRAIN_HARD_FRACTION, device: str = "cpu", data_workers: int = 0,
) -> tuple[WorldClassifier, ClassifierReport]:
    """Train on fresh draws (a new batch every step, ``hard_fraction`` of the images with the harder
    backgrounds), save safetensors to ``out`` (default: the package). ``device`` runs the model; the
    images are drawn on the CPU (by ``data_workers`` processes), the same for any device."""
    from tqdm.auto import tqdm

    if not (0 <= seed < MAX_TRAIN_SEED and 0 < steps <= SEED_STRIDE):
        raise FillupError(f"seed must be in [0, {MAX_TRAIN_SEED}) and steps in [1, {SEED_STRIDE}] (evaluation seeds lie above)")
    torch.manual_seed(seed)
    model = WorldClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    batches = torch.utils.data.DataLoader(_ClassifierBatches(training_seeds(seed, steps), batch_size, hard_fraction),
                                          batch_size=None, num_workers=data_workers,
                                          prefetch_factor=8 if data_workers else None)
    for pixels, labels in tqdm(batches, desc="world classifier", disable=not progress):
        pixels, labels = pixels.to(device), labels.to(device)
        ls, lc = model(pixels)
        loss = F.cross_entropy(ls, labels[:, 0]) + F.cross_entropy(lc, labels[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    report = evaluate_classifier(model)
    hard_report = evaluate_classifier(model, hard_fraction=1.0)
    model = model.cpu()
    save_classifier(model, out or default_weights_path(), report=report,
                    extra={"steps": steps, "batch_size": batch_size, "seed": seed, "hard_fraction": hard_fraction,
                           "report_hard_backgrounds": hard_report.__dict__})
    return model, report


def default_weights_path() -> Path:
    return Path(str(resources.files("fillup_data.demo.toyworld").joinpath(WEIGHTS_NAME)))


def save_classifier(model: WorldClassifier, path: str | Path, *, report: ClassifierReport | None = None, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    meta = {
        "width": str(model.width),
        "shapes": json.dumps(list(world.SHAPES)),
        "colours": json.dumps(list(world.COLOURS)),
        "report": json.dumps(report.__dict__ if report else None),
        "training": json.dumps(extra or {}),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path | None = None) -> WorldClassifier:
    """The shipped classifier (or one at ``path``), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path else default_weights_path()
    if not path.is_file():
        raise FillupError(f"{path}: no world classifier weights; run `python scripts/train_toyworld.py classifier`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("shapes", "[]")) != list(world.SHAPES) or json.loads(meta.get("colours", "[]")) != list(world.COLOURS):
        raise FillupError(f"{path}: trained for other shape/colour lists than fillup_data.demo.world's; retrain it")
    model = WorldClassifier(width=int(meta.get("width", 32)))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify(model: WorldClassifier, images) -> list[tuple[str, str]]:
    """(shape, colour) names predicted for each image."""
    pixels = to_pixels(images)
    out = []
    for chunk in pixels.split(256):
        ls, lc = model(chunk)
        out.extend(zip(ls.argmax(1).tolist(), lc.argmax(1).tolist()))
    colours = list(world.COLOURS)
    return [(world.SHAPES[s], colours[c]) for s, c in out]
