"""int8 weights for CPU decode: per-output-channel int8 weights, bf16 activations.

Decode is memory-bandwidth bound, so halving the bytes of every weight is the single-stream
lever. Activations stay bf16 (weight-only quantization, the path torchao's int8 weight-only
config takes on CPU through ``aten._weight_int8pack_mm``): fbgemm's dynamic int8 linears also
quantize activations per tensor, and on the demo model that dropped next-token agreement with
float32 below 50 %.

Weights are quantized in row blocks straight from the bf16 checkpoint, so no full fp32 copy of
a matrix ever exists (Qwen1.5-0.5B's tied embedding alone would be 622 MB in fp32). The
embedding keeps its own int8 table for lookups, so untying it from ``lm_head`` costs 155 MB.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

_LOGGER = logging.getLogger(__name__)
_ROWS_PER_BLOCK = 4096
# aten._weight_int8pack_mm crashes the process on other input widths; such layers stay as they are.
_KERNEL_K_MULTIPLE = 16


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


class Int8Linear(nn.Module):
    """``y = x @ (values * scales).T + bias`` without ever materializing the wide weight."""

    # Registered as buffers in __init__; declared so the type checker sees tensors, not Modules.
    values: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        values, scales = int8_rows(linear.weight.detach())
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("values", values)
        self.register_buffer("scales", scales.to(dtype))
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The de-quantized weight rows ``index`` in fp32 (for exact logits of a few tokens)."""
        return self.values[index].float() * self.scales[index].float().unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch._weight_int8pack_mm(flat, self.values, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """An int8 embedding table with per-row scales; lookups come out in the model's dtype."""

    values: torch.Tensor
    scales: torch.Tensor

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype) -> None:
        super().__init__()
        values, scales = int8_rows(embedding.weight.detach())
        self.register_buffer("values", values)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.values).float()
        return (rows * self.scales[input_ids].unsqueeze(-1)).to(self.dtype)


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Replaces the embedding and every linear layer, ``lm_head`` included, in place."""
    dtype = next(model.parameters()).dtype
    embedding = cast(nn.Embedding, model.get_input_embeddings())  # typed as nn.Module upstream
    model.set_input_embeddings(Int8Embedding(embedding, dtype))
    model.config.tie_word_embeddings = False
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.in_features % _KERNEL_K_MULTIPLE == 0
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(getattr(parent, child), dtype))
    _LOGGER.info("quantized the embedding and %d linear layers to int8", len(names))
    return model
