"""Timings of single generations and the summaries every engine is reported with.

All engines (gRPC, in-process engine, transformers, llama.cpp) are reduced to the same
:class:`StreamTiming`, so their numbers mean the same thing: TTFT is request start to the first
token, and per-stream decode speed is ``(completion_tokens - 1) / (last token - first token)``,
which leaves prefill out of the decode rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StreamTiming:
    """One generation, timed on the caller's side (``time.perf_counter`` seconds)."""

    start: float
    first_token: float
    last_token: float
    completion_tokens: int
    finish_reason: str = "length"

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.start

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps; the first one comes out of prefill."""
        return max(0, self.completion_tokens - 1)

    @property
    def decode_tok_s(self) -> float | None:
        span = self.last_token - self.first_token
        if self.decode_tokens == 0 or span <= 0:
            return None
        return self.decode_tokens / span

    def to_dict(self, origin: float) -> dict[str, Any]:
        """Relative times (from ``origin``) so the JSON is readable and comparable."""
        raw = asdict(self)
        for key in ("start", "first_token", "last_token"):
            raw[key] = round(raw[key] - origin, 6)
        raw["ttft_ms"] = round(self.ttft_s * 1000, 3)
        rate = self.decode_tok_s
        raw["decode_tok_s"] = None if rate is None else round(rate, 3)
        return raw


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of intervals: time during which at least one stream was decoding."""
    total, current_start, current_end = 0.0, None, None
    for begin, end in sorted(intervals):
        if current_end is None or begin > current_end:
            if current_end is not None and current_start is not None:
                total += current_end - current_start
            current_start, current_end = begin, end
        else:
            current_end = max(current_end, end)
    if current_end is not None and current_start is not None:
        total += current_end - current_start
    return total


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summarize(timings: Sequence[StreamTiming], wall_s: float | None = None) -> dict[str, Any]:
    """TTFT percentiles, per-stream decode speed and aggregate throughput of a set of streams.

    ``aggregate_decode_tok_s`` divides all decode tokens by the time during which any stream was
    decoding (the union of first-to-last-token intervals): with continuous batching that is the
    throughput of the batched decode, without the prefill pauses and without double-counting
    streams that waited in the queue. ``aggregate_tok_s`` is the end-to-end view: every completion
    token over the wall time of the whole level, prefill and queueing included.
    """
    ttfts = [t.ttft_s * 1000 for t in timings]
    rates = [r for r in (t.decode_tok_s for t in timings) if r is not None]
    busy = _busy_seconds([(t.first_token, t.last_token) for t in timings])
    decode_tokens = sum(t.decode_tokens for t in timings)
    completion = sum(t.completion_tokens for t in timings)
    reasons: dict[str, int] = {}
    for t in timings:
        reasons[t.finish_reason] = reasons.get(t.finish_reason, 0) + 1
    if wall_s is None and timings:
        wall_s = max(t.last_token for t in timings) - min(t.start for t in timings)
    return {
        "requests": len(timings),
        "completion_tokens": completion,
        "finish_reasons": reasons,
        "ttft_ms_p50": _round(percentile(ttfts, 50)),
        "ttft_ms_p95": _round(percentile(ttfts, 95)),
        "ttft_ms_max": _round(max(ttfts) if ttfts else None),
        "decode_tok_s_p50": _round(percentile(rates, 50)),
        "decode_tok_s_mean": _round(sum(rates) / len(rates) if rates else None),
        "decode_tok_s_min": _round(min(rates) if rates else None),
        "aggregate_decode_tok_s": _round(decode_tokens / busy if busy > 0 else None),
        "aggregate_tok_s": _round(completion / wall_s if wall_s else None),
        "wall_s": _round(wall_s),
    }
