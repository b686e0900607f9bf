"""The per-sample metadata (contract), defined once.

Every sample's ``json`` member holds exactly these keys, never null; ``index.parquet`` has one column
per key (after the sample's location columns); the dataset card declares them as the ``json`` struct
(``datasets`` would otherwise infer types from 5 samples).  Each key is a :class:`MetadataField`: its
Python type, from which its Arrow and ``datasets`` types follow, the value written where it does not
apply, and the schema version that added it.

Builds made before a key was added are still read: their manifest lists no ``sample_keys``, and
:func:`as_current` gives an old sample (or index row) the newer keys with their "not applicable"
value (``source_key`` = "").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The schema version of new builds.  1: the keys of the first release; 2: adds source_key.
SCHEMA_VERSION = 2

# Python type -> (Arrow type name, datasets feature dtype): one row per JSON scalar type.
_ENCODINGS: dict[type, tuple[str, str]] = {
    int: ("int64", "int64"),
    float: ("float64", "float64"),
    bool: ("bool_", "bool"),
    str: ("string", "string"),
}


@dataclass(frozen=True)
class MetadataField:
    name: str
    type: type
    not_applicable: Any  # written where the key does not apply; None: every sample has a real value
    doc: str
    since: int = 1  # the schema version that added the key

    @property
    def arrow_type(self):
        import pyarrow as pa

        return getattr(pa, _ENCODINGS[self.type][0])()

    @property
    def feature_dtype(self) -> str:
        return _ENCODINGS[self.type][1]


FIELDS: tuple[MetadataField, ...] = (
    MetadataField("label", int, None, "class index, the same as the sample's cls"),
    MetadataField("class_name", str, None, "the class's name"),
    MetadataField("is_synthetic", bool, None, "True for generated images, False for real ones"),
    MetadataField("strategy", str, None, 'how the image was made: "real", "textual_inversion", "single_template", ...'),
    MetadataField("prompt", str, "", "the exact prompt the image was generated from"),
    MetadataField("seed", int, -1, "the seed of the sample's own generator"),
    MetadataField("token_step", int, -1, "the Textual Inversion checkpoint (training step) used"),
    MetadataField("guidance_scale", float, -1.0, "classifier-free guidance scale"),
    MetadataField("num_inference_steps", int, -1, "denoising steps"),
    MetadataField("model", str, "", "the text-to-image model (hub id or folder)"),
    MetadataField("source_path", str, "", "a real image's file, relative to the source root"),
    MetadataField("source_key", str, "", "the key of the real sample a variation or caption came from", since=2),
)
FIELD_BY_NAME = {f.name: f for f in FIELDS}

# The keys of new builds, in the contract's order.
METADATA_KEYS: tuple[str, ...] = tuple(f.name for f in FIELDS)


def keys_of_version(version: int) -> tuple[str, ...]:
    """The sample keys a build of schema ``version`` wrote (version 1: builds without ``sample_keys``)."""
    return tuple(f.name for f in FIELDS if f.since <= version)


def _defaults(**values) -> dict:
    meta = {f.name: f.not_applicable for f in FIELDS}
    meta.update(values)
    return meta


def real_metadata(label: int, class_name: str, source_path: str) -> dict:
    return _defaults(label=label, class_name=class_name, is_synthetic=False, strategy="real", source_path=source_path)


def synthetic_metadata(label: int, class_name: str, *, strategy: str, prompt: str, seed: int, token_step: int,
                       guidance_scale: float, num_inference_steps: int, model: str, source_key: str = "") -> dict:
    return _defaults(label=label, class_name=class_name, is_synthetic=True, strategy=strategy, prompt=prompt,
                     seed=seed, token_step=token_step, guidance_scale=guidance_scale,
                     num_inference_steps=num_inference_steps, model=model, source_key=source_key)


def validate(meta: dict, where: str = "sample metadata") -> dict:
    """Exactly the contract keys with the contract types, never null (``datasets`` infers a struct
    from them); returns the metadata in key order, with an int guidance scale made a float.  Errors
    (ValueError) start with ``where``, which names the sample."""
    if set(meta) != set(METADATA_KEYS):
        missing = [k for k in METADATA_KEYS if k not in meta]
        extra = sorted(set(meta) - set(METADATA_KEYS))
        raise ValueError(f"{where}: metadata keys differ from the contract: missing {missing}, extra {extra}")
    out = {}
    for f in FIELDS:
        v = meta[f.name]
        if v is None:
            raise ValueError(f"{where}: metadata {f.name!r} is null")
        if f.type is float:  # an int is a float; a bool or a string is not
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:  # bool is a subclass of int: an int key refuses True, a bool key refuses 1
            ok = isinstance(v, f.type) and isinstance(v, bool) == (f.type is bool)
        if not ok:
            raise ValueError(f"{where}: metadata {f.name!r} must be {f.type.__name__}, got {v!r}")
        out[f.name] = float(v) if f.type is float else v
    return out


def as_current(meta: dict) -> dict:
    """``meta`` (a sample's json or index row of any build) with every key added since its build's
    schema version, at its not-applicable value; keys it has are kept as they are."""
    return {**meta, **{f.name: f.not_applicable for f in FIELDS if f.since > 1 and f.name not in meta}}


def json_features(keys: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """The card's ``json`` struct for a build whose samples hold ``keys`` (default: new builds' keys)."""
    return [{"name": k, "dtype": FIELD_BY_NAME[k].feature_dtype} for k in (METADATA_KEYS if keys is None else keys)]


# index.parquet: where each sample lies, then its metadata, then how many seeds it took.
INDEX_LOCATION_COLUMNS = (
    ("key", str), ("shard", str), ("split", str),
    ("offset", int), ("size", int), ("image_offset", int), ("image_size", int),
)
INDEX_TRAILING_COLUMNS = (("retries", int),)


def index_schema(keys: tuple[str, ...] | list[str] | None = None):
    """The Arrow schema of ``index.parquet`` for a build whose samples hold ``keys`` (default: new builds' keys)."""
    import pyarrow as pa

    keys = METADATA_KEYS if keys is None else keys

    def arrow(t: type):
        return getattr(pa, _ENCODINGS[t][0])()

    return pa.schema(
        [(n, arrow(t)) for n, t in INDEX_LOCATION_COLUMNS]
        + [(k, FIELD_BY_NAME[k].arrow_type) for k in keys]
        + [(n, arrow(t)) for n, t in INDEX_TRAILING_COLUMNS]
    )
