"""Loading the models that write prompts: a language model (``lm_prompts``) and an image-to-text
captioner (``captions``), by hub id, local folder or ``builtin:tiny-*`` alias, the way a user with
network access would: ``AutoConfig`` first (to pick the class and to refuse a model of the wrong kind
before any weights load), then ``from_pretrained(path_or_id, revision=...)``.  Never
``trust_remote_code``: a model that needs its own code is refused with a message saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fillup_data.errors import FillupError

LANGUAGE_MODEL_FIELD = "generator.language_model.model"
CAPTIONER_FIELD = "generator.captioner.model"
# captioners whose processor captions an image with no text prompt (paper B.3: BLIP-2, greedy)
CAPTIONER_TYPES = ("blip", "blip-2")


@dataclass
class LanguageModel:
    model: object
    tokenizer: object
    kind: str  # "seq2seq" (T5, Flan-T5: answers the input) or "causal" (GPT-2: continues it)
    device: str
    dtype: str


@dataclass
class Captioner:
    model: object
    processor: object
    device: str
    dtype: str


def resolve_prompt_model(model: str, field: str) -> str:
    """``builtin:tiny-*`` -> its cached folder (built once); anything else unchanged."""
    if not model.startswith("builtin:"):
        return model
    from fillup_data.models.pipeline import cache_dir
    from fillup_data.models.tiny_prompt_models import TINY_PROMPT_MODELS, tiny_prompt_model_folder

    if model not in TINY_PROMPT_MODELS:
        raise FillupError(f"{field}: unknown built-in model {model!r}; available: {', '.join(sorted(TINY_PROMPT_MODELS))}")
    return str(tiny_prompt_model_folder(model, cache_dir()))


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":  # bfloat16, not float16, on CUDA: T5-family activations overflow float16
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _load_error(field: str, model: str, revision: str | None, err: Exception, what: str) -> FillupError:
    offline = " (HF_HUB_OFFLINE is set: only cached models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
    remote = (" fillup-data never runs a model's own code (trust_remote_code is off)."
              if "trust_remote_code" in str(err) else "")
    return FillupError(f"{field}: cannot load {model!r} (revision {revision or 'default'}){offline}: {_one_line(err)}."
                       f"{remote} Give the hub id or local folder (save_pretrained layout) of {what}.")


def _config(field: str, model: str, revision: str | None, what: str):
    from transformers import AutoConfig

    path = resolve_prompt_model(model, field)
    try:
        return path, AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(field, model, revision, err, what) from None


def _describe(config) -> str:
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    return f"a {config.model_type!r} model ({archs})"


def load_language_model(cfg, device: str) -> LanguageModel:
    """``cfg``: the recipe's ``generator.language_model``. The class comes from the config: an
    encoder-decoder with a seq2seq head loads as ``AutoModelForSeq2SeqLM``, a decoder with a causal
    LM head as ``AutoModelForCausalLM``; anything else (a captioner, a vision model) is refused."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    what = "a text-generation (GPT-style) or seq2seq (T5-style) language model"
    path, config = _config(LANGUAGE_MODEL_FIELD, cfg.model, cfg.revision, what)
    if getattr(config, "is_encoder_decoder", False) and config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        kind, auto = "seq2seq", AutoModelForSeq2SeqLM
    elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind, auto = "causal", AutoModelForCausalLM
    else:
        raise FillupError(f"{LANGUAGE_MODEL_FIELD}: {cfg.model!r} is {_describe(config)}, not {what}; an image "
                          "captioner goes in generator.captioner (strategy captions)")
    dtype = _torch_dtype(cfg.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision)
        model = auto.from_pretrained(path, revision=cfg.revision, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(LANGUAGE_MODEL_FIELD, cfg.model, cfg.revision, err, what) from None
    model.to(device).eval()
    return LanguageModel(model, tokenizer, kind, str(device), str(dtype).removeprefix("torch."))


def load_captioner(cfg, device: str) -> Captioner:
    """``cfg``: the recipe's ``generator.captioner``: a BLIP or BLIP-2 model (``AutoModelForImageTextToText``
    picks ``BlipForConditionalGeneration`` / ``Blip2ForConditionalGeneration`` from the config's
    model_type) with its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    what = f"an image captioning model ({' or '.join(CAPTIONER_TYPES)}, e.g. Salesforce/blip2-opt-6.7b)"
    path, config = _config(CAPTIONER_FIELD, cfg.model, cfg.revision, what)
    if config.model_type not in CAPTIONER_TYPES:
        hint = ("; a language model goes in generator.language_model (strategy lm_prompts)"
                if getattr(config, "is_encoder_decoder", False) or "CausalLM" in _describe(config) else "")
        raise FillupError(f"{CAPTIONER_FIELD}: {cfg.model!r} is {_describe(config)}, not {what}{hint}")
    dtype = _torch_dtype(cfg.dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(path, revision=cfg.revision)
        model = AutoModelForImageTextToText.from_pretrained(path, revision=cfg.revision, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(CAPTIONER_FIELD, cfg.model, cfg.revision, err, what) from None
    model.to(device).eval()
    return Captioner(model, processor, str(device), str(dtype).removeprefix("torch."))
