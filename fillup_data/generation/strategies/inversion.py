"""``textual_inversion`` (paper 3.2, B.3): "a photo of a {token}" with the class's learned token at the
sample's checkpoint (the plan spreads the checkpoints evenly over a class's samples)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from fillup_data.errors import FillupError
from fillup_data.generation.strategies import Condition, Conditioning, Strategy
from fillup_data.inversion.token_file import TokenFile, read_token_file, token_name
from fillup_data.models.text import MARKER, encode_placeholder_prompt, encode_text

_TOKEN_CACHE_SIZE = 256  # token files kept in memory (100 checkpoints x 4 x 768 floats = 1.2 MB each)


class TextualInversion(Strategy):
    name = "textual_inversion"
    inverts = True

    def __init__(self, cfg, class_names, context=None):
        super().__init__(cfg, class_names, context)
        if not self.context.token_files:
            raise FillupError("generator.strategy textual_inversion needs token files (run the invert stage first)")
        if MARKER not in cfg.prompt:
            raise FillupError(f"generator.prompt {cfg.prompt!r} must contain {MARKER} for textual_inversion")
        self.token_files = {int(k): Path(v) for k, v in self.context.token_files.items()}
        self._tokens: OrderedDict[int, TokenFile] = OrderedDict()

    def token(self, class_index: int, dim: int) -> TokenFile:
        if class_index in self._tokens:
            self._tokens.move_to_end(class_index)
            return self._tokens[class_index]
        path = self.token_files.get(class_index)
        if path is None:
            raise FillupError(f"class {class_index}: no token file given (expected tokens/{class_index:05d}.safetensors)")
        token = read_token_file(path)
        if token.class_index != class_index:
            raise FillupError(f"{path}: holds the token of class {token.class_index}, not {class_index}")
        some = next(iter(token.checkpoints.values()))
        if some.shape[-1] != dim:
            raise FillupError(
                f"{path}: token vectors have dimension {some.shape[-1]} but the text encoder of "
                f"{self.cfg.model!r} has {dim}; the token was learned on another model ({token.model_id!r})"
            )
        self._tokens[class_index] = token
        if len(self._tokens) > _TOKEN_CACHE_SIZE:
            self._tokens.popitem(last=False)
        return token

    def condition(self, spec) -> Condition:
        name = self.class_name(spec.class_index)
        return Condition(self.cfg.prompt.replace(MARKER, token_name(spec.class_index)).replace("{class_name}", name))

    def encode(self, pipe, specs, conditions) -> Conditioning:
        dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        prompts, vectors = [], []
        for spec in specs:
            token = self.token(spec.class_index, dim)
            text = self.cfg.prompt.replace("{class_name}", self.class_name(spec.class_index))
            prompts.append(encode_placeholder_prompt(pipe.tokenizer, text, token.num_vectors))
            vectors.append(token.vectors(spec.token_step))
        return Conditioning(encode_text(pipe.text_encoder, prompts, vectors, pipe.unet.device))
