"""``--dtype auto``: the fastest precision that answers like float32 on this machine and model.

Which precision is faithful cannot be read off the CPU flags. oneDNN takes other bf16 kernels
on AMX hosts, and a small model's greedy answer can hang on a near-tie: the demo model's first
token after the system prompt "You are a concise assistant." is "The" by 0.002 logits over
"La" in float32, and a bf16 rounding there turns "The capital of France is Paris." into
French nonsense. So ``auto`` measures: it answers a few short chats greedily in float32 and in
each faster candidate, on the weights just loaded, and takes the fastest whose answers match
float32's token for token. The check costs one batched prefill and a few dozen decode steps
per candidate at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwen_grpc.engine.types import ChatMessage, Role

if TYPE_CHECKING:
    from qwen_grpc.engine.model import LoadedModel

_LOGGER = logging.getLogger(__name__)

# Four 16-token chats proved too few: after a change of attention kernel that moved float32
# results by 1e-6, bf16 matched all four on the demo model yet only 4 of 8 held-out
# conversations (tests/test_precision.py). Eight chats of 24 tokens tell a lucky precision from
# a faithful one, for about a second of start-up per candidate on Qwen1.5-0.5B.
CALIBRATION_TOKENS = 24
CALIBRATION_CHATS: tuple[tuple[ChatMessage, ...], ...] = (
    (ChatMessage(Role.USER, "What is the capital of France?"),),
    (
        ChatMessage(Role.SYSTEM, "You are a concise assistant."),
        ChatMessage(Role.USER, "What is the capital of France?"),
    ),
    (ChatMessage(Role.USER, "用一句话介绍北京。"),),
    (
        ChatMessage(Role.SYSTEM, "You are a helpful coding assistant."),
        ChatMessage(Role.USER, "Write a Python function that reverses a string."),
    ),
    (ChatMessage(Role.USER, "List the days of the week."),),
    (
        ChatMessage(Role.SYSTEM, "You are a translator."),
        ChatMessage(Role.USER, "Translate 'good morning' into Spanish."),
    ),
    (ChatMessage(Role.USER, "Give one tip for sleeping better."),),
    (ChatMessage(Role.USER, "写一首关于春天的短诗。"),),
)


@torch.inference_mode()
def greedy_answers(
    model: LoadedModel, prompts: Sequence[Sequence[int]], tokens: int
) -> list[list[int]]:
    """Each prompt's first ``tokens`` greedy tokens (fewer where a stop token ends it), batched."""
    logits, cache, rows = model.prefill([list(prompt) for prompt in prompts], tokens)
    answers: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(tokens):
        chosen = logits.argmax(dim=-1)
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                answers[row].append(token)
                done[row] = token in model.stop_token_ids
        if all(done) or step == tokens - 1:
            break
        logits = model.decode(chosen.tolist(), cache, rows)
    return answers


def matching_answers(answers: Sequence[list[int]], reference: Sequence[list[int]]) -> int:
    """How many answers equal the reference's token for token."""
    return sum(answer == expected for answer, expected in zip(answers, reference, strict=True))


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str


def choose_precision(
    candidates: Sequence[str],
    build: Callable[[str], LoadedModel],
    reference: LoadedModel,
    prompts: Sequence[Sequence[int]],
) -> tuple[LoadedModel, PrecisionChoice]:
    """The first candidate (fastest first) whose calibration answers equal ``reference``'s.

    ``build`` makes a model in a precision. A candidate that fails is dropped before the next
    is built, so at most one lives beside the (short-lived) reference; float32 comes last and
    needs no check.
    """
    expected = greedy_answers(reference, prompts, CALIBRATION_TOKENS)
    failures: list[str] = []
    for precision in candidates:
        if precision == "float32":
            break
        model = build(precision)
        matched = matching_answers(greedy_answers(model, prompts, CALIBRATION_TOKENS), expected)
        if matched == len(prompts):
            reason = f"its greedy answers to {len(prompts)} calibration chats equal float32's"
            return model, PrecisionChoice(precision, reason)
        del model
        failures.append(f"{precision} answered {matched} of {len(prompts)} calibration chats")
    if failures:
        reason = f"{'; '.join(failures)} like float32"
    else:
        reason = "no faster precision runs natively on this CPU"
    return build("float32"), PrecisionChoice("float32", reason)
