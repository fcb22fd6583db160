"""Decode attention over the int8 KV cache in plain torch: the fallback and the tests' twin.

The native kernel's arithmetic without its blocking: de-quantize to float32, then two batched
matmuls over whole buffers as the bf16 decode path does. Columns whose bias is -inf are forced
out of the softmax before it runs (a huge finite key there could otherwise make an ``inf +
-inf``), and their weights are zeroed, so what sits in them never reaches the output; a row
with no visible column gives zeros, as on the native path.
"""

from __future__ import annotations

import torch

from qwen_grpc.engine.kernels.kv_layout import dequantize_kv


def decode_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor,
    values: torch.Tensor,
    value_scales: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """float32 ``[B, H, D]``; see :func:`qwen_grpc.engine.kernels.decode_attention`."""
    batch, heads, head_dim = queries.shape
    kv_heads = keys.shape[1]
    hidden = bias.isneginf()[:, None, None, :]
    grouped = queries.float().view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, dequantize_kv(keys, key_scales).transpose(-1, -2))
    scores = (scores * scale + bias[:, None, None, :]).masked_fill(hidden, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).masked_fill(hidden, 0.0)
    dequantized = dequantize_kv(values, value_scales).masked_fill(hidden.transpose(-1, -2), 0.0)
    attended = torch.matmul(probabilities, dequantized)
    return attended.reshape(batch, heads, head_dim)
