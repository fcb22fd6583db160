"""Fair and deadline-aware admission, through the real server.

A heavy client (``x-client-id: heavy``) keeps ``queued`` requests waiting beyond the full
batch: a closed loop of max_batch_size + queued calls of few new tokens each, so batch slots
turn over every few steps. A light client (``x-client-id: light``) then sends a few requests one
after another. First-come admission makes every light request wait for the whole backlog; fair
admission (turns per client) about one slot turnover. The yardstick is the same server with
the heavy client keeping the batch one short of full and nothing queued: the light client's
TTFT there is what joining a busy batch costs, without a queue.

With the backlog still queued, a heavy request whose deadline (its gRPC timeout) is a quarter
of the heavy client's measured queue wait cannot be met. A deadline-aware server answers it
DEADLINE_EXCEEDED at once; one that is not lets it wait until the deadline passes, and the
client's own timer answers (grpc's "Deadline Exceeded").
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from bench.prompts import BenchPrompt
from bench.stats import percentile
from harness.server_process import ServerProcess
from qwen_grpc.interceptors.base import CLIENT_ID_KEY
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls
from reliability.calls import CallOutcome
from reliability.stats import counts

_LOGGER = logging.getLogger(__name__)
HEAVY, LIGHT = "heavy", "light"
CLIENT_DEADLINE_MESSAGE = "Deadline Exceeded"
"""What grpc's client library says when its own deadline timer ends a call."""


@dataclass(frozen=True)
class FairSizes:
    queued: int
    heavy_new_tokens: int
    light_requests: int
    deadline_probes: int
    call_timeout_s: float


def _options(new_tokens: int) -> chat_pb2.GenerationOptions:
    return chat_pb2.GenerationOptions(greedy=True, max_new_tokens=new_tokens)


