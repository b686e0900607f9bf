"""The classifier behind ``class_confidence``: a run folder of ``fillup-data train`` (its recorded
config builds the model and its eval transform) or any torchvision model given by name and a
``.safetensors`` state dict.  Its number of classes must be the build's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fillup_data.errors import FillupError


@dataclass
class Classifier:
    model: nn.Module
    transform: Callable
    description: str  # what the manifest records: the run folder or arch + weights file
    identity: str

    @torch.no_grad()
    def probabilities(self, images, device) -> torch.Tensor:
        batch = torch.stack([self.transform(im) for im in images]).to(device)
        return torch.softmax(self.model(batch).float(), dim=-1).cpu()


def _check_head(model: nn.Module, state: dict, weights: Path, num_classes: int, names: str) -> None:
    """A head whose output size is not the build's class count is the likely mistake: say so plainly."""
    from fillup_data.train.models import classifier_of

    head = classifier_of(model)
    head_name = next(n for n, m in model.named_modules() if m is head)
    w = state.get(f"{head_name}.weight")
    if w is not None and w.shape[0] != num_classes:
        raise FillupError(f"{weights}: the classifier has {w.shape[0]} classes ({head_name}.weight), the build has "
                          f"{num_classes} ({names}); give a classifier trained on this build's classes")


def _load_state(weights: Path) -> dict:
    from safetensors.torch import load_file

    if weights.suffix != ".safetensors":
        raise FillupError(f"{weights}: weights must be a .safetensors file (pickled .pth files are not loaded)")
    if not weights.is_file():
        raise FillupError(f"{weights}: no such weights file")
    try:
        return load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise FillupError(f"{weights}: not a readable safetensors file ({err})") from None


def _finish(model: nn.Module, state: dict, weights: Path, transform, description: str, extra: str) -> Classifier:
    from fillup_data.quality.clip_model import state_digest

    own = model.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if wrong:
        raise FillupError(f"{weights}: lacks or misshapes tensors {wrong[:5]} of the model; wrong architecture?")
    model.load_state_dict({k: state[k] for k in own})
    model.eval()
    return Classifier(model, transform, description, state_digest(model, extra))


def classifier_from_run(run: str | Path, class_names: list[str]) -> Classifier:
    """``RUN`` of ``fillup-data train``: ``run.json`` (config, class names) and ``model.safetensors``."""
    from fillup_data.train.checkpoint import read_json
    from fillup_data.train.config import parse_train_config
    from fillup_data.train.presets import eval_transform
    from fillup_data.train.trainer import model_for

    run = Path(run)
    run_json, weights = run / "run.json", run / "model.safetensors"
    if not run_json.is_file() or not weights.is_file():
        raise FillupError(f"--classifier {run}: not a finished run folder of `fillup-data train` (needs run.json "
                          "and model.safetensors); for another model use --classifier-arch and --classifier-weights")
    record = read_json(run_json)
    trained_on = record.get("class_names")
    if not isinstance(trained_on, list):
        raise FillupError(f"{run_json}: no class_names list; it is not a run.json of `fillup-data train`")
    if len(trained_on) != len(class_names):
        raise FillupError(f"{run_json}: the classifier has {len(trained_on)} classes, the build has "
                          f"{len(class_names)}; give a run trained on this build")
    if trained_on != class_names:
        diff = next(i for i, (a, b) in enumerate(zip(trained_on, class_names)) if a != b)
        raise FillupError(f"{run_json}: class {diff} is {trained_on[diff]!r} in the run but {class_names[diff]!r} in "
                          "the build; give a run trained on this build's classes")
    cfg = parse_train_config(record.get("config"), f"{run_json}:config")
    d = cfg.data
    model = model_for(cfg, len(class_names))
    state = _load_state(weights)
    _check_head(model, state, weights, len(class_names), "manifest.json")
    transform = eval_transform(d.image_size, d.eval_resize, mean=d.mean, std=d.std)
    return _finish(model, state, weights, transform, str(run), repr(transform))


def classifier_from_weights(arch: str, weights: str | Path, num_classes: int, image_size: int = 224,
                            resize: int = 256) -> Classifier:
    """Any torchvision model (or ``tiny_cnn``) with a ``.safetensors`` state dict, ImageNet normalisation."""
    from fillup_data.train.models import build_model
    from fillup_data.train.presets import eval_transform

    weights = Path(weights)
    try:
        model = build_model(arch, num_classes)
    except FillupError as err:
        raise FillupError(f"--classifier-arch: {err}".replace("model.arch ", "")) from None
    state = _load_state(weights)
    _check_head(model, state, weights, num_classes, "manifest.json")
    transform = eval_transform(image_size, resize)
    return _finish(model, state, weights, transform, f"{arch} {weights}", repr(transform))
