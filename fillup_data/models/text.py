"""Prompt tokenization with placeholder tokens whose vectors are supplied per sample.

Textual Inversion tokens never enter the vocabulary here. A prompt like "a photo of a {token}"
is tokenized with ``num_vectors`` placeholder positions, and a forward hook on the text
encoder's input embedding writes each sample's vectors at those positions. For the text encoder
this is the same computation as prompting with a token added by ``load_textual_inversion``
(only the input embeddings at those positions differ from the base vocabulary), but:

* training touches no row of the embedding matrix, so every base row stays bit-identical with
  no "restore after each step" (the workaround the diffusers example needs);
* one batch can carry many classes and checkpoints (ImageNet-LT would otherwise add
  1000 classes x 100 checkpoints x 4 vectors rows to the vocabulary).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fillup_data.errors import FillupError

MARKER = "{token}"


@dataclass
class PlaceholderPrompt:
    """Token ids of one prompt and the positions its placeholder vectors go to."""

    input_ids: list[int]
    positions: list[int]


def encode_placeholder_prompt(tokenizer, text: str, num_vectors: int) -> PlaceholderPrompt:
    """Tokenize ``text`` where each ``{token}`` stands for ``num_vectors`` learned vectors.

    The pieces around the marker are tokenized separately, exactly as a tokenizer splits text
    around an added token (diffusers expands ``<tok>`` to ``<tok> <tok>_1 ...``, each an added
    token, in ``maybe_convert_prompt``).
    """
    pieces = text.split(MARKER)
    max_len = tokenizer.model_max_length
    ids: list[int] = [tokenizer.bos_token_id]
    positions: list[int] = []
    # a harmless stand-in id at placeholder positions (its embedding is overwritten by the hook)
    stand_in = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
        if i < len(pieces) - 1:
            positions.extend(range(len(ids), len(ids) + num_vectors))
            ids.extend([stand_in] * num_vectors)
    ids.append(tokenizer.eos_token_id)
    if len(ids) > max_len:
        if positions and positions[-1] >= max_len - 1:
            raise FillupError(
                f"prompt {text!r} is too long: its placeholder token would be cut off at "
                f"{max_len} tokens; shorten generator.prompt"
            )
        ids = ids[: max_len - 1] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = ids + [pad] * (max_len - len(ids))
    return PlaceholderPrompt(ids, positions)


def encode_plain_prompt(tokenizer, text: str) -> PlaceholderPrompt:
    """A prompt without placeholders (single_template strategy), padded like the pipeline pads."""
    ids = tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    return PlaceholderPrompt(list(ids), [])


@contextlib.contextmanager
def placeholder_vectors(text_encoder, prompts: list[PlaceholderPrompt], vectors: list[torch.Tensor | None]):
    """While active, the text encoder's input embedding returns ``vectors[i]`` (``[n, dim]``,
    may require grad) at ``prompts[i].positions``; the embedding matrix itself is never modified."""
    embedding = text_encoder.get_input_embeddings()
    rows: list[int] = []
    cols: list[int] = []
    values: list[torch.Tensor] = []
    for i, (p, v) in enumerate(zip(prompts, vectors)):
        if not p.positions:
            continue
        if v is None or v.shape[0] != len(p.positions):
            raise FillupError(
                f"placeholder vectors for prompt {i} have shape {None if v is None else tuple(v.shape)}; "
                f"expected [{len(p.positions)}, dim]"
            )
        rows.extend([i] * len(p.positions))
        cols.extend(p.positions)
        values.append(v)

    def hook(module, args, output):
        if not values:
            return output
        out = output.clone()
        stacked = torch.cat([v.to(device=out.device, dtype=out.dtype) for v in values], dim=0)
        out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = stacked
        return out

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_text(text_encoder, prompts: list[PlaceholderPrompt], vectors: list[torch.Tensor | None], device) -> torch.Tensor:
    """Last hidden states ``[B, L, dim]`` (what Stable Diffusion conditions on)."""
    input_ids = torch.tensor([p.input_ids for p in prompts], dtype=torch.long, device=device)
    with placeholder_vectors(text_encoder, prompts, vectors):
        return text_encoder(input_ids)[0]
