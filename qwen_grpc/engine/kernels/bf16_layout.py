"""The packed bf16 weight format ``bf16.cpp`` reads, its packer, and the torch fallback on it.

Output rows are grouped in tiles of 16 (the last tile padded with zero rows); each tile's K
values are stored as ``K / 2`` vectors of 32 bf16 where vector ``g`` holds ``w[r, 2g]`` and
``w[r, 2g + 1]`` of every row ``r`` side by side, so one 512-bit load gives both columns of all
16 rows as float32 with two integer operations. The bytes are the weight's own bf16 values,
reordered: nothing is rounded beyond the bf16 conversion of a float32 weight.

The fallback multiplies the same bf16 values, converted to float32, with float32 activations
(``F.linear``), unpacking a few tiles at a time so the float32 copy stays small (Qwen1.5's
151936-row head would be 622 MB at once). It agrees with the native kernel to float rounding.
"""

from __future__ import annotations

import torch
from torch.nn import functional

TILE_ROWS = 16
K_STEP = 16
_ROWS_PER_CHUNK = 4096  # a multiple of TILE_ROWS: bounds the fp32 working copy to 16 MB at K=1024


def pack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 ``[tiles, K/2, 32]`` from an ``[N, K]`` weight (K a multiple of 16)."""
    rows, k = weight.shape
    if k % K_STEP:
        raise ValueError(f"in_features must be a multiple of {K_STEP}, got {k}")
    tiles = -(-rows // TILE_ROWS)
    packed = torch.empty(tiles, k // 2, 2 * TILE_ROWS, dtype=torch.bfloat16)
    for start in range(0, tiles * TILE_ROWS, _ROWS_PER_CHUNK):
        chunk = weight[start : start + _ROWS_PER_CHUNK].to(torch.bfloat16)
        padded_rows = -(-chunk.shape[0] // TILE_ROWS) * TILE_ROWS
        if padded_rows != chunk.shape[0]:
            chunk = torch.cat([chunk, chunk.new_zeros(padded_rows - chunk.shape[0], k)])
        t0, t1 = start // TILE_ROWS, (start + padded_rows) // TILE_ROWS
        tiled = chunk.view(t1 - t0, TILE_ROWS, k // 2, 2).permute(0, 2, 1, 3)
        packed[t0:t1] = tiled.reshape(t1 - t0, k // 2, 2 * TILE_ROWS)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The bf16 ``[tiles * 16, K]`` rows of ``packed`` (tile padding included)."""
    tiles, pairs = packed.shape[0], packed.shape[1]
    grouped = packed.view(tiles, pairs, TILE_ROWS, 2).permute(0, 2, 1, 3)
    return grouped.reshape(tiles * TILE_ROWS, 2 * pairs)


def linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """float32 ``[M, K]`` times the packed weight, all in float32: ``[M, out_features]``."""
    step = _ROWS_PER_CHUNK // TILE_ROWS
    parts = []
    for t0 in range(0, packed.shape[0], step):
        weight = unpack(packed[t0 : t0 + step]).float()
        parts.append(functional.linear(x, weight))
    out = torch.cat(parts, dim=1)[:, :out_features]
    if bias is not None:
        out = out + bias
    return out.contiguous()
