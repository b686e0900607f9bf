"""Recipe schema, loading, overrides and fingerprint.

A recipe is YAML validated by pydantic: unknown keys, wrong types and out-of-range values are
errors that name the field path, the bad value and what is allowed.  Data and model paths
(``ENV_FIELDS``) may use ``${VAR}`` or ``${VAR:-default}``; ``--set key.path=value`` overrides any
field (the value is parsed as a YAML scalar, so numbers and booleans keep their types).  A recipe
stored in a manifest is already resolved: ``parse_stored_recipe`` reads it back verbatim.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fillup_data import __version__
from fillup_data.errors import RecipeError
from fillup_data.schema.groups import DEFAULT_FEW_BELOW, DEFAULT_MANY_ABOVE
from fillup_data.schema.sample import SCHEMA_VERSION


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- sources
class _SourceCommon(_Strict):
    imbalance_factor: float | None = Field(
        None, ge=1.0, description="CIFAR-LT construction: n_i = floor(n_max * (1/IF)^(i/(C-1)))"
    )
    imbalance_max: int | None = Field(
        None, ge=1, description="n_max for the CIFAR-LT construction (default: the smallest class)"
    )


class SplitFileSource(_SourceCommon):
    """ImageNet-LT / Places-LT / iNaturalist-2018 list files: ``relative/path.jpg label``."""

    kind: Literal["split_file"]
    root: str
    train: str
    test: str | None = None
    class_names: str | None = None


class ImageFolderSource(_SourceCommon):
    """One folder per class, class index = sorted folder order (torchvision ImageFolder)."""

    kind: Literal["image_folder"]
    root: str
    train: str = "train"
    test: str | None = None


class HFDatasetSource(_SourceCommon):
    """A ``datasets`` dataset by local path or hub id."""

    kind: Literal["hf_dataset"]
    path: str
    name: str | None = None
    revision: str | None = None
    train_split: str = "train"
    test_split: str | None = None
    image_column: str = "image"
    label_column: str = "label"


class DemoSource(_SourceCommon):
    """The embedded procedural long-tailed world (no downloads)."""

    kind: Literal["demo"]
    num_classes: int = Field(10, ge=10, le=48)
    max_images: int = Field(100, ge=2)
    min_images: int = Field(5, ge=1)
    test_per_class: int = Field(20, ge=0)
    image_size: int = Field(32, ge=16, le=512)
    # the harder backgrounds of fillup_data.demo.world (more background colours, stronger textures, small
    # distractor shapes): the miniature experiment's, so that many-shot classes are not solved outright
    hard_backgrounds: bool = False
    # the classes by name ("red circle": colour, then shape), most images first; default: the world's first
    # num_classes pairs, spread so that neighbours differ in both shape and colour. The miniature names
    # confusable ones (near colours, near shapes) among its head classes.
    classes: list[str] | None = None

    @model_validator(mode="after")
    def _check_range(self) -> "DemoSource":
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) must be <= max_images ({self.max_images})")
        return self

    @model_validator(mode="after")
    def _check_classes(self) -> "DemoSource":
        if self.classes is not None:
            from fillup_data.demo.world import parse_class_name  # the world's names (imported only when used)

            seen = {}
            for i, name in enumerate(self.classes):
                try:
                    pair = parse_class_name(name)
                except ValueError as e:
                    raise ValueError(f"classes[{i}]: {e}") from None
                if pair in seen:
                    raise ValueError(f"classes[{i}]: {name!r} is already classes[{seen[pair]}]")
                seen[pair] = i
            if "num_classes" in self.model_fields_set and self.num_classes != len(self.classes):
                raise ValueError(f"num_classes ({self.num_classes}) differs from the {len(self.classes)} names in classes; "
                                 "give one of them")
            if not 10 <= len(self.classes) <= 48:
                raise ValueError(f"classes: {len(self.classes)} names; the demo source takes 10 to 48")
            if self.num_classes != len(self.classes):
                self.num_classes = len(self.classes)  # (assignment validates the model again: only once)
        return self


SourceConfig = Annotated[
    Union[SplitFileSource, ImageFolderSource, HFDatasetSource, DemoSource], Field(discriminator="kind")
]


# --------------------------------------------------------------------------- the rest
class FillConfig(_Strict):
    policy: Literal["fill_to", "addon", "fill_to_max"] = "fill_to"
    target: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _target_needed(self) -> "FillConfig":
        if self.policy in ("fill_to", "addon") and self.target is None:
            raise ValueError(f"policy {self.policy!r} needs 'target' (an image count)")
        if self.policy == "fill_to_max" and self.target is not None:
            raise ValueError("policy 'fill_to_max' takes no 'target' (it fills to the largest class)")
        return self


class GroupsConfig(_Strict):
    """Many/medium/few thresholds on real training counts (paper 4.2: >100, 20-100, <20)."""

    many_above: int = Field(DEFAULT_MANY_ABOVE, ge=0)
    few_below: int = Field(DEFAULT_FEW_BELOW, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "GroupsConfig":
        if self.few_below > self.many_above + 1:
            raise ValueError(f"few_below ({self.few_below}) must be <= many_above + 1 ({self.many_above + 1})")
        return self


# textual_inversion puts the class's learned token at {token} ({class_name} may add the name);
# single_template puts the class name at either (paper baseline "a photo of a {CLS}"); none draws nothing.
# The other strategies take their prompts elsewhere (templates, a language model, captions, real images).
PROMPT_NEEDS = {"textual_inversion": ("{token}",), "single_template": ("{token}", "{class_name}")}

# generator.strategy values (fillup_data.generation.strategies.REGISTRY holds their classes)
StrategyName = Literal["none", "single_template", "clip_templates", "textual_inversion",
                       "lm_prompts", "captions", "image_variation", "reimagine"]

# image-to-image strategies (paper 3.1, B.2): what a generator section that leaves a field out gets
# instead of the text-to-image defaults (the paper's model, guidance and resolution; no prompt)
IMAGE_STRATEGY_DEFAULTS = {
    "image_variation": {"model": "lambdalabs/sd-image-variations-diffusers", "guidance_scale": 3.0, "prompt": "",
                        "resolution": 512},
    "reimagine": {"model": "stabilityai/stable-diffusion-2-1-unclip", "guidance_scale": 10.0, "prompt": "",
                  "resolution": 768},
}


def _auto_or_positive(v):
    if v != "auto" and v < 1:
        raise ValueError("must be auto or a positive integer")
    return v


# a size resolved on the worker (``auto``) or given as a positive integer
AutoOrPositive = Annotated[Union[int, Literal["auto"]], AfterValidator(_auto_or_positive)]


class LanguageModelConfig(_Strict):
    """``lm_prompts`` (paper 3.1, B.1): a transformers language model that writes the prompts of a class,
    N per class, once per build (stored in ``prompts/``). T5-style (seq2seq) models answer ``input``;
    GPT-style (causal) ones continue it, and the prompt is the input with its continuation."""

    model: str  # hub id, local folder (save_pretrained layout) or builtin:tiny-t5 / builtin:tiny-gpt2
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    # what the model is given; e.g. Flan-Alpaca (paper B.1): "Generate a prompt-style sentence for image
    # generation including {class_name}"
    input: str = "{class_name}"
    num_prompts: int = Field(50, ge=1, le=100_000)
    # paper B.1 / table A7: top-p sampling (p 0.95, k 50) beat beam search (4 x n beams for n prompts)
    decoding: Literal["sample", "beam"] = "sample"
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    num_beams: int | None = Field(None, ge=1)  # beam: default 4 x num_prompts (paper B.1)
    max_new_tokens: int = Field(60, ge=1, le=4096)  # paper B.1: "a sentence up to 60 tokens long"

    @field_validator("input")
    @classmethod
    def _input_has_class_name(cls, text: str) -> str:
        if "{class_name}" not in text:
            raise ValueError(f"{text!r} must contain {{class_name}} (where the class name goes)")
        return text

    @model_validator(mode="after")
    def _checks(self) -> "LanguageModelConfig":
        if self.decoding == "beam" and self.num_beams is not None and self.num_beams < self.num_prompts:
            raise ValueError(f"num_beams ({self.num_beams}) must be >= num_prompts ({self.num_prompts}): beam search "
                             "returns at most one prompt per beam")
        return self


class CaptionerConfig(_Strict):
    """``captions`` (paper 3.1 "Transmodal", B.3): an image-to-text model captions every real training
    image of a class once, greedily; the captions are stored in ``prompts/`` and used evenly."""

    model: str  # hub id, local folder or builtin:tiny-blip (BLIP, BLIP-2 or another image-text-to-text model)
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    max_new_tokens: int = Field(30, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)  # images per captioning call (recorded: batching may change a caption)
    # the generation prompt made of a caption; the paper uses the caption as is
    template: str = "{caption}"

    @field_validator("template")
    @classmethod
    def _template_has_caption(cls, template: str) -> str:
        if "{caption}" not in template:
            raise ValueError(f"{template!r} must contain {{caption}} (where the caption goes)")
        return template


class GeneratorConfig(_Strict):
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    strategy: StrategyName = "textual_inversion"
    prompt: str = "a photo of a {token}"
    # clip_templates: the prompt templates, each with {class_name}; default (null): the 80 of the paper's
    # figure A9, used evenly per class
    templates: list[str] | None = None
    guidance_scale: float = Field(1.0, ge=0.0)
    num_inference_steps: int = Field(50, ge=1, le=1000)
    scheduler: Literal["ddim", "dpmpp_2m", "euler"] = "ddim"
    eta: float = Field(0.0, ge=0.0, le=1.0)
    resolution: int = Field(512, ge=8)
    # micro-batch rows per pipeline pass; it decides pixels (kernels differ by shape), so it is
    # recorded. auto: from free GPU memory on CUDA (pinned once per build), 8 on CPU
    batch_size: AutoOrPositive = "auto"
    # torch.compile of the UNet and the VAE decode; auto = on for CUDA, off on CPU
    compile: Union[bool, Literal["auto"]] = "auto"
    safety_checker: bool = False
    max_retries: int = Field(5, ge=0)
    # lm_prompts: the language model that writes each class's prompts (required by, and only for, lm_prompts)
    language_model: LanguageModelConfig | None = None
    # captions: the image-to-text model that captions the real images (required by, and only for, captions)
    captioner: CaptionerConfig | None = None
    # reimagine: noise added to the CLIP image embedding (unCLIP's noise_level, 0..999; paper: 0)
    noise_level: int = Field(0, ge=0, le=999)

    @model_validator(mode="before")
    @classmethod
    def _image_strategy_defaults(cls, data):
        if isinstance(data, dict) and data.get("strategy") in IMAGE_STRATEGY_DEFAULTS:
            data = {**IMAGE_STRATEGY_DEFAULTS[data["strategy"]], **data}
        return data

    @field_validator("noise_level")
    @classmethod
    def _noise_level_is_reimagines(cls, noise_level: int, info: ValidationInfo) -> int:
        strategy = info.data.get("strategy")
        if noise_level and strategy != "reimagine":
            raise ValueError(f"only used by strategy reimagine, not {strategy!r} (leave it out)")
        return noise_level

    @field_validator("prompt")
    @classmethod
    def _image_strategy_prompt(cls, prompt: str, info: ValidationInfo) -> str:
        strategy = info.data.get("strategy")
        if strategy == "image_variation" and prompt:
            raise ValueError("strategy image_variation is conditioned on the source image alone and takes no "
                             "prompt; leave it out or set it to ''")
        if strategy == "reimagine" and "{token}" in prompt:
            raise ValueError("strategy reimagine has no learned token; use {class_name}, a fixed text, or '' "
                             "(the paper's: no prompt)")
        return prompt


    @model_validator(mode="after")
    def _checks(self) -> "GeneratorConfig":
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.templates is not None:
            if self.strategy != "clip_templates":
                raise ValueError(f"templates: only used by strategy clip_templates, not {self.strategy!r}")
            if not self.templates:
                raise ValueError("templates: an empty list (leave it out for the paper's 80 templates)")
            for i, t in enumerate(self.templates):
                if "{class_name}" not in t:
                    raise ValueError(f"templates[{i}]: {t!r} must contain {{class_name}} (where the class name goes)")
        for name, strategy in (("language_model", "lm_prompts"), ("captioner", "captions")):
            given = getattr(self, name) is not None
            if given and self.strategy != strategy:
                raise ValueError(f"{name}: only used by strategy {strategy}, not {self.strategy!r}")
            if not given and self.strategy == strategy:
                raise ValueError(f"strategy {strategy} needs generator.{name} (at least its model: a hub id or "
                                 "folder)")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt_has_placeholder(cls, prompt: str, info: ValidationInfo) -> str:
        strategy = info.data.get("strategy")  # absent when the strategy itself is invalid
        needed = PROMPT_NEEDS.get(strategy, ())
        if needed and not any(p in prompt for p in needed):
            where = "the class's learned token" if strategy == "textual_inversion" else "the class name"
            raise ValueError(f"must contain {' or '.join(needed)} for strategy {strategy!r} (where {where} goes)")
        return prompt


class InversionConfig(_Strict):
    """Textual Inversion settings; defaults are the paper's (appendix B.3)."""

    num_vectors: int = Field(4, ge=1, le=75)
    init_word: str = "object"
    learning_rate: float = Field(5.0e-3, gt=0)
    scale_lr: bool = False
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(2, ge=1)
    steps_per_image: int = Field(100, ge=1)
    min_steps: int = Field(2000, ge=1)
    max_steps: int = Field(10000, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    flip: bool = True
    resolution: int | None = Field(None, ge=8)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    classes_per_pass: AutoOrPositive = Field(
        "auto", description="slots of the joint UNet pass (each class keeps its own batch and optimizer); a class "
        "that finishes leaves its slot to the next. auto: from free GPU memory on CUDA (pinned once per build), "
        "1 on CPU"
    )
    classes_per_task: AutoOrPositive = Field(
        "auto", description="classes per inversion task (the unit a worker claims). auto: tasks of about 64 "
        "classes with equal class-steps, as many as a multiple of 8 when there are enough classes, so that "
        "`--gpus N` is not held up by one long task; an integer: fixed slices of the plan's class order"
    )
    compile: Union[bool, Literal["auto"]] = "auto"  # torch.compile of the UNet; auto = on for CUDA
    # keep every pass K classes wide (empty slots padded) so a class's token bytes never depend on its
    # neighbours, a resume or the timing, and a compiled UNet sees one shape; auto = on when compiled
    # (eager passes shrink as classes finish: no compute spent on padding, exact only to float rounding)
    pad_passes: Union[bool, Literal["auto"]] = "auto"


    @model_validator(mode="after")
    def _checks(self) -> "InversionConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must be <= max_steps ({self.max_steps})")
        if self.checkpoint_every > self.min_steps:
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be <= min_steps ({self.min_steps})"
            )
        return self

    def steps_for(self, n_images: int) -> int:
        """Paper B.3: steps = min(max(100 * n_images, 2000), 10000)."""
        return min(max(self.steps_per_image * n_images, self.min_steps), self.max_steps)

    def checkpoint_steps(self, n_images: int) -> list[int]:
        """Every ``checkpoint_every`` steps, and always the final step."""
        total = self.steps_for(n_images)
        steps = list(range(self.checkpoint_every, total + 1, self.checkpoint_every))
        if not steps or steps[-1] != total:
            steps.append(total)
        return steps


