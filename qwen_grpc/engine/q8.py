"""The ``q8`` precision: llama.cpp's Q8_0 arithmetic for every weight read per token.

Every linear, the LM head and the embedding read Q8_0 weights (int8 in blocks of 32 with one
scale each) through ``kernels``; activations are quantized per block of 32 inside the call, so
products are exact int8 dot products and the error is Q8_0's and no more. A tied head and the
embedding share one int8 table: the head's matmul and the embedding's row gather read the same
copy (Qwen1.5-0.5B ties them, a third of its weights).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_grpc.engine.kernels import Q8Weight, quantize_q8


class Q8Linear(nn.Module):
    """A linear layer over a Q8_0 weight: float32 or bf16 in, float32 out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = quantize_q8(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x)


class Q8Table(nn.Module):
    """A Q8_0 embedding table whose rows come out de-quantized to float32."""

    def __init__(self, weight: Q8Weight) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(input_ids)


class Q8Head:
    """Every logit from the Q8_0 matmul: no ranking pass and no re-scoring."""

    def __init__(self, weight: Q8Weight) -> None:
        self._weight = weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._weight.linear(hidden)


def q8_fits(weight: torch.Tensor) -> bool:
    """Q8_0 blocks are 32 wide along the input dimension."""
    return weight.shape[-1] % 32 == 0
