"""The build's record, ``manifest.json`` (contract), defined once: written by the assemble stage, read
by publish, the loader, regenerate, the card and figures, and the experiment.

Contract keys: ``name``, ``version``, ``fingerprint``, ``recipe``, ``classes``, ``shards``; the rest is
optional for a reader (a manifest from an older release or another tool may lack it).  Field order and
JSON layout are those ``write_json_atomic`` has always written, so the same content gives the same
bytes.  A manifest can come from the Hub: shard paths are checked to stay under the build's ``data/``.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from fillup_data.errors import FillupError
from fillup_data.schema.groups import DEFAULT_FEW_BELOW, DEFAULT_MANY_ABOVE
from fillup_data.schema.sample import FIELD_BY_NAME, keys_of_version

CONTRACT_KEYS = ("name", "version", "fingerprint", "recipe", "classes", "shards")
REBUILD = "rebuild with `fillup-data build`"


class _Record:
    """A JSON object with known fields in a fixed order (unknown keys are kept, after them);
    fields listed in ``_omit_if_none`` are left out while None (they are optional in the file)."""

    _omit_if_none: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.name in self._omit_if_none:
                continue
            out[f.name] = [x.to_dict() for x in v] if f.name in _NESTED and v is not None else v
        out.update(self.extra)
        return out


@dataclass
class ClassEntry(_Record):
    index: int
    name: str
    real: int
    synthetic: int = 0
    test: int = 0
    group: str | None = None  # many / medium / few (schema.groups)
    token_steps: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class ShardEntry(_Record):
    path: str  # under data/
    split: str  # train / test
    origin: str  # real / synthetic
    num_samples: int
    num_bytes: int | None = None
    sha256: str | None = None
    pixel_setup: dict | None = None  # synthetic shards of builds since the pixel setup is recorded
    extra: dict = field(default_factory=dict, repr=False)
    _omit_if_none = ("num_bytes", "sha256", "pixel_setup")


@dataclass
class TokenEntry(_Record):
    path: str
    class_index: int
    num_bytes: int
    sha256: str
    format: str | None = None  # "diffusers" for the load_textual_inversion copy
    extra: dict = field(default_factory=dict, repr=False)
    _omit_if_none = ("format",)


@dataclass
class PromptsEntry(_Record):
    """``prompts/NNNNN.json``: the prompts ``lm_prompts`` / ``captions`` made for a class (generation.prompt_files)."""

    path: str
    class_index: int
    num_bytes: int
    sha256: str
    extra: dict = field(default_factory=dict, repr=False)


_NESTED = {"classes": ClassEntry, "shards": ShardEntry, "tokens": TokenEntry, "prompts": PromptsEntry}


@dataclass
class Manifest(_Record):
    name: str
    version: str
    fingerprint: str
    recipe: dict  # the resolved recipe
    classes: list[ClassEntry]
    shards: list[ShardEntry]
    parent_version: str | None = None
    package_version: str = ""
    model: dict | None = None  # {"id", "revision"}; None when the build generated nothing
    imbalance_factor: float | None = None
    groups: dict | None = None  # {"many_above", "few_below"}
    splits: dict | None = None  # {"train": {"real", "synthetic"}, "test": {"real"}}
    # per split ("train-synthetic"): {"shards", "multiple_of"}: the count divides among ranks x workers
    sharding: dict | None = None
    tokens: list[TokenEntry] = field(default_factory=list)
    prompts: list[PromptsEntry] | None = None  # lm_prompts / captions builds: every class's prompts file
    skipped: int = 0
    sample_keys: list[str] | None = None  # the keys of every sample's json; absent before source_key
    # written by `fillup-data score` / `quality` (fillup_data.quality); absent from unscored builds
    scores: dict | None = None  # {"clip_model", "classifier", "columns", "identity", ...}
    quality: dict | None = None  # {"report", "files": [{"path", "num_bytes", "sha256", "real_pixels"}], ...}
    extra: dict = field(default_factory=dict, repr=False)
    _omit_if_none = ("sample_keys", "scores", "quality", "prompts", "sharding")

    # the order of manifest.json since its first release (sample_keys came later, last)
    _ORDER = ("name", "version", "parent_version", "fingerprint", "package_version", "model", "recipe",
              "imbalance_factor", "groups", "classes", "splits", "shards", "sharding", "tokens", "prompts", "skipped",
              "sample_keys", "scores", "quality")

    def to_dict(self) -> dict:
        unordered = super().to_dict()
        return {**{k: unordered[k] for k in self._ORDER if k in unordered}, **unordered}

    # ---- derived
    @property
    def metadata_keys(self) -> tuple[str, ...]:
        """The keys of every sample's ``json`` in this build (see ``sample_keys_in``)."""
        return sample_keys_in({"sample_keys": self.sample_keys})

    @property
    def many_above(self) -> int:
        return int((self.groups or {}).get("many_above", DEFAULT_MANY_ABOVE))

    @property
    def few_below(self) -> int:
        return int((self.groups or {}).get("few_below", DEFAULT_FEW_BELOW))

    def shard(self, path: str) -> ShardEntry | None:
        return next((s for s in self.shards if s.path == path), None)

    # ---- reading and writing
    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Manifest":
        """Check ``data`` against the contract; errors name ``where`` (the file) and the field."""
        if not isinstance(data, dict):
            raise FillupError(f"{where}: the manifest is not a JSON object; {REBUILD}")
        for key in CONTRACT_KEYS:
            if key not in data:
                raise FillupError(f"{where}: missing key {key!r}; the build is incomplete or from another tool: "
                                  f"{REBUILD}")
        for key in ("classes", "shards"):
            if not isinstance(data[key], list):
                raise FillupError(f"{where}: missing or malformed {key!r} list; {REBUILD}")
        for key in ("tokens", "prompts"):
            if not isinstance(data.get(key) or [], list):
                raise FillupError(f"{where}: malformed {key!r} list; {REBUILD}")
        classes = [_entry(ClassEntry, c, f"{where}: classes[{i}]") for i, c in enumerate(data["classes"])]
        shards = [_entry(ShardEntry, s, f"{where}: shards[{i}]") for i, s in enumerate(data["shards"])]
        tokens = [_entry(TokenEntry, t, f"{where}: tokens[{i}]") for i, t in enumerate(data.get("tokens") or [])]
        prompts = (None if data.get("prompts") is None else
                   [_entry(PromptsEntry, p, f"{where}: prompts[{i}]") for i, p in enumerate(data["prompts"])])
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known and k not in _NESTED}
        manifest = cls(**values, classes=classes, shards=shards, tokens=tokens, prompts=prompts,
                       extra={k: v for k, v in data.items() if k not in known})
        manifest.validate(where)
        return manifest

    @classmethod
    def read(cls, path: str | Path, where: str | None = None) -> "Manifest":
        """The manifest at ``path`` (``where``: how errors name it, e.g. ``org/name@v1:manifest.json``)."""
        path = Path(path)
        where = where or str(path)
        if not path.is_file():
            raise FillupError(f"{where}: no manifest.json: is {path.parent} a finished build? "
                              f"Run `fillup-data build ... --out {path.parent}`")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except json.JSONDecodeError as err:
            raise FillupError(f"{where}:{err.lineno}: not valid JSON ({err.msg}); {REBUILD}") from None
        except (OSError, ValueError) as err:
            raise FillupError(f"{where}: cannot read the manifest ({err}); {REBUILD}") from None
        return cls.from_dict(data, where)

    def write(self, path: str | Path) -> None:
        from fillup_data.state import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    def validate(self, where: str = "manifest.json") -> None:
        """What every reader relies on: class indices 0..n-1, shard paths under data/, counts that are counts."""
        idx = sorted(c.index for c in self.classes)
        if idx != list(range(len(idx))):
            raise FillupError(f"{where}: class indices are not 0..{len(idx) - 1}")
        for i, s in enumerate(self.shards):
            if not is_build_data_path(s.path):
                raise FillupError(
                    f"{where}: shards[{i}].path {s.path!r} is not a file under data/ of the build (no '..', "
                    "absolute paths or URLs); the manifest is damaged or was not written by `fillup-data build`"
                )
            if not _is_count(s.num_samples):
                raise FillupError(f"{where}: shards[{i}].num_samples {s.num_samples!r} is not a count "
                                  "(an integer >= 0)")
        for i, p in enumerate(self.prompts or []):
            if not is_build_data_path(p.path, "prompts") or not _is_count(p.num_bytes):
                raise FillupError(f"{where}: prompts[{i}] is not a file under prompts/ with its num_bytes ({p.path!r}, "
                                  f"{p.num_bytes!r}); the manifest is damaged or was not written by `fillup-data build`")
        if self.sample_keys is not None:
            unknown = [k for k in self.sample_keys if k not in FIELD_BY_NAME]
            if unknown:
                raise FillupError(f"{where}: sample_keys names keys this fillup-data does not know: {unknown}; "
                                  "upgrade fillup-data")
        self._validate_scores(where)

    def _validate_scores(self, where: str) -> None:
        """``scores`` names known columns; ``quality`` lists files under quality/ only (publish uploads them)."""
        from fillup_data.schema.scores import SCORE_NAMES

        rescore = "run `fillup-data score` on the build again"
        if self.scores is not None:
            columns = self.scores.get("columns") if isinstance(self.scores, dict) else None
            if not isinstance(columns, list) or any(c not in SCORE_NAMES for c in columns):
                raise FillupError(f"{where}: scores.columns must list score columns of {list(SCORE_NAMES)}, got "
                                  f"{columns!r}; {rescore}")
        if self.quality is not None:
            files = self.quality.get("files") if isinstance(self.quality, dict) else None
            if not isinstance(files, list):
                raise FillupError(f"{where}: quality.files is not a list; run `fillup-data quality` again")
            for i, f in enumerate(files):
                if not (isinstance(f, dict) and is_quality_path(f.get("path")) and _is_count(f.get("num_bytes"))):
                    raise FillupError(f"{where}: quality.files[{i}] is not a file under quality/ with its num_bytes "
                                      f"({f!r}); run `fillup-data quality` again")