class ShardsConfig(_Strict):
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = Field(95, ge=1, le=100)
    max_samples: int = Field(10000, ge=1)
    resize_short_side: int | None = Field(None, ge=8)
    num_shards_multiple_of: AutoOrPositive = Field(
        "auto", description="make each split's shard count a multiple of this, so that ranks x workers divide it "
        "(datasets' split_dataset_by_node shares shards only then). auto: 64 where shards stay at least half "
        "max_samples, else 8 on the same condition, else 1 (recorded in the manifest)"
    )


class PublishConfig(_Strict):
    include_real: bool = False
    license: str = "other"
    source_terms: str = ""
    repo: str | None = None
    # None = not said: publish makes the repo private unless --public (a false here is a choice)
    private: bool | None = None


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?$")
    parent_version: str | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    source: SourceConfig
    fill: FillConfig = FillConfig(policy="fill_to_max")
    groups: GroupsConfig = GroupsConfig()
    generator: GeneratorConfig = GeneratorConfig()
    inversion: InversionConfig = InversionConfig()
    shards: ShardsConfig = ShardsConfig()
    publish: PublishConfig = PublishConfig()

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Where ``${VAR}`` is expanded: where the data and the model live, which differs between machines.
# Anywhere else (a prompt, a card's license, a repo name) a variable would copy the environment
# into every sample, the manifest and the card, so it is an error there.
ENV_FIELDS = ("source.root", "source.train", "source.test", "source.class_names", "source.path", "generator.model",
              "generator.language_model.model", "generator.captioner.model")
