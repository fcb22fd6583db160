"""Load: many clients mixing Chat and StreamChat for a fixed time; nothing may be lost.

A call is lost when it ends with a status a healthy, correctly sized service should never send
to well-formed requests (anything but OK, or RESOURCE_EXHAUSTED when it sheds load), when an
OK answer is not whole, or when it never ends at all. A crash is a server process that exited
or stopped reporting SERVING.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

from harness.server_process import ServerProcess
from qwen_grpc.v1 import chat_pb2_grpc
from reliability import calls, workload
from reliability.calls import CHAT, STREAM, CallOutcome
from reliability.report import ScenarioResult
from reliability.stats import counts, percentile, rounded

_LOGGER = logging.getLogger(__name__)
EXPECTED_CODES = frozenset({"OK", "RESOURCE_EXHAUSTED"})
SHED_BACKOFF_SECONDS = 1.0  # the server's retry hint for a full concurrency cap or queue


@dataclass(frozen=True)
class LoadPlan:
    """How hard and how long to push."""

    clients: int = 32
    seconds: float = 180.0
    min_new_tokens: int = 8
    max_new_tokens: int = 64
    call_timeout_seconds: float = 120.0
    seed: int = 0


def _client(
    index: int, server: ServerProcess, plan: LoadPlan, stop_at: float, out: list[CallOutcome]
) -> None:
    """One caller: back-to-back calls, backing off only when the server sheds load."""
    rng = random.Random(plan.seed * 1_000 + index)
    with calls.open_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        while time.monotonic() < stop_at:
            call = calls.chat if rng.random() < 0.5 else calls.stream
            outcome = call(
                stub,
                workload.conversation(rng),
                workload.options(rng, rng.randint(plan.min_new_tokens, plan.max_new_tokens)),
                timeout=plan.call_timeout_seconds,
            )
            out.append(outcome)
            if outcome.code == "RESOURCE_EXHAUSTED":
                time.sleep(SHED_BACKOFF_SECONDS)


def _latency(outcomes: list[CallOutcome], method: str) -> dict[str, float | None]:
    seconds = [o.seconds for o in outcomes if o.ok and o.method == method]
    return {"p50": rounded(percentile(seconds, 50)), "p99": rounded(percentile(seconds, 99))}


def run_load(server: ServerProcess, plan: LoadPlan) -> ScenarioResult:
    """Runs ``plan.clients`` callers for ``plan.seconds`` and judges every call."""
    _LOGGER.info("load: %d clients for %.0f s", plan.clients, plan.seconds)
    outcomes: list[CallOutcome] = []
    started = time.monotonic()
    stop_at = started + plan.seconds
    threads = [
        threading.Thread(
            target=_client, args=(i, server, plan, stop_at, outcomes), name=f"load-{i}", daemon=True
        )
        for i in range(plan.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, stop_at - time.monotonic()) + plan.call_timeout_seconds + 10)
    wall = time.monotonic() - started
    hung = sum(thread.is_alive() for thread in threads)
    unexpected = [o for o in outcomes if o.code not in EXPECTED_CODES]
    lost = len(unexpected) + hung
    alive = server.alive
    health = server.health() if alive else "EXITED"
    idle = server.idle_within(10.0) if alive else None
    tokens = sum(o.completion_tokens for o in outcomes if o.ok)
    ttfts = [o.ttft_seconds for o in outcomes if o.ok and o.ttft_seconds is not None]
    by_method = counts(o.method for o in outcomes)
    error_logs = server.error_log_lines()
    crashes = 0 if alive and health == "SERVING" else 1
    latency = {CHAT: _latency(outcomes, CHAT), STREAM: _latency(outcomes, STREAM)}
    ttft = {"p50": rounded(percentile(ttfts, 50)), "p99": rounded(percentile(ttfts, 99))}
    tokens_per_second = tokens / wall
    figures = {
        "clients": plan.clients,
        "seconds": round(wall, 1),
        "calls": len(outcomes),
        "calls_by_method": by_method,
        "codes": counts(o.code for o in outcomes),
        "lost_calls": lost,
        "hung_clients": hung,
        "crashes": crashes,
        "health_after": health,
        "latency_seconds": latency,
        "ttft_seconds": ttft,
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens_per_second, 1),
        "idle_after_seconds": rounded(idle),
        "server_error_log_lines": error_logs,
    }
    checks = {
        "no crash: the server process is alive and SERVING afterwards": crashes == 0,
        "no lost call: every call ended OK (whole answer) or RESOURCE_EXHAUSTED": lost == 0,
        "calls were answered": any(o.ok for o in outcomes),
        "no ERROR in the server log": error_logs == 0,
        "no sequence left running or queued afterwards": idle is not None,
    }
    summary = (
        f"{len(outcomes):,} calls ({by_method.get(CHAT, 0):,} Chat / "
        f"{by_method.get(STREAM, 0):,} StreamChat) from {plan.clients} clients in {wall:.0f} s; "
        f"{lost} lost, {crashes} crashes; latency p50/p99 Chat "
        f"{latency[CHAT]['p50']}/{latency[CHAT]['p99']} s, StreamChat "
        f"{latency[STREAM]['p50']}/{latency[STREAM]['p99']} s; "
        f"TTFT p50/p99 {ttft['p50']}/{ttft['p99']} s; {tokens_per_second:.0f} tokens/s"
    )
    return ScenarioResult("load", summary, checks, figures)
