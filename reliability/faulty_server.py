"""``python -m reliability.faulty_server``: ``qwen-grpc serve`` with faults a request can ask for.

Fault scenarios need failures production code never has on purpose. They are installed by
monkeypatching in this process only, so the service carries no fault hook (no env var or flag
that could be switched on in production by mistake):

* a request whose ``options.seed`` is ``FAULT_SEED + n`` raises inside its own sampler when it
  samples its token number n + 1 (n = 0: during the prefill that admits it). The seed is the
  one field the engine hands to each sequence's sampler untouched, so the injector needs no
  view of prompts and no engine internals beyond the sampler class the scheduler instantiates;
* a request whose seed is ``PREFILL_FAULT_SEED`` makes the model's forward pass raise when a
  chunk of its prompt is in it (the engine is told at submit time which prompt it is);
* ``--step-delay-seconds`` adds a sleep to every forward pass, so streams stay in flight long
  enough to be cancelled, to expire or to be orphaned however fast the machine is.

Every other flag is ``qwen-grpc serve``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from qwen_grpc import config
from qwen_grpc.engine import scheduler
from qwen_grpc.engine.model import LoadedModel
from qwen_grpc.engine.sampling import TokenSampler
from qwen_grpc.engine.scheduler import Engine, RequestHandle
from qwen_grpc.engine.step_plan import Segment, StepPlan
from qwen_grpc.engine.types import GenerationRequest, SamplingParams
from qwen_grpc.logs import configure_logging
from qwen_grpc.server import serve

FAULT_SEED = 0xFA17_0000_0000
_FAULT_SEEDS = range(FAULT_SEED, FAULT_SEED + 1_000_000)
PREFILL_FAULT_SEED = FAULT_SEED - 1
_poisoned_prompts: set[tuple[int, ...]] = set()


class InjectedFault(RuntimeError):
    """The exception a marked sequence raises; its name shows in the server log."""


def fault_seed(token_index: int) -> int:
    """The seed that makes a request fail when sampling token ``token_index`` (0 = first)."""
    return FAULT_SEED + token_index


class _FaultySampler(TokenSampler):
    """A normal sampler until its sequence reaches the marked token, then it raises."""

    def __init__(
        self, params: SamplingParams, prompt_ids: tuple[int, ...], vocab_size: int, fail_at: int
    ) -> None:
        super().__init__(params, prompt_ids, vocab_size)
        self._fail_at = fail_at
        self._sampled = 0

    def sample(self, logits: torch.Tensor) -> int:
        if self._sampled == self._fail_at:
            raise InjectedFault(f"injected fault at token {self._fail_at}")
        self._sampled += 1
        return super().sample(logits)


def _sampler(params: SamplingParams, prompt_ids: tuple[int, ...], vocab_size: int) -> TokenSampler:
    if params.seed is not None and params.seed in _FAULT_SEEDS:
        return _FaultySampler(params, prompt_ids, vocab_size, params.seed - FAULT_SEED)
    return TokenSampler(params, prompt_ids, vocab_size)


def install(step_delay_seconds: float) -> None:
    """Patches the sampler, the forward pass and the engine's intake; slows steps if asked."""
    scheduler.TokenSampler = _sampler  # type: ignore[misc,assignment]
    submit = Engine.submit
    step = LoadedModel.step

    def marking_submit(self: Engine, request: GenerationRequest) -> RequestHandle:
        if request.params.seed == PREFILL_FAULT_SEED:
            _poisoned_prompts.add(request.prompt_ids)
        return submit(self, request)

    def failing_step(self: LoadedModel, plan: StepPlan, *args: Any) -> torch.Tensor:
        if any(_poisoned(segment) for segment in plan.segments):
            raise InjectedFault("injected fault in a prefill forward pass")
        if step_delay_seconds > 0:
            time.sleep(step_delay_seconds)
        return step(self, plan, *args)

    Engine.submit = marking_submit  # type: ignore[method-assign]
    LoadedModel.step = failing_step  # type: ignore[method-assign,assignment]


def _poisoned(segment: Segment) -> bool:
    """A prompt chunk of a request marked to fail its prefill."""
    start = segment.row.length
    chunk = tuple(segment.tokens)
    return any(prompt[start : start + len(chunk)] == chunk for prompt in _poisoned_prompts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.faulty_server", description=__doc__
    )
    config.add_arguments(parser)
    parser.add_argument(
        "--step-delay-seconds", type=float, default=0.0, help="sleep added to each decode step"
    )
    args = parser.parse_args(argv)
    settings = config.from_namespace(args, os.environ)
    configure_logging(settings.log_level)
    install(args.step_delay_seconds)
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
