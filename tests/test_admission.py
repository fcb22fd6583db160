"""The engine's admission order and first-token estimate, on their own (no model)."""

from __future__ import annotations

import pytest

from qwen_grpc.engine.admission import FairQueue
from qwen_grpc.engine.estimate import FirstTokenEstimator, Work


def queue_of(*items: str) -> FairQueue[str]:
    """Items are named client + number: ``a1`` is client a's first request."""
    queue: FairQueue[str] = FairQueue(lambda item: item[0])
    for item in items:
        queue.push(item)
    return queue


def test_clients_take_turns_and_each_keeps_its_own_order() -> None:
    queue = queue_of("a1", "a2", "a3", "a4", "b1", "c1", "c2")
    assert list(queue) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]
    # What a newcomer would wait for is that same order, cut where its turn comes.
    assert queue.ahead_of_new("d") == ["a1", "b1", "c1"]
    assert queue.ahead_of_new("b") == ["a1", "b1", "c1", "a2"]
    assert queue.ahead_of_new("a") == ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]
    served = [queue.pop() for _ in range(3)]
    queue.push("b2")  # b was served: its next request waits for a and c to have a turn
    assert served + list(queue) == ["a1", "b1", "c1", "a2", "c2", "b2", "a3", "a4"]


def test_removed_requests_free_their_places_and_the_rest_keep_their_turns() -> None:
    queue = queue_of("a1", "a2", "b1", "c1")
    queue.remove(lambda item: item in {"a1", "b1"})
    assert (len(queue), queue.waiting("a"), queue.waiting("b")) == (2, 1, 0)
    assert list(queue) == ["a2", "c1"]
    assert queue.peek() == "a2"


def measured(step: float, per_prompt_token: float, completion: int) -> FirstTokenEstimator:
    estimator = FirstTokenEstimator()
    estimator.on_decode_step(step)
    estimator.on_prefill(100, 100 * per_prompt_token)
    estimator.on_finished(completion)
    return estimator


def test_the_first_token_estimate_replays_the_queue_over_the_batch_slots() -> None:
    estimator = measured(step=0.01, per_prompt_token=0.001, completion=50)
    # Two slots. Running rows end after 50 - 10 = 40 steps, and after 20 - 5 = 15 steps
    # (max_new_tokens below the mean). The first queued request takes the slot free at
    # 0.15 s, prefills 10 tokens (0.01 s) and decodes 49 steps: free at 0.65 s. The second
    # takes the slot free at 0.40 s and ends at 0.40 + 0.01 + 0.49 = 0.90 s. The newcomer
    # starts at 0.65 s and prefills 30 tokens: its first token at 0.68 s.
    running = [Work(10, 100, generated=10), Work(10, 20, generated=5)]
    ahead = [Work(10, 100), Work(10, 100)]
    estimate = estimator.seconds_to_first_token(running, ahead, prompt_tokens=30, slots=2)
    assert estimate == pytest.approx(0.68)


def test_there_is_no_estimate_before_a_step_and_an_answer_were_measured() -> None:
    estimator = FirstTokenEstimator()
    running, ahead = [Work(10, 100)], [Work(10, 100)] * 5
    assert estimator.seconds_to_first_token(running, ahead, 10, slots=1) is None
    estimator.on_decode_step(0.01)
    assert estimator.seconds_to_first_token(running, ahead, 10, slots=1) is None
    estimator.on_finished(40)
    assert estimator.seconds_to_first_token(running, ahead, 10, slots=1) == pytest.approx(2.35)
