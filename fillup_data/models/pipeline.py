"""Loading a Stable-Diffusion-family pipeline the way a user with network access would.

Every model, the built-in tiny ones included, goes through
``<PipelineClass>.from_pretrained(path_or_id, revision=..., torch_dtype=...)``: the built-in alias only
resolves to a local folder first.  The class is the strategy's (text-to-image
``StableDiffusionPipeline``; ``StableDiffusionImageVariationPipeline`` and ``StableUnCLIPImg2ImgPipeline``
for the image-to-image strategies), checked first against the ``_class_name`` of the model's
``model_index.json``, so a model of the wrong kind is refused by name instead of half-loading.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import torch

from fillup_data.errors import FillupError
from fillup_data.models.architectures import builtin_folder_is_intact, save_random_pipeline_atomically

# alias -> (config set, seed, cache folder name).  A cached folder is reused only while its content
# check passes (architectures.builtin_folder_is_intact: same builder and configs, every file's sha256).
BUILTIN_MODELS = {
    "builtin:tiny-sd": ("tiny", 0, "tiny-sd-v1"),
    "builtin:sd15-random": ("sd15", 0, "sd15-random-v1"),
    "builtin:tiny-sd-image-variation": ("tiny_image_variation", 0, "tiny-sd-image-variation-v1"),
    "builtin:tiny-sd-unclip": ("tiny_unclip", 0, "tiny-sd-unclip-v1"),
}
TEXT_TO_IMAGE = "StableDiffusionPipeline"
# pipeline classes that have no text-to-image path: a text strategy refuses them
IMAGE_CONDITIONED = ("StableDiffusionImageVariationPipeline", "StableUnCLIPImg2ImgPipeline")
SCHEDULERS = ("ddim", "dpmpp_2m", "euler")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """``$FILLUP_CACHE/models`` or ``~/.cache/fillup-data/models``."""
    from fillup_data.cache import cache_dir as kind_dir

    return kind_dir("models")


# The shipped toyworld pipeline folder (``builtin:toyworld``), in the demo wing beside the code that trains it.
# models owns where it lies (a path, not an import), and the demo wing imports it from here -- never the other
# way round (a test keeps models/ from importing fillup_data.demo).
TOYWORLD_DIR = Path(__file__).resolve().parents[1] / "demo" / "toyworld" / "pipeline"


def toyworld_dir() -> Path:
    """The shipped toyworld pipeline folder, checked to be there."""
    if not (TOYWORLD_DIR / "model_index.json").is_file():
        raise FillupError(
            f"{TOYWORLD_DIR}: the toyworld weights are missing from this installation; "
            "reinstall fillup-data or run `python scripts/train_toyworld.py all`"
        )
    return TOYWORLD_DIR


def resolve_model(model: str) -> str:
    """Map ``builtin:*`` aliases to a local folder (building it once, rebuilding it when its content
    check fails); pass anything else through."""
    if not model.startswith("builtin:"):
        return model
    if model == "builtin:toyworld":  # trained weights shipped inside the package (issue 6)
        return str(toyworld_dir())
    if model not in BUILTIN_MODELS:
        raise FillupError(
            f"generator.model: unknown built-in model {model!r}; available: "
            f"{', '.join(sorted([*BUILTIN_MODELS, 'builtin:toyworld']))}"
        )
    config_set, seed, folder = BUILTIN_MODELS[model]
    dest = cache_dir() / folder
    if not builtin_folder_is_intact(dest, config_set, seed):
        save_random_pipeline_atomically(config_set, dest, seed)
    return str(dest)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` = float16 on CUDA (how SD 1.5 is run in practice), float32 on CPU (fp16 CPU kernels are slow or missing)."""
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise FillupError(f"generator.dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def set_scheduler(pipe, scheduler: str) -> None:
    """Swap the sampler by name, keeping the model's noise schedule (``from_config``)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = pipe.scheduler.config
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    elif scheduler == "dpmpp_2m":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    elif scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    else:
        raise FillupError(f"generator.scheduler: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")


def _dtype_kwarg(torch_dtype: torch.dtype) -> dict:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` (the old name warns); older releases know only ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": torch_dtype}


def _load_error(model: str, revision: str | None, err: Exception) -> FillupError:
    offline = " (HF_HUB_OFFLINE is set: only cached models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return FillupError(
        f"generator.model: cannot load {model!r} (revision {revision or 'default'}){offline}: {err}. "
        "Give a hub id of a Stable-Diffusion-family diffusers pipeline, a local folder in the "
        "save_pretrained layout, or builtin:tiny-sd for the offline demo model."
    )


def pipeline_class_name(model: str, path: str, revision: str | None) -> str:
    """``_class_name`` of the model's ``model_index.json`` (folder or hub id)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as err:
        raise _load_error(model, revision, err) from err
    return str(config.get("_class_name", ""))


def check_pipeline_class(model: str, found: str, wanted: str, strategy: str | None) -> None:
    """Refuse a pipeline that cannot run ``strategy`` (clear error naming generator.model)."""
    bad = found != wanted if wanted != TEXT_TO_IMAGE else found in IMAGE_CONDITIONED
    if bad:
        needs = f"generator.strategy {strategy}" if strategy else "this use"
        raise FillupError(
            f"generator.model: {model!r} is a {found or 'pipeline without a _class_name'}, but {needs} needs a "
            f"{wanted}; give a model of that kind (or change generator.strategy)"
        )


def load_pipeline(
    model: str,
    revision: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    scheduler: str = "ddim",
    safety_checker: bool = False,
    pipeline_class: str = TEXT_TO_IMAGE,
    strategy: str | None = None,
):
    """Load a diffusers pipeline of ``pipeline_class`` by hub id, local folder or ``builtin:*`` alias.

    The safety checker is off unless asked for: its false positives replace images with black
    ones, which in a training set is label noise (the generator also detects black images).
    The DDIM ``eta`` is a sampling argument, passed at generation time, not here.
    """
    import diffusers

    # diffusers resolves a model_index.json component outside diffusers/transformers from sys.modules
    # only: the package's own exact autoencoder must be imported before a folder naming it loads
    importlib.import_module("fillup_data.models.space_to_depth")

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model(model)
    check_pipeline_class(model, pipeline_class_name(model, path, revision), pipeline_class, strategy)
    cls = getattr(diffusers, pipeline_class)
    has_checker = "safety_checker" in inspect.signature(cls.__init__).parameters
    if safety_checker and not has_checker:
        raise FillupError(f"generator.safety_checker: true, but a {pipeline_class} has no safety checker; set it to false")
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if has_checker and not safety_checker else {}
    from fillup_data.progress import quiet_loading

    quiet_loading()  # diffusers' "Loading pipeline components" bar has no switch of its own
    try:
        pipe = cls.from_pretrained(path, revision=revision, **_dtype_kwarg(torch_dtype), **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(model, revision, err) from err
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise FillupError(
            f"generator.safety_checker: true, but {model!r} ships no safety checker; set it to false"
        )
    set_scheduler(pipe, scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_for(cfg, device: str | None = None, pipeline_class: str = TEXT_TO_IMAGE):
    """``load_pipeline`` from a recipe's ``GeneratorConfig``."""
    return load_pipeline(
        cfg.model,
        revision=cfg.revision,
        dtype=cfg.dtype,
        device=device,
        scheduler=cfg.scheduler,
        safety_checker=cfg.safety_checker,
        pipeline_class=pipeline_class,
        strategy=cfg.strategy,
    )
