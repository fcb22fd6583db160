"""The mixed-load section through the real server: the peak memory of short and long
conversations together, a long prompt joining running streams, fair and deadline-aware
admission.

One server with the run's settings (precision and ``--server-arg``) serves every scenario, each
after the previous one has drained. The two join scenarios need their long prompt (2,000 and
4,000 tokens) admitted beside seven streams. When the server refuses it (its prompt limit,
derived at start-up from this host's prefill speed) or holds it back (its KV budget), that
scenario runs again on a server given the settings that admit it, and the record says which
ones and why; the other scenarios keep the run's settings.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench import grpc_load
from bench.mixed_fair import FairSizes, fair_admission
from bench.mixed_join import JoinRun, JoinSizes, join_figures, join_streams
from bench.mixed_plan import MixedPlan, MixedPrompts
from bench.prompts import BenchPrompt
from bench.quiet import measure_quietly
from harness.server_process import ServerProcess
from qwen_grpc.config import Settings

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
Guard = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]
"""Runs one measurement and records a failure instead of raising (``bench.run._guarded``)."""
MAX_RESTARTS = 2
"""A refusal for the prompt limit can hide a KV budget that would queue it next."""


def serving_settings(server_args: Sequence[str]) -> Settings:
    """The settings a server started with ``server_args`` (and this environment) runs with."""
    return Settings.from_sources(list(server_args))


@dataclass(frozen=True)
class _Attempt:
    """One try of the memory scenario: its figures, or the settings that would admit it."""

    figures: dict[str, Any] | None
    needed: tuple[str, ...] = ()
    reason: str = ""


class MixedServers:
    """Starts the section's servers: same model, precision and extra arguments, own logs."""

    def __init__(
        self, model_dir: Path, server_args: Sequence[str], cache_dir: Path, log_dir: Path
    ) -> None:
        self.model_dir = model_dir
        self.server_args = tuple(server_args)
        self.cache_dir = cache_dir
        self.log_dir = log_dir

    @contextlib.contextmanager
    def serving(self, name: str, extra: Sequence[str] = ()) -> Iterator[ServerProcess]:
        """A started, warmed-up server; stopped on leaving."""
        with ServerProcess(
            str(self.model_dir),
            self.log_dir / f"server-{name}.log",
            cache_dir=self.cache_dir,
            extra_args=(*self.server_args, *extra),
            log_level="WARNING",
            startup_timeout=900.0,
        ) as server:
            yield server


def _ready(server: ServerProcess, prompts: MixedPrompts, plan: MixedPlan) -> None:
    """Idle, and past first-call costs: every scenario starts from the same state."""
    if server.idle_within(plan.call_timeout_s) is None:
        raise TimeoutError(f"the server was still busy after {plan.call_timeout_s:.0f} s")
    grpc_load.warm_up(server.address, prompts.streams[0], plan.call_timeout_s)


def _quietly(what: str, measure: Callable[[], _T], plan: MixedPlan) -> tuple[_T, dict[str, Any]]:
    """``measure()`` in a quiet moment (redone if the machine was busy), and how busy it was."""
    measured = measure_quietly(what, measure, plan.quiet)
    return measured.value, {
        "cpu_stall_share": measured.stall_share,
        "attempts": measured.attempts,
        "waited_for_quiet_s": measured.waited_s,
    }


def _padded_budget(plan: MixedPlan, long: BenchPrompt, long_new_tokens: int) -> int:
    """A KV budget that admits ``long`` beside the streams even where every row is as wide as
    the widest one (today's padded cache); a budget that counts rows apart needs less."""
    widest = max(
        plan.short_prompt_tokens + plan.short_new_tokens, len(long.token_ids) + long_new_tokens
    )
    return (plan.streams + 1) * widest


@dataclass(frozen=True)
class _Join:
    """One join scenario: the prompt that joins the streams, and what it generates."""

    name: str
    long: BenchPrompt
    long_new_tokens: int


