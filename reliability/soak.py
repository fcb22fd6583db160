"""Soak: many short requests, resident memory measured as they accumulate.

A leak per request (a cache entry never evicted, a handle never freed, a log buffer) is
invisible in one call and fatal after a day. Memory is read after every chunk of requests,
with the server idle, so the figure is what stays behind rather than what is in flight; the
baseline is taken after the first chunk, once allocators and lazy initialisation have settled.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from harness.server_process import ServerProcess
from qwen_grpc.v1 import chat_pb2_grpc
from reliability import calls, workload
from reliability.calls import CallOutcome
from reliability.report import ScenarioResult
from reliability.stats import counts

_LOGGER = logging.getLogger(__name__)
_MIB = 1 << 20


@dataclass(frozen=True)
class SoakPlan:
    requests: int = 1_000
    baseline: int = 100
    """Requests before the baseline reading (also the chunk size between readings)."""
    concurrency: int = 8
    max_new_tokens: int = 8
    max_growth: float = 0.05
    call_timeout_seconds: float = 60.0
    seed: int = 0


def run_soak(server: ServerProcess, plan: SoakPlan) -> ScenarioResult:
    """Sends ``plan.requests`` short calls in chunks of ``plan.baseline``, reading RSS after each."""
    local = threading.local()
    channels: list[grpc.Channel] = []

    def one(index: int) -> CallOutcome:
        if not hasattr(local, "stub"):
            channel = calls.open_channel(server.address)
            channels.append(channel)
            local.stub = chat_pb2_grpc.ChatServiceStub(channel)
        rng = random.Random(plan.seed * 1_000_003 + index)
        call = calls.chat if index % 2 == 0 else calls.stream
        return call(
            local.stub,
            workload.conversation(rng),
            workload.options(rng, plan.max_new_tokens),
            timeout=plan.call_timeout_seconds,
        )

    outcomes: list[CallOutcome] = []
    rss_mib: dict[int, float] = {}
    with ThreadPoolExecutor(plan.concurrency, thread_name_prefix="soak") as pool:
        for start in range(0, plan.requests, plan.baseline):
            outcomes.extend(pool.map(one, range(start, min(start + plan.baseline, plan.requests))))
            server.idle_within(10.0)
            time.sleep(0.2)  # let the server's threads return what they free
            rss_mib[len(outcomes)] = round(server.rss_bytes() / _MIB, 1)
            _LOGGER.info("soak: %d requests, RSS %.1f MiB", len(outcomes), rss_mib[len(outcomes)])
    for channel in channels:
        channel.close()
    baseline = rss_mib[min(plan.baseline, len(outcomes))]
    final = rss_mib[len(outcomes)]
    growth = final / baseline - 1
    failed = [o for o in outcomes if not o.ok]
    figures = {
        "requests": len(outcomes),
        "concurrency": plan.concurrency,
        "max_new_tokens": plan.max_new_tokens,
        "codes": counts(o.code for o in outcomes),
        "rss_mib_by_requests": rss_mib,
        "rss_growth_percent": round(growth * 100, 2),
        "peak_rss_mib": max(rss_mib.values()),
    }
    checks = {
        "every request answered OK": not failed and len(outcomes) == plan.requests,
        f"RSS after {len(outcomes)} requests within {plan.max_growth:.0%} of RSS after "
        f"{plan.baseline}": growth <= plan.max_growth,
    }
    summary = (
        f"RSS {baseline:.0f} MiB after {plan.baseline} requests, {final:.0f} MiB after "
        f"{len(outcomes):,} ({growth * 100:+.1f} %); {len(failed)} failed"
    )
    return ScenarioResult("soak", summary, checks, figures)
