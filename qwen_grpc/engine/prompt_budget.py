"""How many prompt tokens a forward pass beside decoding rows takes: as many as keep the pass
near a set multiple of a decode step.

A prompt token's cost grows with its depth in the prompt, since its query attends over every
token before it. A fixed chunk is therefore wrong at one end of a long prompt or the other: too
large near its end, where the running streams' step outgrows its bound, or too small near its
start, where the prompt takes more passes than it needs, each paying a pass's fixed cost (the
decode rows, the per-layer overheads), and its first token comes later. So each chunk is sized
from the pass before it: the tokens it took, the time it took above a decode step, and the time
the bound leaves. That is a proportional correction, so the passes settle at the bound whatever
share of a decode step a mixed pass hides, and a prompt's chunks shrink as it deepens.
"""

from __future__ import annotations

from qwen_grpc.engine.estimate import Ewma

GROWTH = 1.25
"""Most a chunk grows from one pass to the next: one pass that ran fast on a noisy machine
must not make the next one overshoot its bound by much."""


class PromptBudget:
    """Fed every pass that had decoding rows; read by the engine thread before the next pass.

    ``step_factor`` 0 keeps every chunk at ``floor`` tokens.
    """

    def __init__(self, floor: int, ceiling: int, step_factor: float) -> None:
        self._floor = floor
        self._ceiling = max(ceiling, floor)
        self._step_factor = step_factor
        self._decode_step = Ewma()
        self._tokens = floor

    @property
    def tokens(self) -> int:
        """Prompt tokens the next pass beside decoding rows may take."""
        return self._tokens

    def on_step(self, prompt_tokens: int, seconds: float) -> None:
        """A pass with decoding rows took ``seconds``, ``prompt_tokens`` of them prompt ones."""
        if prompt_tokens == 0:
            self._decode_step.add(seconds)
            return
        decode = self._decode_step.value
        if self._step_factor <= 0 or decode is None:
            return
        spare = (self._step_factor - 1.0) * decode
        spent = seconds - decode
        grown = int(self._tokens * GROWTH)
        wanted = grown if spent <= 0 else int(prompt_tokens * spare / spent)
        self._tokens = max(self._floor, min(wanted, grown, self._ceiling))
