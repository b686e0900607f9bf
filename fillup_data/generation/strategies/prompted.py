"""Strategies that generate from prompts the build made first and stored in ``prompts/`` (the prompts
stage, ``stages.prompts``), used evenly per class: sample k of a class takes entry ``k mod n``.

* ``lm_prompts`` (paper 3.1 "Prompt-to-image", B.1): a language model's N prompts per class.
* ``captions`` (paper 3.1 "Transmodal", B.3): one caption per real training image; the sample records
  the real image whose caption it used (``source_key``), and its prompt is ``generator.captioner.template``
  with that caption (default ``{caption}``: the caption as is, as in the paper).

Both encode the recorded prompt with the pipeline's text encoder (the base class), so ``regenerate``
needs only a sample's metadata.
"""

from __future__ import annotations

from fillup_data.errors import FillupError
from fillup_data.generation.prompt_files import ClassPrompts, prompt_file_path
from fillup_data.generation.strategies import Condition, Strategy


class _StoredPrompts(Strategy):
    prepares = True

    def __init__(self, cfg, class_names, context=None):
        super().__init__(cfg, class_names, context)
        self._stored: dict[int, ClassPrompts] = {}

    def stored(self, class_index: int) -> ClassPrompts:
        """The class's prompts file (read once per worker)."""
        if class_index not in self._stored:
            if self.context.out is None:
                raise FillupError(f"generator.strategy {self.name}: no build folder to read prompts/ from")
            self.class_name(class_index)  # in range
            self._stored[class_index] = ClassPrompts.read(prompt_file_path(self.context.out, class_index),
                                                          class_index, self.name)
        return self._stored[class_index]


class LanguageModelPrompts(_StoredPrompts):
    name = "lm_prompts"

    def condition(self, spec) -> Condition:
        return Condition(self.evenly(self.stored(spec.class_index).prompts, spec.ordinal))


class Captions(_StoredPrompts):
    name = "captions"

    def condition(self, spec) -> Condition:
        entry = self.evenly(self.stored(spec.class_index).prompts, spec.ordinal)
        template = self.cfg.captioner.template.replace("{class_name}", self.class_name(spec.class_index))
        return Condition(template.replace("{caption}", entry["caption"]), entry["source_key"])
