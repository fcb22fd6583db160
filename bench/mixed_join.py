"""A long prompt joins running streams, through the real server: the streams' gaps between
tokens, the long prompt's TTFT, and the server's peak memory meanwhile.

The streams start together; once every one streams and the engine has run ``steady_steps``
more decode steps (the engine's clock, not the wall's), the long prompt is sent. An engine that
prefills it in one pass stalls every stream for the whole prefill; one that prefills it in
chunks between decode steps keeps their gaps near one step and pays with a somewhat later first
token. The streams are cancelled (their channel closed) once the long prompt's answer is whole,
so the run lasts as long as the long prompt needs, not the streams' token cap.

A server may also hold the long prompt back (a KV budget that counts it as too large beside
the streams): then it would only start once the streams end, which measures nothing. When it
is still queued ``queued_after_steps`` decode steps after it was sent, the run gives up and
says so (:attr:`JoinRun.queued`).
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

from bench.prompts import BenchPrompt
from bench.rss_sampler import RssSampler
from bench.stats import percentile
from harness.server_process import ServerProcess
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls
from reliability.calls import CallOutcome
from reliability.stats import counts

_POLL_S = 0.2
_GENERATED = "qwen_generated_tokens_total"


@dataclass(frozen=True)
class JoinSizes:
    """How long each side generates and how patiently the run waits."""

    stream_new_tokens: int
    long_new_tokens: int
    steady_steps: int
    queued_after_steps: int
    call_timeout_s: float


@dataclass(frozen=True)
class JoinRun:
    """What the client saw, and the server's memory over the run."""

    streams: list[CallOutcome]
    long: CallOutcome
    sent_at: float
    """``time.monotonic()`` when the long prompt was sent (the streams' ``delta_times`` clock)."""
    queued: bool
    generated_tokens: int
    """Tokens the server generated over the run (its Prometheus counter)."""
    peak_rss_bytes: int
    peak_rss_source: str
    sampled_peak_rss_bytes: int
    rss_samples: int


def _call(
    stub: chat_pb2_grpc.ChatServiceStub,
    prompt: BenchPrompt,
    new_tokens: int,
    timeout_s: float,
    first_delta: threading.Event | None = None,
) -> CallOutcome:
    options = chat_pb2.GenerationOptions(greedy=True, max_new_tokens=new_tokens)
    return calls.stream(
        stub, calls.user_turn(prompt.text), options, timeout=timeout_s, first_delta=first_delta
    )


def _wait_streaming(events: Sequence[threading.Event], futures: Sequence[Future[Any]]) -> None:
    """Until every stream has its first token; a stream that ended before is an error."""
    while not all(event.is_set() for event in events):
        ended = [f.result() for e, f in zip(events, futures, strict=True) if f.done()]
        if ended:
            raise RuntimeError(
                f"{len(ended)} stream(s) ended before all streamed: "
                f"{counts(o.code for o in ended)} {ended[0].message}"
            )
        time.sleep(0.02)


def _wait_steps(server: ServerProcess, steps: int) -> None:
    target = server.decode_steps() + steps
    while server.decode_steps() < target:
        time.sleep(_POLL_S / 4)


def _held_back(server: ServerProcess, call: Future[CallOutcome], patience_steps: int) -> bool:
    """Waits for the long call's answer; ``True`` if it sat in the queue while the batch ran
    ``patience_steps`` decode steps without it."""
    started = server.decode_steps()
    while not wait_futures([call], timeout=_POLL_S).done:
        if (
            server.metrics()["qwen_queue_depth"] >= 1
            and server.decode_steps() - started >= patience_steps
        ):
            return True
    return False


