"""Long prompt: one prompt at ``max_prompt_tokens`` joins seven short streams (issue 14).

The heaviest request the server admits, arriving while a batch streams, is where memory and
liveness promises break: a KV cache padded to the long row's width for every short row blows
the memory budget, and a prefill of minutes looks like a stuck engine to a watchdog that cannot
tell slow progress from none. The server may answer the long prompt or refuse it cleanly
(RESOURCE_EXHAUSTED for a full KV budget, INVALID_ARGUMENT for a prompt too long, each with a
message), but it must keep reporting SERVING, keep its resident memory within the KV budget
plus the activations of one prefill, and answer every stream it had accepted.

The server is the Qwen-shaped random model with the deployed precision, so compute and memory
are production's; the prompt length is what the server itself reports as its limit.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.server_process import ServerProcess
from qwen_grpc.config import Settings
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls
from reliability.calls import CallOutcome
from reliability.report import ScenarioResult
from reliability.stats import counts, rounded
from reliability.watch import HealthWatch, RssWatch

_LOGGER = logging.getLogger(__name__)
_MIB = 1 << 20
REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"})
"""The documented refusals of a request the server cannot hold (DESIGN.md's error model)."""

KV_BYTES = {"float32": 4, "bfloat16": 2, "q8": 2, "int8": 2}
"""Bytes per KV element by the precision GetModelInfo reports: float32 keeps its cache in
float32; every faster precision stores keys and values in bfloat16 (``engine/precision.py``)."""

FIXED_MARGIN_BYTES = 256 * _MIB
"""Memory a long call holds beyond the KV cache and the prefill's tensors: the allocator's
unreturned free lists, gRPC's buffers and the tokenizer's encodings of a 16k-token prompt."""

ACTIVATION_FLOATS_PER_PROMPT_TOKEN = (4, 4)
"""The live float32 values per prompt token at a prefill's peak, as multiples of
(intermediate, hidden): the decoder runs one layer at a time with a float32 residual stream, and
its largest moment is the MLP — gate and up (2 x intermediate), silu(gate) and its product with
up (2 x intermediate) — beside the residual, its norm and the layer's attention output and
queries (4 x hidden). Attention of a lone causal prompt is SDPA's flash kernel, which keeps no
tokens x tokens score matrix, and the head reads the last position only. For Qwen1.5-0.5B that
is 61 KB per token: 0.99 GB at 16k tokens, 0.12 GB at 2k."""

_HEAD = "Summarize these notes in one sentence:"
_WORDS = ("apple", "river", "stone", "cloud", "green", "music", "paper", "light", "table", "horse")
"""Common English words that Qwen's byte-level BPE encodes as one token each after a space."""


@dataclass(frozen=True)
class LongPromptPlan:
    """The long prompt, the streams it joins, and how closely the server is watched."""

    prompt_tokens: int = 0
    """Length of the long prompt; 0 (or more than the server allows) = its ``max_prompt_tokens``."""
    short_streams: int = 7
    short_prompt_tokens: int = 64
    short_new_tokens: int = 256
    long_new_tokens: int = 16
    kv_cache_tokens: int = Settings.kv_cache_tokens
    """The server's KV budget in tokens, passed to it explicitly so the memory budget is known."""
    health_interval_seconds: float = 0.5
    rss_interval_seconds: float = 0.2
    call_timeout_seconds: float = 1800.0
    """Every call's deadline, generous: on two shared cores with one torch thread a 2k-token
    prompt's first token took 7.6 s and a 4k one's 26.9 s, which extrapolates (linear plus
    quadratic attention) to about 6.5 minutes at 16k, during which the short streams wait."""
    idle_within_seconds: float = 60.0

    def server_args(self) -> tuple[str, ...]:
        """The KV budget, and a deadline cap that lets the calls their whole timeout (the
        deployed cap, 600 s, is a bound on callers, not the promise under test)."""
        return (
            *("--kv-cache-tokens", str(self.kv_cache_tokens)),
            *("--max-deadline-seconds", str(self.call_timeout_seconds)),
        )


@dataclass(frozen=True)
class MemoryBudget:
    """What the server may hold at most: its idle self, a full KV budget and one prefill."""

    idle_rss: int
    kv_bytes_per_token: int
    kv_cache_tokens: int
    activation_bytes: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_cache_tokens

    @property
    def total(self) -> int:
        return self.idle_rss + self.kv_bytes + self.activation_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "idle_rss_mib": round(self.idle_rss / _MIB, 1),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_tokens": self.kv_cache_tokens,
            "kv_budget_mib": round(self.kv_bytes / _MIB, 1),
            "activation_margin_mib": round(self.activation_bytes / _MIB, 1),
            "budget_mib": round(self.total / _MIB, 1),
        }


