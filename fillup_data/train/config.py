"""Train recipe: model, data augmentation and the two stages' schedules (defaults: paper appendix B.4).

Defaults reproduce the paper's ImageNet-LT protocol: Stage I 100 epochs, global batch 256, SGD
momentum 0.9, lr 0.1 x0.1 every 30 epochs, Balanced Softmax; Stage II 30 epochs on real data only,
lr 1e-3 x0.1 every 10 epochs with 5 warm-up epochs, whole model.  Choices the paper leaves open are
fields here with the value we picked (weight decay 1e-4, linear per-iteration warm-up, colour
jitter 0.4, no lr scaling with batch size) and are listed in docs/training.md.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fillup_data.errors import FillupError
from fillup_data.loader.score_filter import SampleFilter
from fillup_data.recipe import expand_env, read_yaml_mapping


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    arch: str = Field("resnet50", description="a torchvision classification model name, or tiny_cnn")
    cifar_stem: bool = Field(False, description="3x3 stride-1 first conv and no max-pool, for 32x32 images")
    weights: str | None = Field(None, description="local .safetensors state dict to start Stage I from")
    width: int = Field(32, ge=4, description="tiny_cnn only: channels of the first block")


class DataConfig(_Strict):
    image_size: int = Field(224, ge=8)
    eval_resize: int = Field(256, ge=8)
    crop: Literal["random_resized", "pad"] = "random_resized"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = Field(0.4, ge=0.0)
    randaugment: bool = True
    randaugment_ops: int = Field(2, ge=1)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    shuffle_buffer: int = Field(2000, ge=1)
    num_workers: int = Field(8, ge=0)

    @model_validator(mode="after")
    def _sizes(self) -> "DataConfig":
        if self.eval_resize < self.image_size:
            raise ValueError(f"eval_resize ({self.eval_resize}) must be >= image_size ({self.image_size})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        return self


class StageConfig(_Strict):
    data: Literal["filled", "real", "synthetic"] = "filled"
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1, description="global batch over all ranks")
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_size: int = Field(30, ge=1, description="step schedule: decay every step_size epochs")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    loss: Literal["balanced_softmax", "cross_entropy"] = "balanced_softmax"
    train: Literal["all", "classifier"] = Field("all", description="classifier: cRT-style, the rest frozen")
    reinit_classifier: bool = False
    # part of what the stage reads, like ``data``: so it sits here, is recorded with the config in run.json,
    # and a resume with another filter is refused
    filter: SampleFilter = Field(
        default_factory=SampleFilter,
        description="keep only the synthetic samples whose index.parquet scores pass (`fillup-data score`)")

    @model_validator(mode="after")
    def _warmup(self) -> "StageConfig":
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= epochs ({self.epochs})")
        if self.filter.active and self.data == "real":
            raise ValueError("filter: it keeps or drops synthetic samples, and this stage's data is real; "
                             "drop the filter or set data to filled or synthetic")
        return self


# Paper B.4, Stage II: real data only, 30 epochs, lr 1e-3 x0.1 every 10 epochs, 5 warm-up epochs.
# A partial ``stage2:`` section in a recipe is merged over these, not over Stage I's defaults.
STAGE2_DEFAULTS = {"data": "real", "epochs": 30, "lr": 1e-3, "step_size": 10, "warmup_epochs": 5}


def _stage2_default() -> StageConfig:
    return StageConfig(**STAGE2_DEFAULTS)


class TrainConfig(_Strict):
    name: str = "train"
    seed: int = Field(0, ge=0)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stage1: StageConfig = StageConfig()
    stage2: StageConfig = Field(default_factory=_stage2_default)
    amp: bool = Field(True, description="mixed precision on CUDA (fp16 + GradScaler); ignored on CPU")
    channels_last: bool = Field(True, description="NHWC memory format on CUDA; ignored on CPU")
    sync_bn: bool = False
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _stage2_defaults(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("stage2"), dict):
            data = {**data, "stage2": {**STAGE2_DEFAULTS, **data["stage2"]}}
        return data

    def stage(self, n: int) -> StageConfig:
        if n not in (1, 2):
            raise FillupError(f"--stage {n}: allowed 1 or 2")
        return self.stage1 if n == 1 else self.stage2


def _format(err: ValidationError, where: str) -> str:
    lines = [f"{where}: the train recipe is not valid:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see recipes/train/imagenet_lt.yaml for the shape)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        lines.append(f"  - {loc or '<top>'}: {msg}{shown}")
    return "\n".join(lines)


# ${VAR} is expanded only in these path fields (run.json records the config; secrets never expand)
TRAIN_ENV_FIELDS = ("model.weights",)


def parse_train_config(data: object, where: str = "train recipe") -> TrainConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FillupError(f"{where}: a train recipe is a YAML mapping, got {type(data).__name__}")
    data = expand_env(data, "", TRAIN_ENV_FIELDS)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise FillupError(_format(err, where)) from None


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    data = read_yaml_mapping(path, "train recipe (see recipes/train/)", overrides, error=FillupError)
    return parse_train_config(data, str(path))
