"""Faster CPU linears: oneDNN-packed bf16 weights, and fbgemm int8 for approximate logits.

``F.linear`` with plain bf16 weights re-lays the weight out on every call; oneDNN's packed
layout (what inductor's CPU freezing uses) skips that and, with identical results, runs a decode
GEMV three to four times faster on AVX512-BF16 machines. fbgemm's int8 linear is faster still,
but quantizing activations costs accuracy, so it only ranks candidates (see ``head.py``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torch.nn import functional


class DenseLinear(nn.Module):
    """``F.linear`` on a plain weight: the float32 reference, and bf16 where oneDNN is missing."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias)


class PackedBf16Linear(nn.Module):
    """A bf16 linear whose weight lives in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), 1)
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack_bf16() -> bool:
    """oneDNN packs bf16 only where the CPU converts bf16 in hardware (AVX-512 or
    AVX-NE-CONVERT); an AVX2-only CPU raises at pack time, so it takes ``F.linear``."""
    return bool(torch.backends.mkldnn.is_available()) and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def fbgemm_int8_linear(values: torch.Tensor, scales: torch.Tensor) -> nn.Module:
    """An fbgemm dynamic-int8 linear (fp32 in, fp32 out) from per-row int8 weights."""
    torch.backends.quantized.engine = "fbgemm"
    out_features, in_features = values.shape
    with warnings.catch_warnings():
        # Quantized tensors are deprecated in favour of torchao, which has no fbgemm CPU path.
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            values, scales.double(), torch.zeros(out_features, dtype=torch.long), 0
        )
    linear = quantized_dynamic.Linear(in_features, out_features, bias_=False, dtype=torch.qint8)
    linear.set_weight_bias(qweight, None)
    return linear
