"""The quality-score columns of ``index.parquet``, defined once (``fillup-data score`` writes them,
the quality report, the loader's filter and the card read them).

They are added after the build's own columns; a build that was never scored lacks them.  A score
that does not apply to a row (no classifier given, a real row's nearest real image) holds its
``not_applicable`` value: NaN for floats (it sorts and filters as "unknown", never as a low or high
score), "" for strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The prompt whose CLIP text features ``clip_score`` compares each image with.
CLIP_PROMPT = "a photo of a {class_name}"
# The CLIP model ``score`` uses unless told otherwise, and the offline tiny one (seeded random weights).
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
TINY_CLIP = "builtin:tiny-clip"
# real_similarity at or above which the summary and the quality report count a synthetic image as a near-copy
NEAR_COPY = 0.95


@dataclass(frozen=True)
class ScoreColumn:
    name: str
    type: type  # float or str
    not_applicable: Any
    rows: str  # which rows get a value: "all" or "synthetic"
    doc: str

    @property
    def arrow_type(self):
        import pyarrow as pa

        return pa.float64() if self.type is float else pa.string()

    def is_not_applicable(self, value: Any) -> bool:
        if self.type is float:
            return value is None or (isinstance(value, float) and math.isnan(value))
        return value == self.not_applicable


NAN = float("nan")

SCORE_COLUMNS: tuple[ScoreColumn, ...] = (
    ScoreColumn("clip_score", float, NAN, "all",
                f"cosine of the CLIP image features and the CLIP text features of {CLIP_PROMPT!r}"),
    ScoreColumn("class_confidence", float, NAN, "all",
                "softmax probability of the sample's own class from a classifier trained on the real data "
                "(NaN when `score` was run without a classifier)"),
    ScoreColumn("real_similarity", float, NAN, "synthetic",
                "highest cosine of the sample's CLIP image features to a real training image of its class "
                "(NaN on real rows and when the class has no real training image)"),
    ScoreColumn("nearest_real_key", str, "", "synthetic",
                "key of that most similar real training image (\"\" where real_similarity is NaN)"),
)
SCORE_BY_NAME = {c.name: c for c in SCORE_COLUMNS}
SCORE_NAMES: tuple[str, ...] = tuple(c.name for c in SCORE_COLUMNS)


def score_schema_fields():
    """The Arrow fields the scores add to ``index.parquet``, in order."""
    import pyarrow as pa

    return [pa.field(c.name, c.arrow_type) for c in SCORE_COLUMNS]
