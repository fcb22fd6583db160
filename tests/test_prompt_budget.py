"""Prompt chunks beside decoding rows are sized so that a pass stays near its bound in decode
steps, whatever a prompt token costs at its depth."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen_grpc.engine.prompt_budget import GROWTH, PromptBudget

DECODE_S = 0.050
FIXED_S = 0.020
"""The part of a decode step a mixed pass pays once, whatever its prompt tokens."""


def mixed_pass_seconds(tokens: int, seconds_per_token: float) -> float:
    return FIXED_S + tokens * seconds_per_token


def settle(budget: PromptBudget, seconds_per_token: float, passes: int = 40) -> list[float]:
    """Runs ``passes`` mixed passes at the budget's chunks; returns each pass's seconds."""
    seconds = []
    for _ in range(passes):
        took = mixed_pass_seconds(budget.tokens, seconds_per_token)
        seconds.append(took)
        budget.on_step(budget.tokens, took)
    return seconds


def test_chunks_settle_where_a_pass_takes_the_bound_in_decode_steps() -> None:
    budget = PromptBudget(floor=16, ceiling=4096, step_factor=2.5)
    budget.on_step(0, DECODE_S)
    passes = settle(budget, seconds_per_token=0.001)
    assert passes[-1] == pytest.approx(2.5 * DECODE_S, rel=0.05)
    assert max(passes) <= 2.5 * DECODE_S * GROWTH


def test_chunks_shrink_as_prompt_tokens_get_dearer() -> None:
    budget = PromptBudget(floor=16, ceiling=4096, step_factor=2.5)
    budget.on_step(0, DECODE_S)
    settle(budget, seconds_per_token=0.001)
    shallow = budget.tokens
    passes = settle(budget, seconds_per_token=0.002)
    assert budget.tokens < shallow
    assert passes[-1] == pytest.approx(2.5 * DECODE_S, rel=0.05)


def test_chunks_grow_by_a_bounded_step_after_a_fast_pass() -> None:
    budget = PromptBudget(floor=16, ceiling=4096, step_factor=2.5)
    budget.on_step(0, DECODE_S)
    budget.on_step(16, DECODE_S / 2)  # faster than a decode step: no rate to go by
    assert budget.tokens == int(16 * GROWTH)


def test_chunks_stay_within_the_floor_and_the_ceiling() -> None:
    budget = PromptBudget(floor=16, ceiling=64, step_factor=2.5)
    budget.on_step(0, DECODE_S)
    settle(budget, seconds_per_token=0.0001)
    assert budget.tokens == 64
    settle(budget, seconds_per_token=0.1)
    assert budget.tokens == 16


@pytest.mark.parametrize("measured", [False, True], ids=["before-any-pass", "after-passes"])
def test_a_step_factor_of_zero_keeps_chunks_fixed(measured: bool) -> None:
    budget = PromptBudget(floor=48, ceiling=4096, step_factor=0.0)
    if measured:
        budget.on_step(0, DECODE_S)
        settle(budget, seconds_per_token=0.0001)
    assert budget.tokens == 48


def test_the_first_chunk_is_the_floor_until_a_decode_step_was_timed() -> None:
    budget = PromptBudget(floor=16, ceiling=4096, step_factor=2.5)
    budget.on_step(16, 0.010)
    assert budget.tokens == 16


@pytest.mark.parametrize("flag", ["--prefill-step-factor=1", "--prefill-step-factor=0.5"])
def test_a_step_bound_that_no_pass_can_keep_is_refused_at_startup(flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qwen_grpc", "serve", "--model", "demo", flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "invalid settings: prefill_step_factor" in result.stderr
    assert "Traceback" not in result.stderr
