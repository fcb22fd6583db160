"""When a queued request would produce its first token, from the engine's measured speed.

A request whose deadline passes while it waits holds a queue place for nothing and tells its
caller nothing until the deadline is gone. With an estimate the engine refuses it at once, and
the caller can retry elsewhere with the whole deadline left.

The estimate replays the queue over the batch slots: each slot frees when its row has generated
its expected length, then takes the next request in serving order, which prefills and decodes
its expected length in turn. Lengths are expected, not worst case: a row runs
min(max_new_tokens, the mean completion length), and nobody's prefill stalls the others. So the
estimate errs early, and a refusal means the request would very likely have missed its deadline.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

# Weight of the newest measurement: about the last ten count.
SMOOTHING = 0.2


@dataclass(frozen=True)
class Work:
    """What the estimate needs to know about one request, running or queued."""

    prompt_tokens: int
    max_new_tokens: int
    generated: int = 0


class Ewma:
    """Exponentially weighted mean; the first measurement is taken as it is."""

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = (
            sample if self.value is None else self.value + SMOOTHING * (sample - self.value)
        )


class FirstTokenEstimator:
    """Fed by the engine thread after each step, read by callers' threads in ``submit``.

    Each mean is one float, replaced whole, so a reader never sees a torn value; the three may
    be a step apart from each other, which an estimate can afford.
    """

    def __init__(self) -> None:
        self._decode_step = Ewma()
        self._prefill_per_token = Ewma()
        self._completion = Ewma()

    def on_decode_step(self, seconds: float) -> None:
        self._decode_step.add(seconds)

    def on_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self._prefill_per_token.add(seconds / tokens)

    def on_finished(self, completion_tokens: int) -> None:
        self._completion.add(completion_tokens)

    def seconds_to_first_token(
        self, running: Sequence[Work], ahead: Sequence[Work], prompt_tokens: int, slots: int
    ) -> float | None:
        """Seconds from now until a request with ``prompt_tokens`` gets its first token, when
        ``running`` rows hold the batch's ``slots`` and ``ahead`` is served before it.

        ``None`` until a decode step and a finished request have been measured: without them
        any number would be a guess, and a guess must not refuse anybody.
        """
        step = self._decode_step.value
        completion = self._completion.value
        if step is None or completion is None:
            return None
        per_token = self._prefill_per_token.value or 0.0

        def lifetime(work: Work) -> float:
            return min(float(work.max_new_tokens), completion)

        # When each slot is next free: a running row has about lifetime - generated steps to
        # go (at least the one under way), and a slot nobody holds is free now.
        free_at = [max(lifetime(row) - row.generated, 1.0) * step for row in running]
        free_at += [0.0] * max(slots - len(free_at), 0)
        heapq.heapify(free_at)
        for work in ahead:
            start = heapq.heappop(free_at)
            # The prefill yields the first token, each decode step one more.
            heapq.heappush(
                free_at,
                start + work.prompt_tokens * per_token + (lifetime(work) - 1.0) * step,
            )
        return heapq.heappop(free_at) + prompt_tokens * per_token
