"""A cheap in-band profile: the server's own step timers, scraped around each level.

The engine reports every forward pass (kind, batch size, seconds) to Prometheus. The difference
of two scrapes tells how much of a level's time the model itself took and at what batch size,
so a missed target can be split into model time and everything around it (sampling,
detokenizing, queueing, gRPC) without attaching a profiler to the server.
"""

from __future__ import annotations

import logging
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_LOGGER = logging.getLogger(__name__)
_SERIES = ("qwen_engine_step_seconds", "qwen_batch_size")
Scrape = dict[tuple[str, str], float]


def scrape(port: int | None) -> Scrape | None:
    """``{(sample name, kind): value}`` for the step histograms; ``None`` without metrics."""
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode("utf-8")
    except OSError as exc:
        _LOGGER.warning("cannot scrape the server's metrics: %s", exc)
        return None
    values: Scrape = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _SERIES:
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                values[(sample.name, sample.labels.get("kind", ""))] = sample.value
    return values


def step_profile(before: Scrape | None, after: Scrape | None, wall_s: float) -> dict[str, Any]:
    """Forward passes between two scrapes: count, mean duration and batch size, per kind."""
    if before is None or after is None:
        return {}

    def delta(name: str, kind: str) -> float:
        return after.get((name, kind), 0.0) - before.get((name, kind), 0.0)

    profile: dict[str, Any] = {}
    busy = 0.0
    for kind in ("prefill", "decode"):
        steps = delta("qwen_engine_step_seconds_count", kind)
        seconds = delta("qwen_engine_step_seconds_sum", kind)
        rows = delta("qwen_batch_size_sum", kind)
        busy += seconds
        profile[kind] = {
            "steps": int(steps),
            "seconds": round(seconds, 3),
            "step_ms_mean": round(1000 * seconds / steps, 3) if steps else None,
            "batch_mean": round(rows / steps, 2) if steps else None,
        }
    profile["forward_seconds"] = round(busy, 3)
    profile["forward_share_of_wall"] = round(busy / wall_s, 3) if wall_s > 0 else None
    return profile
