"""The headline ratios (issue 3's five with their targets, issue 11's anchors), the mixed-load
section's five (chunked prefill, paged KV cache, fair and deadline-aware admission) and verdicts.

Each ratio is computed from measurements of the same run, so machine load that slows one engine
slows its peers in the same hour; a missing measurement gives ``None`` rather than a guess.
"""

from __future__ import annotations

from typing import Any

RATIO_KEYS = (
    "single_stream_vs_llamacpp_q8",
    "ttft_vs_llamacpp_q8_prefill",
    "aggregate8_vs_llamacpp_q8_single",
    "service_overhead",
    "peak_rss_gb",
    "aggregate8_vs_llamacpp_q8_batched8",
)
MIXED_RATIO_KEYS = (
    "join_gap_max_vs_median_step",
    "long_prompt_ttft_vs_one_pass_prefill",
    "mixed_peak_rss_minus_8x512_gb",
    "light_ttft_vs_idle",
    "deadline_refusal_ms",
)
FIDELITY_RATIO_KEYS = ("fidelity_bf16_vs_llamacpp_bf16", "fidelity_vs_llamacpp_q8")
NO_Q8_MODE = "not measured: no q8 mode yet"
TARGETS: dict[str, tuple[str, float]] = {
    "single_stream_vs_llamacpp_q8": (">=", 1.2),
    "ttft_vs_llamacpp_q8_prefill": ("<=", 0.5),
    "aggregate8_vs_llamacpp_q8_single": (">=", 5.0),
    "service_overhead": ("<=", 0.05),
    "peak_rss_gb": ("<=", 1.5),
}
MIXED_TARGETS: dict[str, tuple[str, float]] = {
    "join_gap_max_vs_median_step": ("<=", 3.0),
    "long_prompt_ttft_vs_one_pass_prefill": ("<=", 1.3),
    "mixed_peak_rss_minus_8x512_gb": ("<=", 0.15),
    "light_ttft_vs_idle": ("<=", 2.0),
    "deadline_refusal_ms": ("<=", 50.0),
}


def _level(grpc_run: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    for level in grpc_run.get("levels", []):
        if level["concurrency"] == concurrency:
            return dict(level["summary"])
    return None


def _div(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def compute_ratios(
    grpc_run: dict[str, Any] | None,
    engine_run: dict[str, Any] | None,
    llamacpp_q8: dict[str, Any] | None,
    llamacpp_q8_batched8: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """The ratios of one precision mode's gRPC run against its peers, keys as the issues name
    them. ``aggregate8_vs_llamacpp_q8_batched8`` sets our 8 streams against llama.cpp's own
    batched decode of 8 sequences, the fair anchor for batching (the ``_single`` one is not)."""
    grpc_run = grpc_run or {}
    single = _level(grpc_run, 1) or {}
    eight = _level(grpc_run, 8) or {}
    q8 = (llamacpp_q8 or {}).get("summary", {})
    q8_prefill = (llamacpp_q8 or {}).get("prefill_ms")
    engine = (engine_run or {}).get("summary", {})
    single_rate = single.get("decode_tok_s_p50")
    engine_rate = engine.get("decode_tok_s_p50")
    overhead = None
    if single_rate is not None and engine_rate:
        overhead = round(1.0 - single_rate / engine_rate, 4)
    peak = (grpc_run.get("rss_run") or {}).get("peak_rss_bytes")
    return {
        "single_stream_vs_llamacpp_q8": _div(single_rate, q8.get("decode_tok_s_p50")),
        "ttft_vs_llamacpp_q8_prefill": _div(single.get("ttft_ms_p50"), q8_prefill),
        "aggregate8_vs_llamacpp_q8_single": _div(
            eight.get("aggregate_decode_tok_s"), q8.get("decode_tok_s_p50")
        ),
        "service_overhead": overhead,
        "peak_rss_gb": None if peak is None else round(peak / 1e9, 3),
        "aggregate8_vs_llamacpp_q8_batched8": _div(
            eight.get("aggregate_decode_tok_s"),
            (llamacpp_q8_batched8 or {}).get("aggregate_decode_tok_s"),
        ),
    }


def _get(record: dict[str, Any] | None, *path: str) -> Any:
    """``record[path[0]][path[1]]...``, or ``None`` where a part is missing (or failed)."""
    value: Any = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def mixed_ratios(mixed: dict[str, Any] | None) -> dict[str, float | None]:
    """The mixed-load section's ratios (see ``bench/mixed_load.py``); its memory figure is set
    against the peak RSS of the same run's 8 streams x 512 tokens (``baseline_8x512``)."""
    join = _get(mixed, "server", "join")
    fair = _get(mixed, "server", "fair")
    peak = _get(mixed, "server", "memory", "peak_rss_bytes")
    baseline = _get(mixed, "baseline_8x512", "peak_rss_bytes")
    return {
        "join_gap_max_vs_median_step": _div(
            _get(join, "gap_ms_in_window", "max"), _get(join, "median_step_ms")
        ),
        "long_prompt_ttft_vs_one_pass_prefill": _div(
            _get(join, "long", "ttft_ms"), _get(mixed, "one_pass_prefill", "prefill_ms")
        ),
        "mixed_peak_rss_minus_8x512_gb": (
            None if peak is None or baseline is None else round((peak - baseline) / 1e9, 3)
        ),
        "light_ttft_vs_idle": _div(
            _get(fair, "loaded", "ttft_ms_p50"), _get(fair, "idle", "ttft_ms_p50")
        ),
        "deadline_refusal_ms": _get(fair, "deadline", "answer_ms_p50"),
    }


def _pooled(engines: dict[str, dict[str, Any]], name: str) -> float | None:
    return (engines.get(name) or {}).get("pooled", {}).get("agreement")


def fidelity_ratios(engines: dict[str, dict[str, Any]]) -> dict[str, float | str | None]:
    """Our pooled next-token agreement with float32 over llama.cpp's at the same bit width.

    ``engines`` is the fidelity section's per-engine results (see ``bench/fidelity.py``). The
    q8 ratio needs a ``q8`` precision mode; without one it says so rather than compare int8.
    """
    from qwen_grpc.engine.precision import PRECISIONS

    q8: float | str | None = NO_Q8_MODE
    if "q8" in PRECISIONS:
        q8 = _div(_pooled(engines, "q8"), _pooled(engines, "llamacpp_q8_0"))
    return {
        "fidelity_bf16_vs_llamacpp_bf16": _div(
            _pooled(engines, "bfloat16"), _pooled(engines, "llamacpp_bf16")
        ),
        "fidelity_vs_llamacpp_q8": q8,
    }


def check_targets(
    ratios: dict[str, float | None], targets: dict[str, tuple[str, float]] = TARGETS
) -> dict[str, dict[str, Any]]:
    """Each ratio next to its target and a verdict (``None`` when it was not measured)."""
    verdicts: dict[str, dict[str, Any]] = {}
    for key, (op, bound) in targets.items():
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        verdicts[key] = {"value": value, "target": f"{op} {bound}", "met": met}
    return verdicts
