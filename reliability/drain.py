"""Drain: SIGTERM with streams in flight, as in every rolling update.

Kubernetes sends SIGTERM and stops routing to the pod once its readiness probe fails. The
server must report NOT_SERVING at once (so traffic moves away), let every in-flight stream
finish, and exit 0 before the grace period ends (else it is SIGKILLed and the streams are cut).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from harness.server_process import ServerProcess
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls
from reliability.report import ScenarioResult
from reliability.stats import counts, rounded
from reliability.watch import HealthWatch

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainPlan:
    streams: int = 8
    max_new_tokens: int = 192
    grace_seconds: float = 30.0
    drain_delay_seconds: float = 1.0
    poll_seconds: float = 0.05
    stream_timeout_seconds: float = 120.0

    def server_args(self) -> tuple[str, ...]:
        return (
            *("--grace-seconds", str(self.grace_seconds)),
            *("--drain-delay-seconds", str(self.drain_delay_seconds)),
        )


def _truthful(watch: HealthWatch) -> bool:
    """NOT_SERVING was seen, and SERVING never again once it had been."""
    statuses = watch.statuses
    if "NOT_SERVING" not in statuses:
        return False
    return "SERVING" not in statuses[statuses.index("NOT_SERVING") :]


def run_drain(server: ServerProcess, plan: DrainPlan) -> ScenarioResult:
    """Starts the streams, waits until each has produced text, sends SIGTERM, watches."""
    started = [threading.Event() for _ in range(plan.streams)]
    watch = HealthWatch(server.address, plan.poll_seconds)
    with ThreadPoolExecutor(plan.streams) as pool:

        def one(index: int) -> tuple[calls.CallOutcome, float]:
            with calls.open_channel(server.address) as channel:
                outcome = calls.stream(
                    chat_pb2_grpc.ChatServiceStub(channel),
                    calls.user_turn(f"Write a long story about lighthouse number {index + 1}."),
                    chat_pb2.GenerationOptions(greedy=True, max_new_tokens=plan.max_new_tokens),
                    timeout=plan.stream_timeout_seconds,
                    first_delta=started[index],
                )
            return outcome, time.monotonic()

        futures = [pool.submit(one, i) for i in range(plan.streams)]
        for event in started:
            event.wait(plan.stream_timeout_seconds)
        in_flight = sum(e.is_set() and not f.done() for e, f in zip(started, futures, strict=True))
        _LOGGER.info("drain: SIGTERM with %d streams in flight", in_flight)
        watch.start()
        server.sigterm()
        exit_limit = plan.drain_delay_seconds + plan.grace_seconds
        code = server.wait_exit(exit_limit + 30)
        exit_seconds = time.monotonic() - watch.since
        results = [future.result() for future in futures]
    watch.stop()
    outcomes = [outcome for outcome, _ in results]
    completed = sum(o.ok for o in outcomes)
    ended_after_delay = sum(ended - watch.since > plan.drain_delay_seconds for _, ended in results)
    figures = {
        "streams": plan.streams,
        "in_flight_at_sigterm": in_flight,
        "completed": completed,
        "codes": counts(o.code for o in outcomes),
        "ended_after_the_drain_delay": ended_after_delay,
        "completion_tokens": [o.completion_tokens for o in outcomes],
        "health_after_sigterm": watch.runs(),
        "exit_code": code,
        "exit_seconds": rounded(exit_seconds, 2),
        "drain_delay_seconds": plan.drain_delay_seconds,
        "grace_seconds": plan.grace_seconds,
    }
    checks = {
        f"all {plan.streams} streams in flight at SIGTERM": in_flight == plan.streams,
        "all of them still running when the server stopped taking calls (after the "
        "drain delay)": ended_after_delay == plan.streams,
        f"all {plan.streams} streams completed with their final message": completed == plan.streams,
        "health NOT_SERVING during the drain, never SERVING again": _truthful(watch),
        "exit code 0": code == 0,
        f"exit within the drain delay and grace ({exit_limit:g} s)": code is not None
        and exit_seconds <= exit_limit,
    }
    first_not_serving = next((r for r in watch.runs() if r["status"] == "NOT_SERVING"), None)
    summary = (
        f"SIGTERM with {in_flight}/{plan.streams} streams in flight: {completed} completed "
        f"({ended_after_delay} after the {plan.drain_delay_seconds:g} s drain delay); health "
        + (
            f"NOT_SERVING from +{first_not_serving['from_seconds']} s"
            if first_not_serving
            else "never NOT_SERVING"
        )
        + f"; exit {code} after {exit_seconds:.1f} s (grace {plan.grace_seconds:g} s)"
    )
    return ScenarioResult("drain", summary, checks, figures)