def memory_budget(
    config: dict[str, Any], precision: str, idle_rss: int, kv_cache_tokens: int, prompt_tokens: int
) -> MemoryBudget:
    """The budget from the model's ``config.json`` and the precision the server runs."""
    if precision not in KV_BYTES:
        raise ValueError(f"no KV element size known for precision {precision!r}")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    per_token = int(config["num_hidden_layers"]) * 2 * kv_heads * head_dim * KV_BYTES[precision]
    per_intermediate, per_hidden = ACTIVATION_FLOATS_PER_PROMPT_TOKEN
    floats = per_intermediate * int(config["intermediate_size"])
    floats += per_hidden * int(config["hidden_size"])
    activations = FIXED_MARGIN_BYTES + prompt_tokens * floats * 4
    return MemoryBudget(idle_rss, per_token, kv_cache_tokens, activations)


def server_count(stub: chat_pb2_grpc.ChatServiceStub) -> Callable[[str], int]:
    """The server's CountTokens as a counter for :func:`prompt_of`."""

    def count(text: str) -> int:
        request = chat_pb2.CountTokensRequest(messages=calls.user_turn(text))
        return int(stub.CountTokens(request, timeout=60.0).prompt_tokens)

    return count


def prompt_of(count: Callable[[str], int], tokens: int, head: str = _HEAD) -> str:
    """A user message whose chat-templated prompt is exactly ``tokens`` long.

    Qwen's pre-tokenizer splits each " word" into a piece of its own, so every one of
    :data:`_WORDS` adds one token wherever it stands; ``count`` (the server's CountTokens, or
    the benchmark's own tokenizer) confirms the whole prompt once (growing it word by word
    costs minutes at 16k).
    """
    base = count(head)
    if tokens < base:
        raise ValueError(f"{tokens} tokens is shorter than the chat template and {head!r}")
    text = " ".join((head, *(_WORDS[i % len(_WORDS)] for i in range(tokens - base))))
    counted = count(text)
    if counted != tokens:
        raise RuntimeError(f"built a prompt of {counted} tokens instead of {tokens}")
    return text


def _answered(outcome: CallOutcome) -> bool:
    """OK with the whole answer, or a documented refusal that tells the caller why."""
    return outcome.ok or (outcome.code in REFUSALS and bool(outcome.message))


def _max_gap(times: tuple[float, ...], start: float, end: float) -> float | None:
    """The longest wait between consecutive deltas overlapping ``[start, end]``."""
    gaps = [b - a for a, b in itertools.pairwise(times) if b > start and a < end]
    return max(gaps, default=None)


def _call_json(outcome: CallOutcome) -> dict[str, Any]:
    return {
        "code": outcome.code,
        "message": outcome.message,
        "seconds": rounded(outcome.seconds),
        "ttft_seconds": rounded(outcome.ttft_seconds),
        "deltas": outcome.deltas,
        "completion_tokens": outcome.completion_tokens,
    }


def _timeline(samples: list[tuple[float, int]], points: int = 120) -> list[list[float]]:
    """RSS over time in at most ``points`` buckets, each its largest sample (peaks survive)."""
    if not samples:
        return []
    span = samples[-1][0] / points or 1.0
    buckets: dict[int, tuple[float, int]] = {}
    for at, rss in samples:
        key = int(at / span)
        if key not in buckets or rss > buckets[key][1]:
            buckets[key] = (at, rss)
    return [[round(at, 1), round(rss / _MIB, 1)] for at, rss in buckets.values()]