# Variables whose names look like credentials are never expanded, wherever they appear.
_SECRET_WORDS = ("TOKEN", "SECRET", "KEY", "PASSWORD", "PASSWD", "CREDENTIAL")


def expand_env(value: Any, path: str, fields: tuple[str, ...] | None = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in the string fields named by ``fields`` (dotted
    paths; ``None``: every field) and refuse it elsewhere; secret-looking names are refused everywhere."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{path}.{k}" if path else str(k), fields) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", fields) for i, v in enumerate(value)]
    if not isinstance(value, str) or not _ENV.search(value):
        return value
    for m in _ENV.finditer(value):
        if any(word in m.group(1).upper() for word in _SECRET_WORDS):
            raise RecipeError(
                f"{path}: ${{{m.group(1)}}} looks like a secret ({'/'.join(_SECRET_WORDS)} in the name) and is "
                "not expanded: recipes end up in manifests and dataset cards; write a plain path, or rename the variable"
            )
    if fields is not None and path not in fields:
        raise RecipeError(
            f"{path}: ${{{_ENV.search(value).group(1)}}} is not expanded here; environment variables are "
            f"expanded only in {', '.join(fields)} (write the value itself)"
        )

    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise RecipeError(
            f"{path}: environment variable {name} is not set (export {name}=... "
            f"or write ${{{name}:-default}})"
        )

    return _ENV.sub(repl, value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are YAML scalars (``1e-3``, ``true``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = [f"{where}: the recipe is not valid:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _KIND_TAGS))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; docs/recipes.md lists every field)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown source kind; allowed: {', '.join(sorted(_KIND_TAGS))}"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        lines.append(f"  - {loc or '<top>'}: {msg}{shown}")
    return "\n".join(lines)


_KIND_TAGS = {"split_file", "image_folder", "hf_dataset", "demo"}


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """A recipe as the user wrote it: ``${VAR}`` expanded in ``ENV_FIELDS``, then validated."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping, got {type(data).__name__}")
    return _validate(expand_env(data, "", ENV_FIELDS), where)


def parse_stored_recipe(data: Any, where: str = "stored recipe") -> Recipe:
    """A resolved recipe read back from a manifest or build state: validated, never expanded again
    (a path that holds a literal ``${...}`` stays as it was built)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the stored recipe is not a mapping ({type(data).__name__})")
    return _validate(data, where)


def _validate(data: dict, where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, where)) from None


# A recipe is a few hundred values. YAML aliases may share a value ("&defaults" / "*defaults"), but
# nested aliases multiply ("billion laughs": 9 levels of 9 aliases are 10^9 values from 1 KB), so the
# document's size with every alias expanded is bounded before anything is built from it.
MAX_YAML_VALUES = 10_000


class _YAMLTooLarge(Exception):
    pass


def _load_yaml_bounded(text: str, p: Path) -> Any:
    """``yaml.safe_load``, refusing documents whose aliases expand past ``MAX_YAML_VALUES`` or refer to themselves."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, {}, set(), p)
        except RecursionError:
            raise _YAMLTooLarge(f"{p}: YAML nested too deeply to be a recipe") from None
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], p: Path) -> int:
    """Values in ``node`` counting every alias as a copy; each distinct node is visited once."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _YAMLTooLarge(f"{p}:{node.start_mark.line + 1}: a YAML alias refers to a value that contains it")
    open_nodes.add(id(node))
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_nodes, p)
        if total > MAX_YAML_VALUES:
            raise _YAMLTooLarge(
                f"{p}: with its aliases (*name) expanded the YAML holds more than {MAX_YAML_VALUES:,} values "
                "(nested aliases multiply: an alias bomb?); a recipe needs a few hundred, write them out"
            )
    open_nodes.discard(id(node))
    sizes[id(node)] = total
    return total


def read_yaml_mapping(path: str | os.PathLike, what: str, overrides: list[str] | None = None,
                      error: type[Exception] = RecipeError) -> dict[str, Any]:
    """Read a YAML recipe file (build or train) and apply ``--set`` overrides; errors name file:line."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such {what} file")
    try:
        data = _load_yaml_bounded(p.read_text(encoding="utf-8"), p)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{p}{line}: not valid YAML: {getattr(err, 'problem', err)}") from None
    except _YAMLTooLarge as err:
        raise error(str(err)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{p}: a {what} is a YAML mapping, got {type(data).__name__}")
    if overrides:
        try:
            data = apply_overrides(data, list(overrides))
        except RecipeError as err:
            raise error(str(err)) from None
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    return parse_recipe(read_yaml_mapping(path, "recipe", overrides), str(path))


# Fields that do not change the bytes a build produces stay out of the fingerprint, so a build
# moved to another data root or published elsewhere keeps its identity.
_NOT_FINGERPRINTED = (("source", "root"), ("publish",))


def model_revision(recipe: Recipe) -> str:
    """What identifies the generator's weights: model id and revision ("" when nothing is generated)."""
    if recipe.generator.strategy == "none":
        return ""
    return f"{recipe.generator.model}@{recipe.generator.revision or 'main'}"


def fingerprint(recipe: Recipe, model_revision: str = "") -> str:
    """sha256 of the resolved recipe + package version + model revision (contract), and of the sample
    metadata's schema version: a new key changes every sample's bytes, so such a build is another build."""
    data = recipe.resolved()
    for path in _NOT_FINGERPRINTED:
        node = data
        for p in path[:-1]:
            node = node.get(p, {})
        node.pop(path[-1], None)
    blob = json.dumps(
        {"recipe": data, "package_version": __version__, "model_revision": model_revision,
         "sample_schema": SCHEMA_VERSION},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()
