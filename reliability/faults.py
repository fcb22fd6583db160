"""Faults: callers that walk away, run out of time or die, and a sequence that blows up.

Each phase runs next to :class:`~reliability.bystanders.Bystanders` whose answers must not
change, and ends by checking the engine is idle again (active sequences and queue depth 0 on
the metrics endpoint) within far fewer decode steps than the abandoned streams would have
taken: a fault must cost its own call and nothing else, and must not leave work running for
nobody. Counting steps rather than seconds keeps the verdict independent of the machine's
speed. The server is :mod:`reliability.faulty_server` on the tiny model.

1. cancel: streams cancelled by the client after a few deltas;
2. deadline: streams whose deadline expires mid-generation;
3. killed clients: client processes SIGKILLed mid-stream (no cancel is ever sent);
4. injected exception mid-stream: one sequence's sampler raises at its 4th token;
5. injected exception at the first token: the same, in the prefill that admits the sequence;
6. injected failure of a prefill forward pass while other sequences decode. The calls in that
   very pass cannot be told apart and fail with it, so this phase runs without bystanders (none
   can join the poisoned prefill) and checks that the running batch is untouched.

Finally the server must still be SERVING, and must exit 0 on SIGTERM within its grace period.
"""

from __future__ import annotations

import logging
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from harness.server_process import REPO_ROOT, ServerProcess
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls, doomed_client
from reliability.bystanders import Bystanders, Reference
from reliability.faulty_server import PREFILL_FAULT_SEED, fault_seed
from reliability.report import ScenarioResult
from reliability.stats import counts, rounded

_LOGGER = logging.getLogger(__name__)
LONG_STREAM_TOKENS = doomed_client.MAX_NEW_TOKENS
# Orphaned work would keep the engine busy for about LONG_STREAM_TOKENS decode steps; a fault
# handled right leaves it idle in far fewer (the bystanders' last calls), on any machine.
MAX_STEPS_TO_IDLE = LONG_STREAM_TOKENS // 2
DRAIN_DELAY_SECONDS = 0.2
ENGINE_STOP_SECONDS = 5.0  # Engine.stop's join timeout, the last step of a drain
CLIENT_READY_SECONDS = 60.0  # a fresh Python process importing grpc, on a busy machine


@dataclass(frozen=True)
class FaultPlan:
    """How many of each fault, and how slow each decode step is made."""

    cancelled_streams: int = 100
    cancel_concurrency: int = 10
    deadline_streams: int = 20
    deadline_concurrency: int = 5
    killed_clients: int = 4
    neighbours: int = 3
    bystander_threads: int = 2
    step_delay_seconds: float = 0.01
    idle_within_seconds: float = 30.0
    call_timeout_seconds: float = 10.0
    grace_seconds: float = 5.0
    """Short, so a server that cannot exit shows quickly."""
    seed: int = 0

    @property
    def exit_within_seconds(self) -> float:
        """SIGTERM to exit: the drain delay, the grace for calls, the engine thread's stop."""
        return DRAIN_DELAY_SECONDS + self.grace_seconds + ENGINE_STOP_SECONDS

    def server_args(self) -> tuple[str, ...]:
        """Flags for :mod:`reliability.faulty_server`."""
        return (
            *("--step-delay-seconds", str(self.step_delay_seconds)),
            *("--grace-seconds", str(self.grace_seconds)),
            *("--drain-delay-seconds", str(DRAIN_DELAY_SECONDS)),
        )


@dataclass
class _Phase:
    figures: dict[str, Any]
    checks: dict[str, bool]
    since_steps: int | None = None
    """Decode-step count to measure the way back to idle from (default: the phase's end)."""


def _long_stream() -> tuple[list[chat_pb2.Message], chat_pb2.GenerationOptions]:
    """A stream that would run for seconds: whatever ends it early is the fault under test."""
    return calls.user_turn("Tell me a long story."), chat_pb2.GenerationOptions(
        greedy=True, max_new_tokens=LONG_STREAM_TOKENS
    )


