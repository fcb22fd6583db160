"""The Q8_0 weight format both kernel paths read, and the quantizer that writes it.

llama.cpp's Q8_0 arithmetic: blocks of 32 along K, scale ``d = max|w| / 127``, values
``round(w * (1 / d))`` (round half to even, as the AVX512 conversion does). The layout is the
native kernel's: output rows in tiles of 16, each tile's 16 x 32 block stored as 8 vectors of
64 bytes where vector ``g`` holds bytes ``w[r, 4g:4g + 4]`` of every row ``r`` side by side, so
one 512-bit load (two 256-bit ones on AVX2) feeds a dot product for 16 rows at once. Values are
stored offset by +128 (``uint8``) because vpdpbusd multiplies unsigned by signed bytes; the VNNI
kernel subtracts ``128 * sum(x)`` to stay exact, the AVX2 one flips the top bit back. The torch fallback reads the same tensors.
"""

from __future__ import annotations

import torch

BLOCK = 32
TILE_ROWS = 16
GROUP = 4
OFFSET = 128
_ROWS_PER_CHUNK = 4096  # a multiple of TILE_ROWS: bounds the fp32 working copy to 16 MB at K=1024


def block_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and its inverse per block of the last dim (fp32), zero for an all-zero block."""
    scale = blocks.abs().amax(dim=-1) / 127.0
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return scale, inverse


def quantize_blocks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 of ``[..., K]`` float32: integer values as float32 ``[..., K/32, 32]`` and scales."""
    blocks = values.reshape(*values.shape[:-1], -1, BLOCK)
    scale, inverse = block_scales(blocks)
    return torch.round(blocks * inverse.unsqueeze(-1)).clamp_(-127, 127), scale


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes ``[N, K]`` in row chunks into ``uint8 [tiles, K/32, 512]`` and fp32 scales.

    Chunks keep the peak memory small: Qwen1.5-0.5B's tied 151936 x 1024 embedding would be
    622 MB as one fp32 copy.
    """
    rows, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"in_features must be a multiple of {BLOCK}, got {k}")
    blocks = k // BLOCK
    tiles = -(-rows // TILE_ROWS)
    packed = torch.empty(tiles, blocks, TILE_ROWS * BLOCK, dtype=torch.uint8)
    scales = torch.empty(tiles, blocks, TILE_ROWS, dtype=torch.float32)
    for start in range(0, tiles * TILE_ROWS, _ROWS_PER_CHUNK):
        chunk = weight[start : start + _ROWS_PER_CHUNK].float()
        padded_rows = -(-chunk.shape[0] // TILE_ROWS) * TILE_ROWS
        if padded_rows != chunk.shape[0]:
            chunk = torch.cat([chunk, chunk.new_zeros(padded_rows - chunk.shape[0], k)])
        q, scale = quantize_blocks(chunk)
        t0, t1 = start // TILE_ROWS, (start + padded_rows) // TILE_ROWS
        tiled = (q + OFFSET).to(torch.uint8).view(t1 - t0, TILE_ROWS, blocks, BLOCK // GROUP, GROUP)
        packed[t0:t1] = tiled.permute(0, 2, 3, 1, 4).reshape(t1 - t0, blocks, TILE_ROWS * BLOCK)
        scales[t0:t1] = scale.view(t1 - t0, TILE_ROWS, blocks).transpose(1, 2)
    return packed, scales


def unpack_rows(packed: torch.Tensor, tiles: torch.Tensor, lanes: torch.Tensor) -> torch.Tensor:
    """The signed integer values of rows ``(tile, lane)`` as float32 ``[L, K/32, 32]``."""
    count, blocks = packed.shape[0], packed.shape[1]
    grouped = packed.view(count, blocks, BLOCK // GROUP, TILE_ROWS, GROUP)
    picked = grouped[tiles, :, :, lanes, :]
    return picked.reshape(-1, blocks, BLOCK).float() - OFFSET


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """Signed integer values of whole tiles as float32 ``[K/32, tiles * 16, 32]``."""
    count, blocks = packed.shape[0], packed.shape[1]
    grouped = packed.view(count, blocks, BLOCK // GROUP, TILE_ROWS, GROUP)
    return grouped.permute(1, 0, 3, 2, 4).reshape(blocks, count * TILE_ROWS, BLOCK).float() - OFFSET