def sample_keys_in(manifest: dict) -> tuple[str, ...]:
    """The keys of every sample's ``json`` in the build of ``manifest`` (its JSON form): its
    ``sample_keys``, or for a build made before they were recorded, the first release's keys."""
    keys = manifest.get("sample_keys")
    return tuple(keys) if keys is not None else keys_of_version(1)


def _entry(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise FillupError(f"{where} is not a JSON object; {REBUILD}")
    own = [f for f in fields(cls) if f.name != "extra"]
    required = [f.name for f in own if f.default is MISSING and f.default_factory is MISSING]
    for key in required:
        if key not in data:
            raise FillupError(f"{where} has no {key!r}")
    if cls is ClassEntry and not _is_count(data["index"]):
        raise FillupError(f"{where}.index {data['index']!r} is not a class index (an integer >= 0)")
    names = {f.name for f in own}
    return cls(**{k: v for k, v in data.items() if k in names}, extra={k: v for k, v in data.items() if k not in names})


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def is_build_data_path(path: Any, folder: str = "data") -> bool:
    """A manifest may come from the Hub: its shard paths must stay inside the build's data/ folder,
    whether joined to a local folder or to a Hub revision's URL."""
    if not isinstance(path, str) or "\\" in path or ":" in path or any(ord(ch) < 32 for ch in path):
        return False
    parts = path.split("/")
    return len(parts) >= 2 and parts[0] == folder and all(part not in ("", ".", "..") for part in parts)


def is_quality_path(path: Any) -> bool:
    """A file of the quality report: under the build's quality/ folder, like shards under data/."""
    return is_build_data_path(path, "quality")
