"""The mixed-load section of ``latest.md``: its targets, then each scenario's figures."""

from __future__ import annotations

from typing import Any

from bench.ratios import MIXED_TARGETS

LABELS = {
    "join_gap_max_vs_median_step": (
        "longest gap of the running streams while a long prompt joins ÷ their median step"
    ),
    "long_prompt_ttft_vs_one_pass_prefill": (
        "the joining prompt's TTFT ÷ the engine's one-pass prefill of it (in process, idle)"
    ),
    "mixed_peak_rss_minus_8x512_gb": (
        "server peak RSS, short streams + one long conversation − peak RSS of 8 × 512 (GB)"
    ),
    "light_ttft_vs_idle": (
        "light client's TTFT p50 behind the heavy backlog ÷ beside a batch one short of full"
    ),
    "deadline_refusal_ms": "answer time of a request whose deadline cannot be met (ms)",
}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def _failed(record: dict[str, Any] | None) -> str | None:
    """Why a record has no figures (``None`` when it has them)."""
    if record is None:
        return "not run"
    return f"failed: {record['error']}" if "error" in record else None


def _settings(join: dict[str, Any]) -> str:
    """Which server settings a join scenario ran with, and why."""
    if not join["server_args_added"]:
        return "The run's server settings admitted the long prompt."
    return (
        "The run's server settings did not admit the long prompt beside the streams "
        f"({'; '.join(join['why'])}), so this scenario ran on a server started with "
        f"`{' '.join(join['server_args_added'])}` in addition."
    )


def _stall(record: dict[str, Any]) -> str:
    """How busy the machine was during a scenario (Linux PSI, as ``bench/quiet.py`` measures)."""
    share = record.get("cpu_stall_share")
    return "" if share is None else f" CPU stall during the scenario: {100 * share:.0f} %."


def _targets(results: dict[str, Any]) -> list[str]:
    lines = ["| figure | measured | target | verdict |", "|---|---|---|---|"]
    for key in MIXED_TARGETS:
        verdict = results["targets"][key]
        lines.append(
            f"| `{key}`: {LABELS[key]} | {_fmt(verdict['value'], 3)} | {verdict['target']} "
            f"| {_verdict(verdict['met'])} |"
        )
    return lines


def _join(mixed: dict[str, Any]) -> list[str]:
    join = mixed["server"].get("join")
    lines = ["", "### A long prompt joins running streams", ""]
    problem = _failed(join)
    if problem:
        return [*lines, problem]
    assert join is not None
    anchor_failed = _failed(mixed.get("llamacpp"))
    anchor = mixed.get("llamacpp") or {}
    ours, theirs = join["gap_ms_in_window"], anchor.get("gap_ms_in_window", {})

    def row(name: str, our: Any, their: Any) -> str:
        return f"| {name} | {_fmt(our)} | {anchor_failed or _fmt(their)} |"

    prefill = mixed.get("one_pass_prefill")
    lines += [
        f"{join['stream_count']} streams ({join['stream_prompt_tokens']}-token prompts) decode; "
        f"{join['steady_steps']} decode steps after the last one's first token, a "
        f"{join['long_prompt_tokens']:,}-token prompt ({join['long_new_tokens']} new tokens) "
        "arrives. The window runs from its arrival to its first token; gaps are between the "
        "streams' tokens as their clients receive them (server: text deltas, "
        f"{_fmt(join['tokens_per_delta'], 3)} tokens per delta; llama.cpp: the time between "
        f"two `llama_decode` calls' ends, n_batch {anchor.get('n_batch', '—')}, prompt chunks "
        "sharing each call with the streams' tokens as llama.cpp's server batches).",
        "",
        "| | qwen-grpc (gRPC) | llama.cpp Q8_0, batched API |",
        "|---|---|---|",
        row("gaps in the window", ours.get("count"), theirs.get("count")),
        row("gap p50 in the window, ms", ours.get("p50"), theirs.get("p50")),
        row("gap p99 in the window, ms", ours.get("p99"), theirs.get("p99")),
        row("gap max in the window, ms", ours.get("max"), theirs.get("max")),
        row(
            "median step outside the window, ms",
            join["median_step_ms"],
            anchor.get("median_step_ms"),
        ),
        row("long prompt TTFT, ms", join["long"]["ttft_ms"], anchor.get("ttft_ms")),
        f"| one-pass prefill of the same prompt, ms (engine in process, idle) "
        f"| {_failed(prefill) or _fmt((prefill or {}).get('prefill_ms'))} | — |",
    ]
    lines += [
        "",
        f"Long prompt: {' '.join(filter(None, (join['long']['code'], join['long']['message'])))}"
        f"; streams: "
        f"{join['streams']['codes']} (cancelled once the long prompt's answer was whole). "
        f"{_settings(join)}{_stall(join)}",
    ]
    return lines


