"""The int8 KV cache format both attention paths read, and the quantizer that writes it.

Keys and values are stored as int8 with one float32 scale per token and head: ``scale =
max|x| / 127`` over the head's ``head_dim`` values and ``q = round(x * (1 / scale))`` (round
half to even, clamped to +-127), the arithmetic of :func:`layout.block_scales` with the block
being one token of one head. Half the bytes of bf16 plus 4 bytes per token and head (6% at
``head_dim`` 64). This module is the torch implementation: the fallback, and the definition
``kv.cpp``'s native quantizer matches bit for bit.
"""

from __future__ import annotations

import torch

from qwen_grpc.engine.kernels.layout import block_scales


def quantize_kv(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values of ``states [..., tokens, head_dim]`` and float32 scales ``[..., tokens]``.

    An all-zero token gets scale 0 and zero values, so it de-quantizes to zeros, not NaN.
    """
    if states.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"expected float32 or bfloat16 states, got {states.dtype}")
    values = states.float()
    scale, inverse = block_scales(values)
    quantized = torch.round(values * inverse.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return quantized, scale


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``values * scales``: what both attention paths compute with."""
    return values.float() * scales.unsqueeze(-1)
