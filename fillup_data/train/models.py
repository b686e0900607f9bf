"""Classifier models by name: any torchvision classification model, plus ``tiny_cnn`` for CPU demos.

Weights are read and written as safetensors only (a downloaded ``.pth`` is a pickle); the Places-LT
protocol's ImageNet-pretrained ResNet-152 is therefore given as a local ``.safetensors`` file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fillup_data.errors import FillupError


class TinyCNN(nn.Module):
    """Four conv-BN-ReLU blocks and a linear head: learns the 32x32 demo in CPU minutes."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _cifar_stem(model: nn.Module, arch: str) -> None:
    """ResNet for 32x32 inputs (He et al. CIFAR variant): 3x3 stride-1 conv1, no max-pool."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise FillupError(f"model.cifar_stem is only available for ResNet-style models, not {arch}")
    out = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_model(arch: str, num_classes: int, *, cifar_stem: bool = False, width: int = 32) -> nn.Module:
    if arch == "tiny_cnn":
        return TinyCNN(num_classes, width=width)
    import torchvision

    names = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in names:
        raise FillupError(
            f"model.arch {arch!r}: not a torchvision classification model; e.g. resnet50, resnet152, "
            "resnet18, wide_resnet50_2, or tiny_cnn"
        )
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if cifar_stem:
        _cifar_stem(model, arch)
    return model


def classifier_of(model: nn.Module) -> nn.Module:
    """The final linear layer (cRT retrains only this one)."""
    for name in ("fc", "classifier", "head", "heads"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            return mod
        if isinstance(mod, nn.Sequential) and len(mod) and isinstance(mod[-1], nn.Linear):
            return mod[-1]
    raise FillupError(f"cannot find the classifier layer of {type(model).__name__} (looked for fc/classifier/head)")


def load_weights(model: nn.Module, path: str | Path, *, skip_mismatched: bool = True) -> list[str]:
    """Load a safetensors state dict; tensors whose shape differs (a 1000-class head) are skipped.

    Returns the names of the model's tensors left at their initialisation, for the log.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise FillupError(
            f"{path}: weights must be a .safetensors file (pickled .pth files are not loaded); convert "
            "a trusted file once with: python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('IN.pth', weights_only=True), 'OUT.safetensors')\""
        )
    if not path.is_file():
        raise FillupError(f"{path}: no such weights file")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise FillupError(f"{path}: not a readable safetensors file ({err})") from None
    own = model.state_dict()
    usable = {}
    for k, v in state.items():
        if k in own and own[k].shape == v.shape:
            usable[k] = v
        elif k in own and not skip_mismatched:
            raise FillupError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    if not usable:
        raise FillupError(f"{path}: no tensor matches the model {type(model).__name__}; wrong model.arch?")
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from fillup_data.train.checkpoint import replace_durably

    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    replace_durably(tmp, Path(path))
