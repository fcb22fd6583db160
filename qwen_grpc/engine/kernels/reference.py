"""The Q8_0 arithmetic in plain torch: the path on CPUs without AVX2, and the tests' twin.

It computes what the native kernel computes, not an approximation of it: activations are
quantized per block of 32 with the same fp32 operations, each block's integer dot product is
a float32 batched matmul of the integer values (exact: |sum| <= 32 * 127 * 127 < 2**24), then
the blocks are summed with ``d_w * d_x``. Only the float summation order differs, so results
agree with the native path to float rounding. It is several times slower than the native path.
"""

from __future__ import annotations

import torch

from qwen_grpc.engine.kernels.layout import TILE_ROWS, quantize_blocks, unpack_rows, unpack_tiles

_WORK_ELEMENTS = 1 << 22  # bounds the [blocks, M, rows] integer-sum buffer to 16 MB per chunk


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``[M, K]`` float32/bf16 times the packed weight: float32 ``[M, out_features]``."""
    rows = x.shape[0]
    tiles, blocks = packed.shape[0], packed.shape[1]
    xq, xs = quantize_blocks(x.float())
    xq_by_block = xq.transpose(0, 1)
    xs_by_block = xs.transpose(0, 1).unsqueeze(-1)
    out = torch.empty(rows, tiles * TILE_ROWS, dtype=torch.float32)
    step = max(1, _WORK_ELEMENTS // (blocks * max(rows, 1) * TILE_ROWS))
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        weights = unpack_tiles(packed[t0:t1])
        sums = torch.bmm(xq_by_block, weights.transpose(1, 2))
        w_scales = scales[t0:t1].permute(1, 0, 2).reshape(blocks, 1, -1)
        out[:, t0 * TILE_ROWS : t1 * TILE_ROWS] = (sums * (w_scales * xs_by_block)).sum(dim=0)
    out = out[:, :out_features]
    if bias is not None:
        out = out + bias
    return out.contiguous()


def rows(packed: torch.Tensor, scales: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (1-D int64) de-quantized to float32 ``[L, K]``."""
    tiles = torch.div(index, TILE_ROWS, rounding_mode="floor")
    lanes = index % TILE_ROWS
    values = unpack_rows(packed, tiles, lanes)
    return (values * scales[tiles, :, lanes].unsqueeze(-1)).reshape(index.shape[0], -1)
