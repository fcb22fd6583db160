"""Attention over a paged KV cache in plain torch: the fallback, and the spec.

A row at a time: gather the blocks its table names, lay them end to end, cut at its length,
widen to float32 (int8 de-quantized by :func:`dequantize_kv`) and attend with two matmuls.
Only the blocks a row uses are read and the slots past its length are cut off before any
arithmetic, so whatever sits elsewhere in the pool or the table (NaN, -1) cannot reach the
output. One row never sees another's shapes, so its result does not depend on the batch,
as on the native path. A row of length 0 gives zeros.

A prompt chunk (:func:`chunk_attention`) attends over its row's history, gathered the same way,
and its own float32 keys and values, causally, with torch's SDPA.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from qwen_grpc.engine.kernels.kv_layout import dequantize_kv


def paged_decode_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    values: torch.Tensor,
    value_scales: torch.Tensor | None,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """float32 ``[B, H, D]``; see :func:`qwen_grpc.engine.kernels.paged_decode_attention`."""
    batch, heads, head_dim = queries.shape
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float32)
    capacity = block_table.shape[1] * keys.shape[2]
    for row, length in enumerate(lengths.tolist()):
        if not 0 <= length <= capacity:
            raise ValueError(
                f"lengths[{row}] = {length} is outside [0, {capacity}] (block table width x BS)"
            )
        if length == 0:
            continue
        ids = used_blocks(block_table[row], length, keys.shape[2], keys.shape[0], row)
        row_keys = gather_tokens(keys, key_scales, ids, length)
        row_values = gather_tokens(values, value_scales, ids, length)
        out[row] = attend(queries[row].float(), row_keys, row_values, scale)
    return out


def used_blocks(
    table_row: torch.Tensor, length: int, block_size: int, pool_blocks: int, row: int
) -> torch.Tensor:
    """The ids of the blocks holding a row's ``length`` tokens, checked to be in the pool."""
    ids = table_row[: -(-length // block_size)].long()
    if int(ids.min()) < 0 or int(ids.max()) >= pool_blocks:
        raise ValueError(
            f"block_table row {row} uses block ids {ids.tolist()}, outside [0, {pool_blocks})"
        )
    return ids


def gather_tokens(
    pool: torch.Tensor, scales: torch.Tensor | None, ids: torch.Tensor, length: int
) -> torch.Tensor:
    """float32 ``[KVH, length, D]``: blocks ``ids`` of ``pool`` end to end, cut at ``length``."""
    blocks = pool[ids]
    widened = blocks.float() if scales is None else dequantize_kv(blocks, scales[ids])
    kv_heads, head_dim = pool.shape[1], pool.shape[3]
    return widened.transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, :length]


def attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """One row's ``[H, D]`` output over ``[KVH, length, D]``; query heads sharing a kv head
    are one matmul."""
    heads, head_dim = queries.shape
    kv_heads = keys.shape[0]
    grouped = queries.view(kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), values).reshape(heads, head_dim)


def chunk_attention(
    queries: torch.Tensor,
    own_keys: torch.Tensor,
    own_values: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    values: torch.Tensor,
    value_scales: torch.Tensor | None,
    blocks: torch.Tensor,
    position: int,
    scale: float,
) -> torch.Tensor:
    """float32 ``[C, H, D]``; see :func:`qwen_grpc.engine.kernels.paged_chunk_attention`."""
    count, heads, _ = queries.shape
    all_keys, all_values = own_keys.transpose(0, 1), own_values.transpose(0, 1)
    mask: torch.Tensor | None = None
    if position:
        ids = used_blocks(blocks, position, keys.shape[2], keys.shape[0], 0)
        all_keys = torch.cat([gather_tokens(keys, key_scales, ids, position), all_keys], dim=1)
        all_values = torch.cat(
            [gather_tokens(values, value_scales, ids, position), all_values], dim=1
        )
        query_positions = torch.arange(position, position + count)
        mask = torch.arange(position + count) <= query_positions.unsqueeze(-1)
    attended = functional.scaled_dot_product_attention(
        queries.transpose(0, 1).unsqueeze(0),
        all_keys.unsqueeze(0),
        all_values.unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=keys.shape[1] != heads,
    )
    return attended[0].transpose(0, 1)
