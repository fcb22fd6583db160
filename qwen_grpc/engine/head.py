"""Logits from the last hidden state, exact where it matters and cheap everywhere else.

A bf16 (or int8) ``lm_head`` rounds every logit to bf16: near the top, two candidates often
round to the same value and the argmax flips, which is where reduced precision loses greedy
agreement with float32. Recomputing only the best few candidates' logits in fp32 from the same
hidden state restores float32's ranking at the cost of a few dot products per token.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_grpc.engine.quantize import Int8Linear

_REFINED_CANDIDATES = 32


class LogitsHead:
    """Computes fp32 logits ``[batch, vocab]`` from hidden states ``[batch, hidden]``."""

    def __init__(self, head: nn.Module) -> None:
        self._head = head
        weight = getattr(head, "weight", None)
        self._refine = isinstance(head, Int8Linear) or (
            weight is not None and weight.dtype != torch.float32
        )

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        if isinstance(self._head, Int8Linear):
            return self._head.rows(index)
        weight: torch.Tensor = self._head.weight
        return weight[index].float()

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden).float()
        if not self._refine:
            return logits
        candidates = torch.topk(logits, _REFINED_CANDIDATES, dim=-1).indices
        exact = torch.einsum("bh,bkh->bk", hidden.float(), self._rows(candidates))
        if getattr(self._head, "bias", None) is not None:
            exact = exact + self._head.bias.float()[candidates]
        return logits.scatter_(-1, candidates, exact)