def _cancel(stub: chat_pb2_grpc.ChatServiceStub, plan: FaultPlan) -> _Phase:
    rng = random.Random(plan.seed)
    messages, options = _long_stream()
    with ThreadPoolExecutor(plan.cancel_concurrency) as pool:
        outcomes = list(
            pool.map(
                lambda after: calls.stream(
                    stub, messages, options, timeout=plan.call_timeout_seconds, cancel_after=after
                ),
                [rng.randint(1, 5) for _ in range(plan.cancelled_streams)],
            )
        )
    cancelled = sum(o.code == "CANCELLED" for o in outcomes)
    return _Phase(
        {"streams": len(outcomes), "codes": counts(o.code for o in outcomes)},
        {f"all {len(outcomes)} streams cancelled mid-flight": cancelled == len(outcomes)},
    )


def _deadline(stub: chat_pb2_grpc.ChatServiceStub, plan: FaultPlan) -> _Phase:
    rng = random.Random(plan.seed + 1)
    messages, options = _long_stream()
    with ThreadPoolExecutor(plan.deadline_concurrency) as pool:
        outcomes = list(
            pool.map(
                lambda timeout: calls.stream(stub, messages, options, timeout=timeout),
                [rng.uniform(0.5, 1.5) for _ in range(plan.deadline_streams)],
            )
        )
    expired = [o for o in outcomes if o.code == "DEADLINE_EXCEEDED"]
    return _Phase(
        {
            "streams": len(outcomes),
            "codes": counts(o.code for o in outcomes),
            "expired_mid_stream": sum(o.deltas > 0 for o in expired),
        },
        {
            f"all {len(outcomes)} streams ended DEADLINE_EXCEEDED": len(expired) == len(outcomes),
            "deadlines expired mid-stream": any(o.deltas > 0 for o in expired),
        },
    )


def _wait_ready(process: subprocess.Popen[str], timeout: float) -> bool:
    """Whether the client printed its ready line within ``timeout``."""
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    return bool(readable) and process.stdout.readline().strip() == doomed_client.READY


