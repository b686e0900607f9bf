"""Making the prompts of the two prompt-first strategies (paper 3.1, B.1 and B.3), one class at a time.

* ``language_model_prompts``: N prompts for a class from a language model, top-p/top-k sampling or beam
  search (paper B.1: p 0.95, k 50; 4 x N beams; up to 60 new tokens). Seeded from the recipe seed and the
  class index, so a class's prompts do not depend on its neighbours, the worker or a resume.
* ``caption_images``: one greedy caption per real image (paper B.3), in fixed batches.

Outputs are whitespace-normalised (runs of spaces/newlines -> one space, trimmed).  An empty output is
never a prompt -- it would make an unconditional image labelled as the class -- so sampling draws
further sequences from the same seeded stream, beam search takes the next-ranked beam, and an empty
caption is dropped (recorded); nothing else is filtered: the paper kept prompts without the class name
and duplicates (unlike He et al.'s CLIP filter), so do we.
"""

from __future__ import annotations

import hashlib

import torch

# sampled sequences per generate() call (min(this, N)); it decides how the seeded stream is consumed,
# so it is recorded in each prompts file's settings
SEQUENCES_PER_CALL = 50
# sampling draws at most this many times N sequences (+ one call) before giving up on empty outputs
MAX_DRAWS_PER_PROMPT = 4


def prompt_seed(recipe_seed: int, class_index: int) -> int:
    """A stable 31-bit seed per class for its language-model prompts."""
    digest = hashlib.blake2b(f"fillup/prompts/{recipe_seed}/{class_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def normalize(text: str) -> str:
    return " ".join(text.split())


def language_model_settings(cfg) -> dict:
    """What decides a class's prompts besides the model, seed and device: recorded in the file."""
    settings = cfg.model_dump(mode="json", exclude={"model", "revision"})
    if cfg.decoding == "beam":
        settings["num_beams"] = cfg.num_beams or 4 * cfg.num_prompts  # paper B.1: 4 x n beams for n prompts
    else:
        settings["sequences_per_call"] = min(SEQUENCES_PER_CALL, cfg.num_prompts)
    return settings


def _rng_devices(device: str) -> list:
    return [torch.device(device)] if str(device).startswith("cuda") else []


@torch.no_grad()
def language_model_prompts(lm, cfg, class_name: str, seed: int) -> tuple[list[str], int]:
    """``cfg.num_prompts`` non-empty prompts for ``class_name`` and how many empty outputs were passed over."""
    from fillup_data.errors import FillupError

    n = cfg.num_prompts
    settings = language_model_settings(cfg)
    text = cfg.input.replace("{class_name}", class_name)
    enc = lm.tokenizer([text], return_tensors="pt").to(lm.device)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    common = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, temperature=1.0)

    def decode(sequences) -> list[str]:
        # seq2seq: the decoder's output is the answer; causal: generate() returns the input with its
        # continuation, and that whole text is the prompt (a prompt extender extends the class name)
        return [normalize(t) for t in tok.batch_decode(sequences, skip_special_tokens=True)]

    prompts: list[str] = []
    empty = 0

    def take(texts: list[str]) -> None:
        """Keep non-empty texts in order until there are n; count the empty ones passed over."""
        nonlocal empty
        for t in texts:
            if len(prompts) == n:
                return
            if t:
                prompts.append(t)
            else:
                empty += 1

    with torch.random.fork_rng(devices=_rng_devices(lm.device)):
        torch.manual_seed(seed)
        if cfg.decoding == "beam":
            beams = settings["num_beams"]
            out = lm.model.generate(**enc, do_sample=False, num_beams=beams, num_return_sequences=beams, **common)
            take(decode(out))  # best beam first
        else:
            per_call = settings["sequences_per_call"]
            drawn = 0
            while len(prompts) < n and drawn < MAX_DRAWS_PER_PROMPT * n + per_call:
                out = lm.model.generate(**enc, do_sample=True, top_p=cfg.top_p, top_k=cfg.top_k, num_beams=1,
                                        num_return_sequences=per_call, **common)
                drawn += per_call
                take(decode(out))
    if len(prompts) < n:
        raise FillupError(f"generator.language_model: {cfg.model!r} gave {empty} empty outputs for class "
                          f"{class_name!r} and only {len(prompts)} of the {n} prompts asked for; check "
                          "generator.language_model.input (the model's expected input format) or lower num_prompts")
    return prompts, empty


def captioner_settings(cfg) -> dict:
    return cfg.model_dump(mode="json", exclude={"model", "revision", "template"}) | {"decoding": "greedy"}


@torch.no_grad()
def caption_images(captioner, cfg, images: list) -> list[str]:
    """One greedy caption per image (paper B.3: "a default greedy decoding method"), in batches of
    ``cfg.batch_size``; whitespace-normalised, "" where the model said nothing."""
    captions: list[str] = []
    dtype = captioner.model.dtype
    for start in range(0, len(images), cfg.batch_size):
        batch = [im.convert("RGB") for im in images[start : start + cfg.batch_size]]
        inputs = captioner.processor(images=batch, return_tensors="pt").to(captioner.device)
        inputs = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
        out = captioner.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=cfg.max_new_tokens)
        captions += [normalize(t) for t in captioner.processor.batch_decode(out, skip_special_tokens=True)]
    return captions