def join_streams(
    server: ServerProcess,
    streams: Sequence[BenchPrompt],
    long: BenchPrompt,
    sizes: JoinSizes,
) -> JoinRun:
    """Runs the streams, sends ``long`` once they are steady, ends the streams after it."""
    generated_before = server.metrics()[_GENERATED]
    reset = server.reset_peak_rss()
    streaming = [threading.Event() for _ in streams]
    stream_channel = calls.open_channel(server.address)
    long_channel = calls.open_channel(server.address)
    with (
        RssSampler(server.pid) as sampler,
        ThreadPoolExecutor(len(streams) + 1, thread_name_prefix="mixed-join") as pool,
    ):
        try:
            stub = chat_pb2_grpc.ChatServiceStub(stream_channel)
            futures = [
                pool.submit(
                    _call, stub, prompt, sizes.stream_new_tokens, sizes.call_timeout_s, event
                )
                for prompt, event in zip(streams, streaming, strict=True)
            ]
            _wait_streaming(streaming, futures)
            _wait_steps(server, sizes.steady_steps)
            sent_at = time.monotonic()
            long_call = pool.submit(
                _call,
                chat_pb2_grpc.ChatServiceStub(long_channel),
                long,
                sizes.long_new_tokens,
                sizes.call_timeout_s,
            )
            queued = _held_back(server, long_call, sizes.queued_after_steps)
        finally:
            long_channel.close()  # cancels the long call if it is still queued
            stream_channel.close()  # cancels the streams
        outcomes = [future.result() for future in futures]
        long_outcome = long_call.result()
    return JoinRun(
        streams=outcomes,
        long=long_outcome,
        sent_at=sent_at,
        queued=queued,
        generated_tokens=int(server.metrics()[_GENERATED] - generated_before),
        peak_rss_bytes=max(server.peak_rss_bytes(), sampler.peak_bytes),
        peak_rss_source="VmHWM reset before the run" if reset else "VmHWM since start",
        sampled_peak_rss_bytes=sampler.peak_bytes,
        rss_samples=sampler.samples,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _split_gaps(
    times: Sequence[Sequence[float]], start: float, end: float
) -> tuple[list[float], list[float]]:
    """Gaps between consecutive tokens of each stream: those overlapping ``[start, end]``
    (the one that straddles ``start`` included) and all the others."""
    inside: list[float] = []
    outside: list[float] = []
    for stream in times:
        for before, after in itertools.pairwise(stream):
            (inside if after > start and before < end else outside).append(after - before)
    return inside, outside


def join_figures(run: JoinRun) -> dict[str, Any]:
    """The streams' gaps inside the window from the long prompt's arrival to its first token,
    their median gap outside it (the median step), the long prompt's TTFT and the peak RSS.

    Gaps are between text deltas as the client receives them; a token that completes no
    character (part of a multi-byte one) sends no delta, so a few gaps span two steps: hence
    ``tokens_per_delta`` (tokens the server generated per delta received) beside them.
    """
    if not run.long.delta_times:
        raise ValueError(f"the long prompt had no first token: {run.long.code} {run.long.message}")
    inside, outside = _split_gaps(
        [o.delta_times for o in run.streams], run.sent_at, run.long.delta_times[0]
    )
    deltas = run.long.deltas + sum(o.deltas for o in run.streams)
    return {
        "long": {
            "code": run.long.code,
            "message": run.long.message,
            "ttft_ms": _ms(run.long.ttft_seconds),
            "seconds": round(run.long.seconds, 3),
            "completion_tokens": run.long.completion_tokens,
        },
        "streams": {
            "codes": counts(o.code for o in run.streams),
            "deltas": [o.deltas for o in run.streams],
            "streaming_when_the_long_prompt_was_sent": sum(
                bool(o.delta_times) and o.delta_times[0] < run.sent_at for o in run.streams
            ),
        },
        "gap_ms_in_window": {
            "count": len(inside),
            "p50": _ms(percentile(inside, 50)),
            "p99": _ms(percentile(inside, 99)),
            "max": _ms(max(inside, default=None)),
        },
        "median_step_ms": _ms(statistics.median(outside)) if outside else None,
        "gaps_outside_window": len(outside),
        "tokens_per_delta": round(run.generated_tokens / deltas, 3) if deltas else None,
        "peak_rss_bytes": run.peak_rss_bytes,
        "peak_rss_gb": round(run.peak_rss_bytes / 1e9, 3),
        "peak_rss_source": run.peak_rss_source,
        "sampled_peak_rss_gb": round(run.sampled_peak_rss_bytes / 1e9, 3),
        "rss_samples": run.rss_samples,
    }
