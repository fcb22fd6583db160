"""Percentiles and counts for the report, without pulling numpy into the client side."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks as numpy computes it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def counts(items: Iterable[str]) -> dict[str, int]:
    """How often each item occurs, most frequent first (status codes in the report)."""
    return dict(collections.Counter(items).most_common())
