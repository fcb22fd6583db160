"""One precision mode through the real server: every concurrency level, then the memory run.

The levels run idle-to-busy on one server process, so concurrency 1 measures an idle server
(the TTFT target is for an idle server). The memory run comes last and resets the kernel's
peak-RSS mark first, so its peak is memory while serving, not while loading.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import grpc_load, server_metrics
from bench.prompts import BenchPrompt
from bench.quiet import Quiet, measure_quietly
from bench.rss_sampler import RssSampler
from bench.stats import summarize
from harness.server_process import ServerProcess

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadPlan:
    """What to send: levels, how many requests, how long, and the memory run."""

    concurrency: tuple[int, ...]
    min_requests: int
    max_new_tokens: int
    rss_streams: int
    rss_new_tokens: int
    call_timeout_s: float
    server_args: tuple[str, ...] = ()
    quiet: Quiet = field(default_factory=Quiet)

    def requests_per_worker(self, concurrency: int) -> int:
        """Enough calls for ``min_requests`` samples at low concurrency, one each at high."""
        return max(1, math.ceil(self.min_requests / concurrency))


def _gb(value: int | None) -> float | None:
    return None if value is None else round(value / 1e9, 3)


def _level_record(result: grpc_load.LevelResult, per_worker: int) -> dict[str, Any]:
    origin = min((t.start for t in result.timings), default=0.0)
    return {
        "concurrency": result.concurrency,
        "requests_per_worker": per_worker,
        "summary": summarize(result.timings, result.wall_s),
        "errors": result.errors,
        "streams": [t.to_dict(origin) for t in result.timings],
    }


def bench_server(
    model_dir: Path,
    dtype: str | None,
    prompts: Sequence[BenchPrompt],
    plan: LoadPlan,
    cache_dir: Path,
    log_path: Path,
) -> dict[str, Any]:
    """Starts a server in ``dtype`` (``None``: its default), drives it, stops it."""
    dtype_args = () if dtype is None else ("--dtype", dtype)
    with ServerProcess(
        str(model_dir),
        log_path,
        cache_dir=cache_dir,
        extra_args=(*dtype_args, *plan.server_args),
        log_level="WARNING",
        startup_timeout=900.0,
    ) as server:
        info = grpc_load.model_info(server.address)
        record: dict[str, Any] = {
            "dtype": info.dtype,
            "server": {
                "command": server.command,
                "load_s": round(server.load_s or 0.0, 2),
                "rss_after_load_gb": _gb(server.rss_bytes()),
                "peak_rss_loading_gb": _gb(server.peak_rss_bytes()),
                "log": str(log_path),
            },
            "levels": [],
        }
        grpc_load.warm_up(server.address, prompts[0], plan.call_timeout_s)
        for concurrency in plan.concurrency:
            per_worker = plan.requests_per_worker(concurrency)
            _LOGGER.info(
                "%s: concurrency %d, %d request(s) per stream", info.dtype, concurrency, per_worker
            )
            level = _measured_level(
                server, prompts, plan, concurrency, per_worker, plan.max_new_tokens
            )
            _LOGGER.info(
                "%s: concurrency %d: %s", info.dtype, concurrency, _brief(level["summary"])
            )
            record["levels"].append(level)
        if plan.rss_streams > 0:
            record["rss_run"] = rss_run(server, prompts, plan, info.dtype)
    return record


def _measured_level(
    server: ServerProcess,
    prompts: Sequence[BenchPrompt],
    plan: LoadPlan,
    concurrency: int,
    per_worker: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """One level, with the server's step profile, redone if the machine was too busy."""

    def measure() -> dict[str, Any]:
        before = server_metrics.scrape(server.metrics_port)
        result = grpc_load.run_level(
            server.address, prompts, concurrency, per_worker, max_new_tokens, plan.call_timeout_s
        )
        level = _level_record(result, per_worker)
        level["server_steps"] = server_metrics.step_profile(
            before, server_metrics.scrape(server.metrics_port), result.wall_s
        )
        return level

    measured = measure_quietly(f"concurrency {concurrency}", measure, plan.quiet)
    return {
        **measured.value,
        "cpu_stall_share": measured.stall_share,
        "attempts": measured.attempts,
        "waited_for_quiet_s": measured.waited_s,
    }


def rss_run(
    server: ServerProcess, prompts: Sequence[BenchPrompt], plan: LoadPlan, dtype: str
) -> dict[str, Any]:
    """``rss_streams`` concurrent streams of ``rss_new_tokens`` tokens, peak RSS watched."""
    _LOGGER.info(
        "%s: memory run, %d streams x %d tokens", dtype, plan.rss_streams, plan.rss_new_tokens
    )
    reset = server.reset_peak_rss()
    with RssSampler(server.pid) as sampler:
        level = _measured_level(server, prompts, plan, plan.rss_streams, 1, plan.rss_new_tokens)
    peak = server.peak_rss_bytes()
    _LOGGER.info("%s: memory run: %s, peak RSS %s GB", dtype, _brief(level["summary"]), _gb(peak))
    level.pop("requests_per_worker", None)
    return {
        **level,
        "max_new_tokens": plan.rss_new_tokens,
        "peak_rss_bytes": peak,
        "peak_rss_gb": _gb(peak),
        "peak_rss_source": "VmHWM reset before the run" if reset else "VmHWM since start",
        "sampled_peak_rss_gb": _gb(sampler.peak_bytes),
        "rss_samples": sampler.samples,
    }


def _brief(summary: dict[str, Any]) -> str:
    return (
        f"TTFT p50 {summary['ttft_ms_p50']} ms p95 {summary['ttft_ms_p95']} ms, "
        f"per-stream {summary['decode_tok_s_p50']} tok/s, "
        f"aggregate decode {summary['aggregate_decode_tok_s']} tok/s"
    )
