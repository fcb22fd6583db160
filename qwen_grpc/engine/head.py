"""Logits from the last hidden state: fast everywhere, exact where the choice is made.

The output head is the largest matrix of a small chat model (a third of Qwen1.5-0.5B) and is
read once per token. In reduced precision an fbgemm int8 head ranks the vocabulary about five
times faster than a bf16 GEMV; the best candidates' logits are then recomputed in fp32 from the
model's own weight rows, so the argmax (and the head of the sampling distribution) is what the
model's weights say, not what rounding says. bf16 logits alone flip near-ties often enough to
cost several points of greedy agreement with float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qwen_grpc.engine.fast_linear import fbgemm_int8_linear
from qwen_grpc.engine.quantize import int8_rows

REFINED_CANDIDATES = 32
RowLookup = Callable[[torch.Tensor], torch.Tensor]


class LogitsHead:
    """Computes fp32 logits ``[batch, vocab]`` from hidden states ``[batch, hidden]``."""

    def __init__(self, head: nn.Module, exact_rows: RowLookup | None = None) -> None:
        """``exact_rows`` given: rank with int8, then recompute the top rows exactly."""
        self._head = head
        self._exact_rows = exact_rows
        self._ranker: nn.Module | None = None
        if exact_rows is not None:
            self._ranker = fbgemm_int8_linear(*_int8_weight(head))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._ranker is None or self._exact_rows is None:
            return self._head(hidden).float()
        wide = hidden.float()
        logits = self._ranker(wide)
        candidates = torch.topk(logits, REFINED_CANDIDATES, dim=-1).indices
        exact = torch.einsum("bh,bkh->bk", wide, self._exact_rows(candidates))
        bias = getattr(self._head, "bias", None)
        if bias is not None:
            exact = exact + bias.float()[candidates]
        return logits.scatter_(-1, candidates, exact)


def _int8_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    values = getattr(head, "values", None)
    scales = getattr(head, "scales", None)
    if isinstance(values, torch.Tensor) and isinstance(scales, torch.Tensor):
        return values, scales.float()
    weight = head.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(head).__name__}.weight is not a tensor")
    return int8_rows(weight.detach())


def bf16_rows(weight: torch.Tensor) -> RowLookup:
    """Exact rows from a full-precision (bf16) weight, widened only for the candidates."""
    return lambda index: weight[index].float()
