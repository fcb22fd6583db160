"""int8 weights for CPU decode: per-output-channel int8 weights, bf16 activations.

Decode is memory-bandwidth bound, so halving the bytes of every weight is the single-stream
lever. Activations stay bf16 (weight-only quantization, the path torchao's int8 weight-only
config takes on CPU through ``aten._weight_int8pack_mm``): fbgemm's dynamic int8 linears also
quantize activations per tensor, and on the demo model that dropped next-token agreement with
float32 below 50 %.

Weights are quantized in row blocks straight from the bf16 checkpoint, so no full fp32 copy of
a matrix ever exists (Qwen1.5-0.5B's tied embedding alone would be 622 MB in fp32).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

_ROWS_PER_BLOCK = 4096
# aten._weight_int8pack_mm crashes the process on other input widths.
KERNEL_K_MULTIPLE = 16


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns the int8 matrix and one fp32 scale per row."""
    rows = weight.shape[0]
    values = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, _ROWS_PER_BLOCK):
        block = weight[start : start + _ROWS_PER_BLOCK].float()
        block_scales = block.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        values[start : start + _ROWS_PER_BLOCK] = (
            torch.round(block / block_scales[:, None]).clamp(-127, 127).to(torch.int8)
        )
        scales[start : start + _ROWS_PER_BLOCK] = block_scales
    return values, scales


def int8_kernel_fits(weight: torch.Tensor) -> bool:
    return weight.shape[1] % KERNEL_K_MULTIPLE == 0


class Int8Linear(nn.Module):
    """``y = x @ (values * scales).T + bias`` without ever materializing the wide weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        values, scales = int8_rows(weight)
        self.out_features, self.in_features = weight.shape
        self.values = values
        self.scales = scales.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch._weight_int8pack_mm(flat, self.values, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Table(nn.Module):
    """An int8 embedding table with per-row scales, also the exact rows of a tied int8 head."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.values, self.scales = int8_rows(weight)
        self.dtype = dtype

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The de-quantized rows ``index`` in fp32."""
        return self.values[index].float() * self.scales[index].unsqueeze(-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = functional.embedding(input_ids, self.values).float()
        return (rows * self.scales[input_ids].unsqueeze(-1)).to(self.dtype)