def _attempt(
    server: ServerProcess,
    settings: Settings,
    prompts: MixedPrompts,
    plan: MixedPlan,
    join: _Join,
) -> _Attempt:
    tokens = len(join.long.token_ids)
    limit = grpc_load.model_info(server.address).limits.max_prompt_tokens
    if limit < tokens:
        return _Attempt(
            None,
            ("--max-prompt-tokens", str(tokens)),
            f"refused: the prompt limit derived at start-up is {limit} tokens",
        )
    sizes = JoinSizes(
        stream_new_tokens=plan.short_new_tokens,
        long_new_tokens=join.long_new_tokens,
        steady_steps=plan.steady_steps,
        queued_after_steps=plan.queued_after_steps,
        call_timeout_s=plan.call_timeout_s,
    )

    def measure() -> JoinRun:
        _ready(server, prompts, plan)
        return join_streams(server, prompts.streams, join.long, sizes)

    run, machine = _quietly(f"mixed {join.name}", measure, plan)
    budget = ("--kv-cache-tokens", str(_padded_budget(plan, join.long, join.long_new_tokens)))
    if run.queued:
        return _Attempt(
            None,
            budget,
            f"queued: still waiting after {plan.queued_after_steps} decode steps of the "
            f"{plan.streams} streams, with a KV budget of {settings.kv_cache_tokens} tokens",
        )
    if not run.long.ok:
        return _Attempt(
            None,
            (*budget, "--max-prompt-tokens", str(tokens)),
            f"refused: {run.long.code} {run.long.message}",
        )
    return _Attempt({**join_figures(run), **machine})


def _admitted_join(
    servers: MixedServers,
    server: ServerProcess,
    prompts: MixedPrompts,
    plan: MixedPlan,
    join: _Join,
) -> dict[str, Any]:
    """A join scenario on ``server``, then on servers given the settings it lacked."""
    added: list[str] = []
    reasons: list[str] = []
    attempt = _attempt(server, serving_settings(servers.server_args), prompts, plan, join)
    for restart in range(MAX_RESTARTS):
        if attempt.figures is not None:
            break
        added += attempt.needed
        reasons.append(attempt.reason)
        _LOGGER.info("mixed %s: %s; again with %s", join.name, attempt.reason, " ".join(added))
        with servers.serving(f"mixed-{join.name}-{restart + 1}", added) as admitting:
            settings = serving_settings((*servers.server_args, *added))
            attempt = _attempt(admitting, settings, prompts, plan, join)
    if attempt.figures is None:
        raise RuntimeError("; ".join([*reasons, attempt.reason]))
    return {
        "stream_count": plan.streams,
        "stream_prompt_tokens": plan.short_prompt_tokens,
        "steady_steps": plan.steady_steps,
        "long_prompt_tokens": len(join.long.token_ids),
        "long_new_tokens": join.long_new_tokens,
        "server_args_added": added,
        "why": reasons,
        **attempt.figures,
    }


def _fair(
    server: ServerProcess, prompts: MixedPrompts, plan: MixedPlan, settings: Settings
) -> dict[str, Any]:
    sizes = FairSizes(
        queued=plan.queued,
        heavy_new_tokens=plan.heavy_new_tokens,
        light_requests=plan.light_requests,
        deadline_probes=plan.deadline_probes,
        call_timeout_s=plan.call_timeout_s,
    )

    def measure() -> dict[str, Any]:
        _ready(server, prompts, plan)
        return fair_admission(
            server,
            prompts.heavy,
            prompts.light,
            sizes,
            settings.max_batch_size,
            settings.min_deadline_seconds,
        )

    figures, machine = _quietly("mixed fair admission", measure, plan)
    return {"prompt_tokens": plan.short_prompt_tokens, **figures, **machine}


def bench_mixed(
    servers: MixedServers,
    prompts: MixedPrompts,
    plan: MixedPlan,
    guard: Guard,
    memory_baseline: Callable[[ServerProcess], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every server scenario; ``memory_baseline`` (the 8 x 512 memory run, when the run has
    none of its own) runs first, on the same fresh server."""
    settings = serving_settings(servers.server_args)
    record: dict[str, Any] = {"plan": plan.to_json()}
    with servers.serving("mixed") as server:
        info = grpc_load.model_info(server.address)
        record["server"] = {
            "command": server.command,
            "dtype": info.dtype,
            "max_prompt_tokens": info.limits.max_prompt_tokens,
            "max_batch_size": settings.max_batch_size,
            "kv_cache_tokens": settings.kv_cache_tokens,
            "load_s": round(server.load_s or 0.0, 2),
        }
        if memory_baseline is not None:
            record["memory_8x512"] = guard(
                "mixed: the gRPC section's memory run", functools.partial(memory_baseline, server)
            )
        memory = _Join("memory", prompts.rss, plan.rss_new_tokens)
        record["memory"] = guard(
            "mixed: short and long conversations' peak memory",
            functools.partial(_admitted_join, servers, server, prompts, plan, memory),
        )
        join = _Join("join", prompts.join, plan.join_new_tokens)
        record["join"] = guard(
            "mixed: long prompt joins streams",
            functools.partial(_admitted_join, servers, server, prompts, plan, join),
        )
        record["fair"] = guard(
            "mixed: fair admission and deadline refusal",
            functools.partial(_fair, server, prompts, plan, settings),
        )
    return record