def _memory(mixed: dict[str, Any]) -> list[str]:
    memory = mixed["server"].get("memory")
    lines = ["", "### Peak memory of short and long conversations together", ""]
    problem = _failed(memory)
    if problem:
        return [*lines, problem]
    assert memory is not None
    baseline = mixed["baseline_8x512"]
    return [
        *lines,
        f"{memory['stream_count']} streams of {memory['stream_prompt_tokens']}-token prompts decode; a "
        f"{memory['long_prompt_tokens']:,}-token prompt joins them and generates "
        f"{memory['long_new_tokens']} tokens while they decode on. Server peak RSS "
        f"{_fmt(memory['peak_rss_gb'], 3)} GB ({memory['peak_rss_source']}; sampled "
        f"{_fmt(memory['sampled_peak_rss_gb'], 3)} GB), against {_fmt(baseline['peak_rss_gb'], 3)} "
        f"GB for {baseline['streams']} streams × {baseline['new_tokens']} tokens in the same run "
        f"({baseline['source']}). {_settings(memory)} Long prompt: {memory['long']['code']}, "
        f"TTFT {_fmt(memory['long']['ttft_ms'])} ms.{_stall(memory)}",
    ]


def _fair(mixed: dict[str, Any]) -> list[str]:
    fair = mixed["server"].get("fair")
    lines = ["", "### Fair and deadline-aware admission", ""]
    problem = _failed(fair)
    if problem:
        return [*lines, problem]
    assert fair is not None
    batch, queued = fair["max_batch_size"], fair["queued"]
    lines += [
        f"All requests have {fair['prompt_tokens']}-token prompts and "
        f"{fair['heavy_new_tokens']} new tokens. The heavy client (`x-client-id: heavy`) runs "
        f"a closed loop of calls; the light one (`x-client-id: light`) sends "
        f"{len(fair['idle']['ttft_ms'])} requests one after another.",
        "",
        "| heavy client keeps | light TTFT p50 ms | light TTFTs ms | queue depth at each send "
        "| heavy calls, TTFT p50 ms |",
        "|---|---|---|---|---|",
    ]
    for name, phase in (
        (f"{batch - 1} running, none queued", fair["idle"]),
        (f"{batch} running + {queued} queued", fair["loaded"]),
    ):
        heavy = phase["heavy"]
        lines.append(
            f"| {name} | {_fmt(phase['ttft_ms_p50'])} "
            f"| {', '.join(_fmt(t) for t in phase['ttft_ms'])} "
            f"| {', '.join(_fmt(d, 0) for d in phase['queue_depth_at_send'])} "
            f"| {heavy['calls']} ({_fmt(heavy['ttft_ms_p50'])}) |"
        )
    deadline = fair["deadline"]
    probes = deadline["probes"]
    lines += [
        "",
        f"Deadline: with the backlog queued, {len(probes)} heavy requests with a "
        f"{_fmt(deadline['deadline_ms'])} ms deadline (a quarter of the heavy client's "
        f"{_fmt(deadline['heavy_queue_wait_ms'])} ms queue wait) were answered "
        + "; ".join(
            f'{p["code"]} in {_fmt(p["answer_ms"])} ms by the {p["answered_by"]} ("{p["message"]}")'
            for p in probes
        )
        + f".{_stall(fair)}",
    ]
    return lines


def render_mixed(results: dict[str, Any]) -> list[str]:
    """The section's lines (``results["mixed"]`` as ``bench.run`` records it)."""
    mixed = results["mixed"]
    machine = results["machine"]
    lines = [
        "",
        "## Mixed load: chunked prefill, paged KV cache, fair and deadline-aware admission",
        "",
        f"{machine['cpu_model']}, {machine['cores']} cores · server precision "
        f"`{results['primary_dtype']}`, through the real gRPC server",
        "",
        *_targets(results),
    ]
    if "error" in mixed["server"]:
        return [*lines, "", f"The server scenarios failed: {mixed['server']['error']}"]
    server = mixed["server"]["server"]
    lines += [
        "",
        f"Server as started: batch {server['max_batch_size']}, KV budget "
        f"{server['kv_cache_tokens']:,} tokens, prompt limit {server['max_prompt_tokens']:,} "
        f"tokens, precision `{server['dtype']}`.",
        *_join(mixed),
        *_memory(mixed),
        *_fair(mixed),
    ]
    return lines