def run_long_prompt(server: ServerProcess, plan: LongPromptPlan, model_dir: Path) -> ScenarioResult:
    """Starts the short streams, sends the long prompt once they stream, watches and judges."""
    config = json.loads((model_dir / "config.json").read_text())
    with calls.open_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        info = stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=30.0)
        limit = int(info.limits.max_prompt_tokens)
        tokens = min(plan.prompt_tokens or limit, limit)
        count = server_count(stub)
        long_text = prompt_of(count, tokens)
        short_texts = [
            prompt_of(count, plan.short_prompt_tokens, f"Stream {i + 1}: tell me a long story.")
            for i in range(plan.short_streams)
        ]
    server.idle_within(plan.idle_within_seconds)
    time.sleep(0.5)  # let the server's threads return what CountTokens freed
    idle_rss = server.rss_bytes()
    hwm_reset = server.reset_peak_rss()
    budget = memory_budget(config, info.dtype, idle_rss, plan.kv_cache_tokens, tokens)
    _LOGGER.info(
        "long_prompt: %d-token prompt (limit %d) joining %d streams; %s, budget %.0f MiB",
        tokens,
        limit,
        plan.short_streams,
        info.dtype,
        budget.total / _MIB,
    )
    health = HealthWatch(server.address, plan.health_interval_seconds)
    rss = RssWatch(server.rss_bytes, plan.rss_interval_seconds)
    health.start()
    rss.start()
    streaming = [threading.Event() for _ in range(plan.short_streams)]

    def call(text: str, max_new_tokens: int, first_delta: threading.Event | None) -> CallOutcome:
        with calls.open_channel(server.address) as own:
            return calls.stream(
                chat_pb2_grpc.ChatServiceStub(own),
                calls.user_turn(text),
                chat_pb2.GenerationOptions(greedy=True, max_new_tokens=max_new_tokens),
                timeout=plan.call_timeout_seconds,
                first_delta=first_delta,
            )

    with ThreadPoolExecutor(plan.short_streams + 1, thread_name_prefix="long-prompt") as pool:
        shorts = [
            pool.submit(call, text, plan.short_new_tokens, event)
            for text, event in zip(short_texts, streaming, strict=True)
        ]
        for event in streaming:
            event.wait(plan.call_timeout_seconds)
        in_flight = sum(e.is_set() and not f.done() for e, f in zip(streaming, shorts, strict=True))
        _LOGGER.info("long_prompt: %d short streams streaming; sending the long prompt", in_flight)
        sent = time.monotonic()
        long_future = pool.submit(call, long_text, plan.long_new_tokens, None)
        long_call = long_future.result()
        short_calls = [future.result() for future in shorts]
    rss.stop()
    health.stop()
    alive = server.alive
    hwm = server.peak_rss_bytes() if alive and hwm_reset else None
    peak = max(rss.peak, hwm or 0)
    prefill_end = sent + (long_call.ttft_seconds or long_call.seconds)
    gaps_before = [_max_gap(o.delta_times, float("-inf"), sent) for o in short_calls]
    gaps_during = [_max_gap(o.delta_times, sent, prefill_end) for o in short_calls]
    gap_before = max((g for g in gaps_before if g is not None), default=None)
    gap_during = max((g for g in gaps_during if g is not None), default=None)
    not_serving = health.statuses.count("NOT_SERVING")
    off_serving = sum(status != "SERVING" for status in health.statuses)
    everyone = [long_call, *short_calls]
    unanswered = [o for o in everyone if not _answered(o)]
    figures = {
        "precision": info.dtype,
        "max_prompt_tokens": limit,
        "long_prompt": {"prompt_tokens": tokens, **_call_json(long_call)},
        "short_streams": {
            "count": plan.short_streams,
            "prompt_tokens": plan.short_prompt_tokens,
            "max_new_tokens": plan.short_new_tokens,
            "streaming_when_the_long_prompt_was_sent": in_flight,
            "codes": counts(o.code for o in short_calls),
            "refusals": [o.message for o in short_calls if o.code in REFUSALS],
            "completion_tokens": [o.completion_tokens for o in short_calls],
            "max_gap_seconds_before_the_long_prompt": rounded(gap_before),
            "max_gap_seconds_while_it_prefilled": rounded(gap_during),
        },
        "memory": {
            **budget.to_json(),
            "peak_rss_sampled_mib": round(rss.peak / _MIB, 1),
            "vmhwm_mib": None if hwm is None else round(hwm / _MIB, 1),
            "peak_rss_mib": round(peak / _MIB, 1),
            "rss_samples": len(rss.samples),
            "rss_mib_timeline": _timeline(rss.samples),
        },
        "health": {
            "polls": len(health.seen),
            "not_serving_polls": not_serving,
            "runs": health.runs(),
        },
        "server_alive_after": alive,
    }
    checks = {
        f"all {plan.short_streams} short streams were streaming when the long prompt was sent": (
            in_flight == plan.short_streams
        ),
        "every call answered: OK with the whole answer, or RESOURCE_EXHAUSTED / "
        "INVALID_ARGUMENT with a message": not unanswered,
        "health SERVING at every poll, never NOT_SERVING": bool(health.seen) and off_serving == 0,
        f"peak RSS within idle RSS + KV budget + activations ({budget.total / _MIB:.0f} MiB)": (
            peak <= budget.total
        ),
        "the server process is alive afterwards": alive,
    }
    gap = "n/a" if gap_during is None else f"{gap_during:.1f} s"
    summary = (
        f"{tokens:,}-token prompt joining {plan.short_streams} streams: {long_call.code}, TTFT "
        f"{rounded(long_call.ttft_seconds, 1)} s, {long_call.seconds:.1f} s in all; short "
        f"streams {counts(o.code for o in short_calls)}, longest gap {gap} while it prefilled; "
        f"health NOT_SERVING in {not_serving}/{len(health.seen)} polls; peak RSS "
        f"{peak / _MIB:.0f} MiB of {budget.total / _MIB:.0f} MiB (idle {idle_rss / _MIB:.0f} + "
        f"KV {budget.kv_bytes / _MIB:.0f} + activations {budget.activation_bytes / _MIB:.0f})"
    )
    return ScenarioResult("long_prompt", summary, checks, figures)