class ClosedLoop:
    """``workers`` threads of one client, each sending its next request when the last ends.

    Leaving the ``with`` block closes the client's channel, which cancels every call still
    running or queued. A worker whose call fails stops; its error is kept.
    """

    def __init__(
        self,
        address: str,
        client_id: str,
        prompts: Sequence[BenchPrompt],
        workers: int,
        new_tokens: int,
        timeout_s: float,
    ) -> None:
        self._channel = calls.open_channel(address)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._metadata = ((CLIENT_ID_KEY, client_id),)
        self._options = _options(new_tokens)
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.outcomes: list[CallOutcome] = []
        self._threads = [
            threading.Thread(
                target=self._work, args=(prompts[i % len(prompts)],), name=f"{client_id}-{i}"
            )
            for i in range(workers)
        ]

    def _work(self, prompt: BenchPrompt) -> None:
        while not self._stop.is_set():
            try:
                outcome = calls.stream(
                    self._stub,
                    calls.user_turn(prompt.text),
                    self._options,
                    timeout=self._timeout_s,
                    metadata=self._metadata,
                )
            except ValueError:  # the channel closed between two calls
                return
            if self._stop.is_set():
                return  # cut short by the end of the loop: not a sample
            with self._done:
                self.outcomes.append(outcome)
                self._done.notify_all()
            if not outcome.ok:
                _LOGGER.warning(
                    "%s: a call failed (%s: %s); this worker stops",
                    threading.current_thread().name,
                    outcome.code,
                    outcome.message,
                )
                return

    def wait_completed(self, count: int, timeout_s: float) -> None:
        """Until ``count`` calls have ended (the loop is in its steady state)."""
        with self._done:
            if not self._done.wait_for(lambda: len(self.outcomes) >= count, timeout_s):
                raise TimeoutError(f"{len(self.outcomes)} of {count} calls ended in {timeout_s} s")

    def queue_wait_s(self) -> float | None:
        """Median TTFT of the calls so far: how long a new call of this client waits."""
        with self._lock:
            ttfts = [o.ttft_seconds for o in self.outcomes if o.ttft_seconds is not None]
        return statistics.median(ttfts) if ttfts else None

    def summary(self) -> dict[str, Any]:
        with self._lock:
            outcomes = list(self.outcomes)
        ttfts = [1000 * o.ttft_seconds for o in outcomes if o.ttft_seconds is not None]
        return {
            "workers": len(self._threads),
            "calls": len(outcomes),
            "codes": counts(o.code for o in outcomes),
            "ttft_ms_p50": _round(percentile(ttfts, 50)),
            "ttft_ms_max": _round(max(ttfts, default=None)),
        }

    def __enter__(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._channel.close()
        for thread in self._threads:
            thread.join()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _light(
    address: str,
    prompts: Sequence[BenchPrompt],
    new_tokens: int,
    timeout_s: float,
    queue_depth: Callable[[], float],
) -> dict[str, Any]:
    """The light client's requests one after another, each with the queue depth it met."""
    outcomes: list[CallOutcome] = []
    depths: list[float] = []
    with calls.open_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for prompt in prompts:
            depths.append(queue_depth())
            outcomes.append(
                calls.stream(
                    stub,
                    calls.user_turn(prompt.text),
                    _options(new_tokens),
                    timeout=timeout_s,
                    metadata=((CLIENT_ID_KEY, LIGHT),),
                )
            )
    ttfts = [1000 * o.ttft_seconds for o in outcomes if o.ttft_seconds is not None]
    return {
        "codes": counts(o.code for o in outcomes),
        "ttft_ms": [_round(t) for t in ttfts],
        "ttft_ms_p50": _round(percentile(ttfts, 50)) if len(ttfts) == len(outcomes) else None,
        "queue_depth_at_send": depths,
    }


def _probe(address: str, prompt: BenchPrompt, new_tokens: int, deadline_s: float) -> dict[str, Any]:
    with calls.open_channel(address) as channel:
        outcome = calls.stream(
            chat_pb2_grpc.ChatServiceStub(channel),
            calls.user_turn(prompt.text),
            _options(new_tokens),
            timeout=deadline_s,
            metadata=((CLIENT_ID_KEY, HEAVY),),
        )
    by_client = outcome.code == "DEADLINE_EXCEEDED" and outcome.message == CLIENT_DEADLINE_MESSAGE
    return {
        "code": outcome.code,
        "message": outcome.message,
        "answered_by": "client deadline timer" if by_client else "server",
        "answer_ms": round(1000 * outcome.seconds, 3),
    }


def _deadline_probes(
    server: ServerProcess,
    heavy: ClosedLoop,
    prompt: BenchPrompt,
    sizes: FairSizes,
    min_deadline_s: float,
) -> dict[str, Any]:
    """Heavy requests with a quarter of the heavy client's queue wait as their deadline
    (at least three times the server's minimum, which it refuses outright)."""
    wait = heavy.queue_wait_s()
    if wait is None:
        raise RuntimeError("no heavy call has had a first token; the queue wait is unknown")
    deadline = max(wait / 4, 3 * min_deadline_s)
    probes = [
        _probe(server.address, prompt, sizes.heavy_new_tokens, deadline)
        for _ in range(sizes.deadline_probes)
    ]
    refused = [p["answer_ms"] for p in probes if p["code"] == "DEADLINE_EXCEEDED"]
    return {
        "heavy_queue_wait_ms": round(1000 * wait, 3),
        "deadline_ms": round(1000 * deadline, 3),
        "probes": probes,
        "codes": counts(p["code"] for p in probes),
        "answer_ms_p50": _round(statistics.median(refused)) if refused else None,
    }


def fair_admission(
    server: ServerProcess,
    heavy_prompts: Sequence[BenchPrompt],
    light_prompts: Sequence[BenchPrompt],
    sizes: FairSizes,
    max_batch_size: int,
    min_deadline_s: float,
) -> dict[str, Any]:
    """The light client beside a batch one short of full, then behind the heavy backlog,
    where the deadline probes run too."""

    def queue_depth() -> float:
        return server.metrics()["qwen_queue_depth"]

    def heavy(workers: int) -> ClosedLoop:
        return ClosedLoop(
            server.address,
            HEAVY,
            heavy_prompts,
            workers,
            sizes.heavy_new_tokens,
            sizes.call_timeout_s,
        )

    def light() -> dict[str, Any]:
        return _light(
            server.address, light_prompts, sizes.heavy_new_tokens, sizes.call_timeout_s, queue_depth
        )

    with heavy(max_batch_size - 1) as running:
        running.wait_completed(max_batch_size - 1, sizes.call_timeout_s)
        idle = light()
    idle["heavy"] = running.summary()
    server.idle_within(sizes.call_timeout_s)
    with heavy(max_batch_size + sizes.queued) as backlog:
        backlog.wait_completed(max_batch_size, sizes.call_timeout_s)
        loaded = light()
        deadline = _deadline_probes(server, backlog, heavy_prompts[0], sizes, min_deadline_s)
    loaded["heavy"] = backlog.summary()
    return {
        "max_batch_size": max_batch_size,
        "queued": sizes.queued,
        "heavy_new_tokens": sizes.heavy_new_tokens,
        "idle": idle,
        "loaded": loaded,
        "deadline": deadline,
    }
