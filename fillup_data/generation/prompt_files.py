"""``OUT/prompts/NNNNN.json``: the prompts a build made for class NNNNN before generating from them
(``lm_prompts``: the language model's prompts; ``captions``: one caption per real training image).

Written once per class by the prompts stage (``stages.prompts``), atomically; read by the strategies
(``generation.strategies.prompted``) in every worker, so every sample of the class draws from the
same list. Part of the build's output: listed in the manifest and published with the shards.

    {"class_index": 17, "class_name": "...", "strategy": "lm_prompts", "model": "...", "revision": "main",
     "settings": {...}, "seed": 123, "device": "cpu:x86_64", "dtype": "float32",
     "prompts": ["...", ...]}                                       # lm_prompts
     "prompts": [{"source_key": "train-real-00017-000003", "caption": "..."}, ...]   # captions
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fillup_data.errors import FillupError

PROMPTS_DIR = "prompts"
PROMPT_STRATEGIES = ("lm_prompts", "captions")


def prompt_file_path(out: Path, class_index: int) -> Path:
    return Path(out) / PROMPTS_DIR / f"{class_index:05d}.json"


@dataclass
class ClassPrompts:
    """One class's stored prompts. ``prompts``: strings (lm_prompts) or ``{"source_key", "caption"}``
    dicts (captions), in the order samples use them (sample k takes entry k mod len)."""

    class_index: int
    class_name: str
    strategy: str
    model: str
    revision: str
    settings: dict
    prompts: list
    details: dict = field(default_factory=dict)  # seed, device, dtype, what was dropped and why

    def to_dict(self) -> dict:
        return {"class_index": self.class_index, "class_name": self.class_name, "strategy": self.strategy,
                "model": self.model, "revision": self.revision, "settings": self.settings, **self.details,
                "prompts": self.prompts}

    def write(self, path: Path) -> None:
        from fillup_data.state import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def read(cls, path: Path, class_index: int | None = None, strategy: str | None = None) -> "ClassPrompts":
        """The file at ``path``, checked: errors name the file and the field that is wrong."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise FillupError(f"{path}: missing; the prompts stage of the build writes it (relaunch the build "
                              "to finish it)") from None
        except (OSError, ValueError) as err:
            raise FillupError(f"{path}: unreadable prompts file ({err}); delete it and relaunch the build to "
                              "make it again") from None
        if not isinstance(data, dict):
            raise FillupError(f"{path}: not a JSON object; delete it and relaunch the build")
        for key, kind in (("class_index", int), ("class_name", str), ("strategy", str), ("model", str),
                          ("revision", str), ("settings", dict), ("prompts", list)):
            if not isinstance(data.get(key), kind) or (kind is int and isinstance(data[key], bool)):
                raise FillupError(f"{path}: field {key!r} is missing or not a {kind.__name__}; delete the file and "
                                  "relaunch the build")
        if class_index is not None and data["class_index"] != class_index:
            raise FillupError(f"{path}: holds the prompts of class {data['class_index']}, not {class_index}")
        if strategy is not None and data["strategy"] != strategy:
            raise FillupError(f"{path}: holds {data['strategy']} prompts, not {strategy}")
        _check_entries(path, data["strategy"], data["prompts"])
        known = {"class_index", "class_name", "strategy", "model", "revision", "settings", "prompts"}
        return cls(**{k: data[k] for k in known}, details={k: v for k, v in data.items() if k not in known})


def _check_entries(path: Path, strategy: str, prompts: list) -> None:
    if strategy not in PROMPT_STRATEGIES:
        raise FillupError(f"{path}: strategy {strategy!r} stores no prompts (one of {', '.join(PROMPT_STRATEGIES)})")
    if not prompts:
        raise FillupError(f"{path}: 'prompts' is empty; delete the file and relaunch the build")
    for i, p in enumerate(prompts):
        ok = (isinstance(p, str) and p != "") if strategy == "lm_prompts" else (
            isinstance(p, dict) and isinstance(p.get("source_key"), str) and isinstance(p.get("caption"), str)
            and p["source_key"] != "" and p["caption"] != "")
        if not ok:
            want = "a non-empty string" if strategy == "lm_prompts" else '{"source_key": ..., "caption": ...} (non-empty)'
            raise FillupError(f"{path}: prompts[{i}] is not {want}; delete the file and relaunch the build")
