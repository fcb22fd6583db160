"""Bad input: hundreds of generated malformed requests, each refused cleanly, none fatal.

Clean means INVALID_ARGUMENT (the caller's mistake, with the field named) or RESOURCE_EXHAUSTED
(too big to even read). INTERNAL or UNKNOWN would mean the request reached code that did not
expect it; a dead or NOT_SERVING server afterwards would mean one caller can take the service
down for all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.strategies import SearchStrategy

from harness.server_process import ServerProcess
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls
from reliability.calls import STREAM
from reliability.malformed import Malformed, malformed_requests
from reliability.report import ScenarioResult
from reliability.stats import counts

_LOGGER = logging.getLogger(__name__)
CLEAN_REFUSALS = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})
_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@dataclass(frozen=True)
class BadInputPlan:
    examples: int = 250
    seed: int = 0
    call_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class _Answer:
    case: Malformed
    code: str
    seconds: float


def send(channel: grpc.Channel, case: Malformed, timeout: float) -> str:
    """Sends the raw bytes to the method and returns the status code name."""
    path = f"/{_SERVICE}/{case.method}"
    try:
        if case.method == STREAM:
            for _ in channel.unary_stream(path)(case.payload, timeout=timeout):
                pass
        else:
            channel.unary_unary(path)(case.payload, timeout=timeout)
    except grpc.RpcError as error:
        return str(error.code().name)
    return "OK"


def _generate(
    strategy: SearchStrategy[Malformed], examples: int, seed: int, act: Callable[[Malformed], None]
) -> None:
    """Lets hypothesis draw ``examples`` cases; nothing is shrunk, every case is kept."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: Malformed) -> None:
        act(case)

    run()


def run_bad_input(server: ServerProcess, plan: BadInputPlan) -> ScenarioResult:
    """Sends generated malformed requests one by one, then checks the server still serves."""
    answers: list[_Answer] = []
    with calls.open_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        limits = stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=10).limits

        def act(case: Malformed) -> None:
            started = time.monotonic()
            code = send(channel, case, plan.call_timeout_seconds)
            answers.append(_Answer(case, code, time.monotonic() - started))

        strategies = malformed_requests(limits)
        per_category = math.ceil(plan.examples / len(strategies))
        _LOGGER.info("bad input: %d categories of %d requests", len(strategies), per_category)
        for strategy in strategies.values():
            _generate(strategy, per_category, plan.seed, act)
        alive = server.alive
        health = server.health() if alive else "EXITED"
        valid_after = (
            calls.chat(
                stub,
                calls.user_turn("Still there?"),
                chat_pb2.GenerationOptions(max_new_tokens=4),
                timeout=plan.call_timeout_seconds,
            ).code
            if alive
            else "EXITED"
        )
    unclean = [a for a in answers if a.code not in CLEAN_REFUSALS]
    by_category = {
        category: counts(a.code for a in answers if a.case.category == category)
        for category in dict.fromkeys(a.case.category for a in answers)
    }
    error_logs = server.error_log_lines()
    codes = counts(a.code for a in answers)
    figures = {
        "requests": len(answers),
        "categories": len(by_category),
        "codes": codes,
        "codes_by_category": by_category,
        "unclean_examples": [
            {"category": a.case.category, "method": a.case.method, "code": a.code}
            for a in unclean[:10]
        ],
        "slowest_refusal_seconds": round(max((a.seconds for a in answers), default=0.0), 3),
        "health_after": health,
        "valid_call_after": valid_after,
        "server_error_log_lines": error_logs,
    }
    checks = {
        f"at least {plan.examples} malformed requests sent": len(answers) >= plan.examples,
        "every one refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED": not unclean,
        "server alive and SERVING afterwards": alive and health == "SERVING",
        "a valid call is still answered OK": valid_after == "OK",
        "no ERROR in the server log": error_logs == 0,
    }
    summary = (
        f"{len(answers)} malformed requests in {len(by_category)} categories: "
        + ", ".join(f"{n} {code}" for code, n in codes.items())
        + (
            f" (unclean: {', '.join(sorted({a.case.category for a in unclean}))})"
            if unclean
            else ""
        )
        + f"; {health} afterwards"
    )
    return ScenarioResult("bad_input", summary, checks, figures)
