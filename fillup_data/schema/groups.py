"""Many / medium / few: the paper's class groups (section 4.2), defined once for the plan, the
loader, evaluation and the experiment tables."""

from __future__ import annotations

from typing import Protocol

GROUPS = ("many", "medium", "few")
DEFAULT_MANY_ABOVE = 100
DEFAULT_FEW_BELOW = 20


class GroupThresholds(Protocol):
    many_above: int
    few_below: int


def group_of(real_count: int, thresholds: GroupThresholds | int, few_below: int | None = None) -> str:
    """Paper 4.2: many > 100, medium 20-100, few < 20 real training images (thresholds configurable).

    ``thresholds`` is the recipe's ``groups`` (anything with ``many_above``/``few_below``), or give
    the two numbers: ``group_of(n, many_above, few_below)`` (a manifest's ``groups`` record)."""
    if few_below is None:
        many_above, few_below = thresholds.many_above, thresholds.few_below
    else:
        many_above = thresholds
    if real_count > many_above:
        return "many"
    if real_count < few_below:
        return "few"
    return "medium"


def count_groups(classes: list[dict]) -> dict[str, int]:
    """Classes per group, from a manifest's ``classes`` entries (each with its ``group``)."""
    return {g: sum(1 for c in classes if c["group"] == g) for g in GROUPS}