def _killed_clients(server: ServerProcess, plan: FaultPlan) -> _Phase:
    """Starts the clients and SIGKILLs them once all of them stream."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "reliability.doomed_client", server.address],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(plan.killed_clients)
    ]
    try:
        streaming = sum(_wait_ready(p, CLIENT_READY_SECONDS) for p in processes)
    finally:
        for process in processes:
            process.kill()
        killed_at_step = server.decode_steps()
        for process in processes:
            process.wait()
    return _Phase(
        {"clients": len(processes), "streaming_when_killed": streaming},
        {f"all {len(processes)} clients were streaming when killed": streaming == len(processes)},
        since_steps=killed_at_step,
    )


def _injected(
    stub: chat_pb2_grpc.ChatServiceStub, plan: FaultPlan, reference: Reference, seed: int
) -> _Phase:
    """One stream marked by ``seed`` fails while neighbour streams are mid-flight."""
    started = [threading.Event() for _ in range(plan.neighbours)]
    with ThreadPoolExecutor(plan.neighbours) as pool:
        futures = [
            pool.submit(
                calls.stream,
                stub,
                reference.messages,
                reference.options,
                timeout=plan.call_timeout_seconds,
                first_delta=event,
            )
            for event in started
        ]
        for event in started:
            event.wait(plan.call_timeout_seconds)
        in_flight = sum(
            event.is_set() and not f.done() for event, f in zip(started, futures, strict=True)
        )
        fault = calls.stream(
            stub,
            calls.user_turn("Please fail."),
            chat_pb2.GenerationOptions(greedy=True, max_new_tokens=64, seed=seed),
            timeout=plan.call_timeout_seconds,
        )
        neighbours = [future.result() for future in futures]
    damaged = [n for n in neighbours if reference.damaged(n)]
    return _Phase(
        {
            "fault_code": fault.code,
            "neighbours_in_flight": in_flight,
            "neighbours_damaged": len(damaged),
            "neighbour_codes": counts(n.code for n in neighbours),
        },
        {
            "the faulty call ended INTERNAL": fault.code == "INTERNAL",
            f"all {len(neighbours)} neighbour streams in flight during the fault": in_flight
            == len(neighbours),
            "every neighbour stream ended OK with its reference answer": not damaged,
        },
    )


def run_faults(server: ServerProcess, plan: FaultPlan) -> ScenarioResult:
    """Runs the six fault phases, then checks health and a clean SIGTERM exit."""
    figures: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    with calls.open_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        reference = Reference.measure(
            stub,
            calls.user_turn("Tell me a long story."),
            chat_pb2.GenerationOptions(greedy=True, max_new_tokens=48),
            plan.call_timeout_seconds,
        )
        phases: list[tuple[str, Callable[[], _Phase], int]] = [
            ("cancel", lambda: _cancel(stub, plan), plan.bystander_threads),
            ("deadline", lambda: _deadline(stub, plan), plan.bystander_threads),
            ("killed_clients", lambda: _killed_clients(server, plan), plan.bystander_threads),
            (
                "exception_mid_stream",
                lambda: _injected(stub, plan, reference, fault_seed(3)),
                plan.bystander_threads,
            ),
            (
                "exception_first_token",
                lambda: _injected(stub, plan, reference, fault_seed(0)),
                plan.bystander_threads,
            ),
            (
                "failed_prefill_forward_pass",
                lambda: _injected(stub, plan, reference, PREFILL_FAULT_SEED),
                0,
            ),
        ]
        for name, action, bystander_threads in phases:
            _LOGGER.info("faults: %s", name)
            with Bystanders(
                server.address, reference, bystander_threads, plan.call_timeout_seconds
            ) as bystanders:
                phase = action()
            since = server.decode_steps() if phase.since_steps is None else phase.since_steps
            idle = server.idle_within(plan.idle_within_seconds) if server.alive else None
            steps = server.decode_steps() - since if server.alive else None
            phase.figures["idle_after_seconds"] = rounded(idle)
            phase.figures["decode_steps_to_idle"] = steps
            if bystander_threads:
                phase.figures["bystanders"] = bystanders.report()
                phase.checks["bystander calls unaffected"] = bystanders.unaffected
            phase.checks[f"active sequences back to 0 within {MAX_STEPS_TO_IDLE} decode steps"] = (
                idle is not None and steps is not None and steps < MAX_STEPS_TO_IDLE
            )
            figures[name] = phase.figures
            checks.update({f"{name}: {check}": held for check, held in phase.checks.items()})
    alive = server.alive
    figures["health_after"] = server.health() if alive else "EXITED"
    checks["server alive and SERVING after every fault"] = figures["health_after"] == "SERVING"
    figures.update(_sigterm_exit(server, plan.exit_within_seconds))
    checks[f"exit 0 within {plan.exit_within_seconds:g} s of SIGTERM"] = figures["exit_code"] == 0
    failed = sorted({name.split(":")[0] for name, held in checks.items() if not held})
    summary = (
        f"{plan.cancelled_streams} streams cancelled, {plan.deadline_streams} expired, "
        f"{plan.killed_clients} clients killed, 3 failures injected; "
        + (
            "every other call unaffected, 0 active sequences after each"
            if not failed
            else "failed: " + ", ".join(failed)
        )
    )
    return ScenarioResult("faults", summary, checks, figures)


def _sigterm_exit(server: ServerProcess, within: float) -> dict[str, Any]:
    """SIGTERM after the faults: a server holding stuck calls would not exit."""
    if not server.alive:
        return {"exit_code": server.process.returncode, "exit_seconds": None}
    started = time.monotonic()
    server.sigterm()
    code = server.wait_exit(within)
    seconds = time.monotonic() - started
    if code is None:
        _LOGGER.warning("the server did not exit %.0f s after SIGTERM; killing it", seconds)
        server.kill()
    return {"exit_code": code, "exit_seconds": rounded(seconds, 2)}
