"""A paged KV cache: every sequence holds the blocks its real length needs, nothing more.

Each layer keeps one pool of fixed-size blocks ``[blocks, kv_heads, BLOCK_TOKENS, head_dim]``
for keys and one for values. A sequence (:class:`KVRow`) owns a list of block ids, its block
table, and writes token ``t`` into block ``blocks[t // BLOCK_TOKENS]`` at offset
``t % BLOCK_TOKENS``. So joining, leaving and growing copy nothing: a join takes free blocks, a
leave returns them, a growth takes one more. Memory and decode attention follow each row's own
length instead of the widest row's, which the dense right-aligned cache this replaces padded
every row to (one 4,000-token conversation among seven short ones made all eight 4,000 wide).

Admission reserves a row's whole budget (prompt plus max_new_tokens, in blocks) up front, so a
running sequence never finds the pool empty and nothing is ever preempted.

The pools are allocated untouched (``torch.empty`` of an ``mmap``-served size), so resident
memory grows with the highest block in use; free blocks are handed out lowest id first to keep
that compact, and the pools are dropped whenever the cache empties, returning their pages.

A quantized cache stores keys and values as int8 with one float32 scale per token and head
(``kernels.quantize_kv``): half the bytes of bf16, read by ``kernels.paged_decode_attention``.
"""

from __future__ import annotations

import heapq
import math

import torch

from qwen_grpc.engine.kernels import quantize_kv
from qwen_grpc.engine.memory import release_free_memory

BLOCK_TOKENS = 32
"""Tokens per block: a row wastes under one block, and a block of one kv head is 2 KB of int8
(Qwen1.5-0.5B's head_dim of 64), long enough for the attention kernel's inner loop."""


class KVRow:
    """One sequence's place in the cache: its blocks, its filled length and its reservation."""

    def __init__(self, reserved_blocks: int) -> None:
        self.blocks: list[int] = []
        self.length = 0
        self.reserved_blocks = reserved_blocks


class LayerPool:
    """One layer's block pools. Plain: ``(keys, values)``; quantized: ``(keys, key_scales,
    values, value_scales)``, the scales ``[blocks, kv_heads, BLOCK_TOKENS]``."""

    def __init__(self, blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self._shape = (blocks, kv_heads, BLOCK_TOKENS, head_dim)
        self._dtype = dtype
        self._parts: tuple[torch.Tensor, ...] = ()

    @property
    def quantized(self) -> bool:
        return self._dtype == torch.int8

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The pools, allocated on first use (untouched pages cost no memory)."""
        if not self._parts:
            values = torch.empty(self._shape, dtype=self._dtype)
            if self.quantized:
                scales = torch.empty(self._shape[:3], dtype=torch.float32)
                self._parts = (values, scales, torch.empty_like(values), torch.empty_like(scales))
            else:
                self._parts = (values, torch.empty_like(values))
        return self._parts

    def release(self) -> None:
        self._parts = ()

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores ``keys, values [tokens, kv_heads, head_dim]`` (float32) at ``slots`` (from
        :meth:`PagedKVCache.flat_slots`), one contiguous row copy per token and head.

        ``pool[blocks, :, offsets] = part`` is the same assignment, but torch's CPU index_put
        took 0.3 ms per call at 8 tokens, a third of a whole decode step over 4 x 24 calls.
        """
        stored: tuple[torch.Tensor, ...]
        if self.quantized:
            stored = (*quantize_kv(keys), *quantize_kv(values))
        else:
            stored = (keys.to(self._dtype), values.to(self._dtype))
        for pool, part in zip(self.parts(), stored, strict=True):
            rows = pool.view(-1, *pool.shape[3:])
            rows.index_copy_(0, slots, part.reshape(-1, *part.shape[2:]))

    def operands(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(keys, key_scales, values, value_scales)`` as the paged kernels take them: the
        scales ``None`` for a float pool."""
        parts = self.parts()
        if self.quantized:
            keys, key_scales, values, value_scales = parts
            return keys, key_scales, values, value_scales
        return parts[0], None, parts[1], None


class PagedKVCache:
    """The block pools of every layer and the block allocator shared by them.

    A block id means the same slot in every layer's pool, so one table serves all layers.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, tokens: int
    ) -> None:
        self.total_blocks = max(1, math.ceil(tokens / BLOCK_TOKENS))
        self.kv_heads = kv_heads
        self.layers = [
            LayerPool(self.total_blocks, kv_heads, head_dim, dtype) for _ in range(num_layers)
        ]
        self._free = list(range(self.total_blocks))
        self._reserved = 0

    def flat_slots(self, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Row indices into a pool seen as ``[blocks * kv_heads * BLOCK_TOKENS, ...]`` of every
        (token, kv head) pair, token-major: where :meth:`LayerPool.write` puts each."""
        heads = torch.arange(self.kv_heads)
        return (
            (blocks[:, None] * self.kv_heads + heads) * BLOCK_TOKENS + offsets[:, None]
        ).reshape(-1)

    @staticmethod
    def blocks_for(tokens: int) -> int:
        return math.ceil(tokens / BLOCK_TOKENS)

    @property
    def reserved_blocks(self) -> int:
        return self._reserved

    def can_reserve(self, tokens: int) -> bool:
        return self._reserved + self.blocks_for(tokens) <= self.total_blocks

    def open_row(self, tokens: int) -> KVRow:
        """A row with room for ``tokens`` reserved; raises if the pool cannot promise it."""
        if not self.can_reserve(tokens):
            raise MemoryError(f"the KV cache cannot reserve {tokens} more tokens")
        row = KVRow(self.blocks_for(tokens))
        self._reserved += row.reserved_blocks
        return row

    def close_row(self, row: KVRow) -> None:
        """Returns the row's blocks and reservation; dropping the pools once nothing is left."""
        for block in row.blocks:
            heapq.heappush(self._free, block)
        self._reserved -= row.reserved_blocks
        row.blocks, row.reserved_blocks, row.length = [], 0, 0
        if self._reserved == 0:
            for layer in self.layers:
                layer.release()
            release_free_memory()

    def slots(self, row: KVRow, count: int) -> tuple[list[int], list[int]]:
        """Blocks and offsets for the row's next ``count`` tokens, taking blocks as needed."""
        end = row.length + count
        needed = self.blocks_for(end)
        if needed > row.reserved_blocks:
            raise MemoryError(f"the row reserved {row.reserved_blocks} blocks and needs {needed}")
        while len(row.blocks) < needed:
            row.blocks.append(heapq.heappop(self._free))
        positions = range(row.length, end)
        return (
            [row.blocks[t // BLOCK_TOKENS] for t in positions],
            [t % BLOCK_TOKENS for t in positions],
        )
