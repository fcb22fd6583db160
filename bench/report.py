"""Writes a benchmark run as ``latest.json`` (everything), ``latest.md`` (tables), ``latest.png``.

The JSON is the record; the Markdown and the plot are views of it, so they can be regenerated
from a saved JSON with :func:`write_views`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.fidelity_report import build_lines, render_fidelity
from bench.mixed_report import render_mixed
from bench.ratios import MIXED_TARGETS

_LOGGER = logging.getLogger(__name__)
_LABELS = {
    "single_stream_vs_llamacpp_q8": "gRPC single-stream decode ÷ llama.cpp Q8_0 decode",
    "ttft_vs_llamacpp_q8_prefill": "gRPC TTFT (idle, 64-token prompt) ÷ llama.cpp Q8_0 prefill",
    "aggregate8_vs_llamacpp_q8_single": "gRPC aggregate decode, 8 streams ÷ llama.cpp Q8_0 1 stream",
    "service_overhead": "1 − gRPC single-stream ÷ engine in-process single-stream",
    "peak_rss_gb": "server peak RSS, 8 streams × 512 tokens (GB = 10⁹ B)",
    "aggregate8_vs_llamacpp_q8_batched8": (
        "gRPC aggregate decode, 8 streams ÷ llama.cpp Q8_0 batched decode of 8 sequences"
    ),
}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _steps(kind: dict[str, Any] | None) -> str:
    if not kind or kind.get("step_ms_mean") is None:
        return "—"
    return f"{kind['step_ms_mean']:.1f} ({kind['batch_mean']:.1f})"


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.0f} %"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def render_markdown(results: dict[str, Any]) -> str:
    """Tables of the ratios, every gRPC level per precision, and the single-stream baselines."""
    machine = results["machine"]
    config = results["config"]
    lines = [
        "# qwen-grpc benchmark",
        "",
        f"{results['started_at']} · {machine['cpu_model']}, {machine['cores']} cores · "
        f"torch {machine['versions'].get('torch')} · llama-cpp-python "
        f"{machine['versions'].get('llama-cpp-python')} · model {results['model']['shape']} "
        f"(random weights, Qwen tokenizer) · {config['prompt_tokens']}-token prompt, greedy, "
        f"{config['max_new_tokens']} new tokens · run took {results['duration_s'] / 60:.1f} min · "
        f"load average {machine['load_average_start']} → {machine.get('load_average_end')}, "
        f"CPU pressure (PSI some, avg60) {machine.get('cpu_pressure_avg60_start')} % → "
        f"{machine.get('cpu_pressure_avg60_end')} %",
        "",
        f"## Targets (issue 3), server precision `{results['primary_dtype']}`",
        "",
        "| ratio | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    for key, verdict in results["targets"].items():
        if key in MIXED_TARGETS:
            continue  # in the mixed-load section
        lines.append(
            f"| `{key}`: {_LABELS[key]} | {_fmt(verdict['value'], 3)} | {verdict['target']} "
            f"| {_verdict(verdict['met'])} |"
        )
    untargeted = [key for key in results["ratios"] if key not in results["targets"]]
    if untargeted:
        lines += ["", "Anchors without a target:", "", "| ratio | measured |", "|---|---|"]
        for key in untargeted:
            lines.append(f"| `{key}`: {_LABELS[key]} | {_fmt(results['ratios'][key], 3)} |")
    for dtype, run in results["grpc"].items():
        lines += [
            "",
            f"## gRPC, `{dtype}`",
        ]
        if "error" in run:
            lines += ["", f"failed: {run['error']}"]
            continue
        lines += [
            "",
            "| concurrency | requests | TTFT p50 ms | TTFT p95 ms | per-stream decode tok/s (p50) "
            "| aggregate decode tok/s | end-to-end tok/s | server decode step ms (mean batch) "
            "| server prefill ms (mean batch) | forward passes / wall | CPU stall | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for level in run["levels"]:
            s = level["summary"]
            steps = level.get("server_steps") or {}
            lines.append(
                f"| {level['concurrency']} | {s['requests']} | {_fmt(s['ttft_ms_p50'])} "
                f"| {_fmt(s['ttft_ms_p95'])} | {_fmt(s['decode_tok_s_p50'])} "
                f"| {_fmt(s['aggregate_decode_tok_s'])} | {_fmt(s['aggregate_tok_s'])} "
                f"| {_steps(steps.get('decode'))} | {_steps(steps.get('prefill'))} "
                f"| {_percent(steps.get('forward_share_of_wall'))} "
                f"| {_percent(level.get('cpu_stall_share'))} | {len(level['errors'])} |"
            )
        rss = run.get("rss_run")
        if rss:
            s = rss["summary"]
            lines += [
                "",
                f"{rss['concurrency']} streams × {rss['max_new_tokens']} tokens: aggregate decode "
                f"{_fmt(s['aggregate_decode_tok_s'])} tok/s, per-stream {_fmt(s['decode_tok_s_p50'])} "
                f"tok/s, TTFT p50 {_fmt(s['ttft_ms_p50'])} ms; server peak RSS "
                f"{_fmt(rss['peak_rss_gb'], 3)} GB (after loading "
                f"{_fmt(run['server']['rss_after_load_gb'], 3)} GB, loading peak "
                f"{_fmt(run['server']['peak_rss_loading_gb'], 3)} GB).",
            ]
    if "mixed" in results:
        lines += render_mixed(results)
    lines += [
        "",
        "## Single stream, in process (no gRPC)",
        "",
        "| engine | decode tok/s (p50) | prefill / TTFT ms | notes |",
        "|---|---|---|---|",
    ]
    for row in _baseline_rows(results):
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        *_batched_lines(results),
        "Per-stream decode tok/s = (completion tokens − 1) ÷ (last token − first token), timed by "
        "the caller. Aggregate decode tok/s = all decode tokens ÷ the time any stream was "
        "decoding; end-to-end tok/s = all completion tokens ÷ the level's wall time (prefill and "
        "queueing included). TTFT is measured from sending the request to the first streamed "
        "text on the client. Server step columns come from the server's own Prometheus step "
        "timers (one forward pass each), scraped before and after each level. CPU stall is the "
        "share of the level's wall time in which some task on the machine waited for a CPU "
        "(Linux PSI): our own server and client cause some; much more means other load "
        "distorted that level.",
        "",
        *_fidelity_lines(results),
    ]
    return "\n".join(lines)


def _batched_lines(results: dict[str, Any]) -> list[str]:
    """llama.cpp's own batched decode, the anchor of ``aggregate8_vs_llamacpp_q8_batched8``,
    and how the llama.cpp that ran was built."""
    build = results.get("llamacpp", {}).get("build")
    lines: list[str] = [*build_lines(build), ""] if build else []
    for key, run in results.get("llamacpp", {}).items():
        if not key.startswith("q8_0_batched"):
            continue
        if "error" in run:
            lines += [f"llama.cpp Q8_0 batched: failed: {run['error']}", ""]
            continue
        lines += [
            f"llama.cpp Q8_0, its own batched decode of {run['sequences']} sequences in one "
            f"`llama_decode` per step ({run['n_threads']} threads, prompts of "
            f"{max(run['prompt_tokens'])} tokens, {run['max_new_tokens']} new tokens each): "
            f"aggregate decode {_fmt(run['aggregate_decode_tok_s'])} tok/s (runs: "
            f"{', '.join(_fmt(rate) for rate in run['aggregate_decode_tok_s_runs'])}), "
            f"batched prefill {_fmt(run['prefill_ms'])} ms{_stall_note(run)}.",
            "",
        ]
    return lines


def _fidelity_lines(results: dict[str, Any]) -> list[str]:
    fidelity = results.get("fidelity")
    if fidelity is None:
        return []
    if "error" in fidelity:
        return ["## Fidelity", "", f"failed: {fidelity['error']}", ""]
    return render_fidelity(fidelity)


def _stall_note(run: dict[str, Any]) -> str:
    shares = [share for share in run.get("cpu_stall_shares", []) if share is not None]
    return f"; CPU stall ≤ {100 * max(shares):.0f} %" if shares else ""


def _baseline_rows(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for dtype, run in results.get("transformers_eager", {}).items():
        if "error" in run:
            rows.append([f"transformers eager `generate` {dtype}", "—", "—", run["error"]])
            continue
        rows.append(
            [
                f"transformers eager `generate` {dtype}",
                _fmt(run["summary"]["decode_tok_s_p50"]),
                _fmt(run["prefill_ms"]),
                f"prefill = one forward pass; {run['threads']} threads{_stall_note(run)}",
            ]
        )
    for dtype, run in results.get("engine_inprocess", {}).items():
        if "error" in run:
            rows.append([f"qwen-grpc engine {dtype}", "—", "—", run["error"]])
            continue
        rows.append(
            [
                f"qwen-grpc engine {dtype}",
                _fmt(run["summary"]["decode_tok_s_p50"]),
                _fmt(run["summary"]["ttft_ms_p50"]),
                "same code as the server, TTFT from submit; timed before and after the "
                f"server run{_stall_note(run)}",
            ]
        )
    llamacpp = results.get("llamacpp", {})
    for outtype in ("bf16", "q8_0"):
        run = llamacpp.get(outtype)
        if run is None:
            continue
        if "error" in run:
            rows.append([f"llama.cpp {outtype}", "—", "—", run["error"]])
            continue
        internal = run["internal"]
        rows.append(
            [
                f"llama.cpp {outtype.upper()}",
                _fmt(run["summary"]["decode_tok_s_p50"]),
                _fmt(run["prefill_ms"]),
                f"{run['n_threads']} threads; llama.cpp's own counters: "
                f"{_fmt(internal['decode_tok_s'])} tok/s, prefill {_fmt(internal['prefill_ms'])} ms"
                f"{_stall_note(run)}",
            ]
        )
    return rows


def render_plot(results: dict[str, Any], path: Path) -> None:
    """Aggregate decode throughput and TTFT against concurrency, one line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    ticks: set[int] = set()
    for index, (dtype, run) in enumerate(results["grpc"].items()):
        levels = run.get("levels", [])
        if not levels:
            continue
        color = f"C{index}"
        x = [level["concurrency"] for level in levels]
        ticks.update(x)

        def series(key: str, levels: list[dict[str, Any]] = levels) -> list[float | None]:
            return [level["summary"][key] for level in levels]

        throughput.plot(
            x, series("aggregate_decode_tok_s"), "o-", color=color, label=f"{dtype} decode"
        )
        throughput.plot(
            x, series("aggregate_tok_s"), "x:", color=color, label=f"{dtype} end to end"
        )
        ttft.plot(x, series("ttft_ms_p50"), "o-", color=color, label=f"{dtype} p50")
        ttft.plot(x, series("ttft_ms_p95"), "x:", color=color, label=f"{dtype} p95")
    q8 = results.get("llamacpp", {}).get("q8_0", {})
    if "summary" in q8:
        throughput.axhline(
            q8["summary"]["decode_tok_s_p50"],
            color="grey",
            ls="--",
            label="llama.cpp Q8_0, 1 stream",
        )
        ttft.axhline(q8["prefill_ms"], color="grey", ls="--", label="llama.cpp Q8_0 prefill")
    ttft.set_yscale("log")
    for axis in (throughput, ttft):
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_locator(FixedLocator([]))
        axis.set_xlabel("concurrent streams")
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # nothing to label without gRPC levels
            axis.legend(fontsize=8)
    ttft.yaxis.set_major_formatter(ScalarFormatter())
    ttft.yaxis.set_minor_formatter(NullFormatter())
    throughput.set_ylabel("tokens / s")
    throughput.set_title("Aggregate throughput")
    ttft.set_ylabel("ms")
    ttft.set_title("Time to first token")
    figure.suptitle(
        f"qwen-grpc, {results['model']['shape']} random weights, "
        f"{results['config']['prompt_tokens']}-token prompt, "
        f"{results['config']['max_new_tokens']} new tokens, {results['machine']['cores']} cores"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_views(results: dict[str, Any], out_dir: Path) -> str:
    """Markdown and PNG from a results dict; returns the Markdown."""
    markdown = render_markdown(results)
    (out_dir / "latest.md").write_text(markdown, "utf-8")
    try:
        render_plot(results, out_dir / "latest.png")
    except ImportError:
        _LOGGER.warning("matplotlib is not installed (pip install '.[bench]'); no plot written")
    return markdown


def write_results(results: dict[str, Any], out_dir: Path) -> str:
    """All three files; the JSON first, so a plotting failure never loses the numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    return write_views(results, out_dir)
