"""A KV cache for a batch whose rows come and go between decode steps.

Rows are right-aligned: every row writes its next token into the same column, and a row that
joined with a shorter history is padded on the left (masked out). That keeps one dense tensor
per layer, so a decode step is a single forward pass over the whole batch. Joining and leaving
cost one copy of the cache; a decode step appends in place into spare capacity instead of
concatenating (which would copy the whole cache every token). Every reallocation hands the
freed buffers' pages back to the OS (see ``memory.py``), so RSS follows the batch down too.

A quantized cache stores keys and values as int8 with one float32 scale per token and head
(``kernels.quantize_kv``): half the bytes of bf16, read by ``kernels.decode_attention``.
"""

from __future__ import annotations

import torch

from qwen_grpc.engine.kernels import dequantize_kv, quantize_kv
from qwen_grpc.engine.memory import release_free_memory

# Spare columns allocated each time a layer's buffer fills up: a larger step copies the cache
# less often; a smaller one holds less unused memory and, since decode attention runs over the
# whole buffer, wastes less attention on empty columns (8 rows x 24 layers x 32 columns of
# Qwen1.5-0.5B keys and values are 25 MB in bf16).
_GROWTH_COLUMNS = 32
# Every stored tensor is [batch, kv_heads, columns, ...]: keys and values, and their scales.
_COLUMNS = 2


class LayerCache:
    """One layer's keys and values ``[batch, kv_heads, width, head_dim]`` with spare columns.

    Plain: ``(keys, values)``. Quantized: ``(keys, key_scales, values, value_scales)``.
    """

    def __init__(self, quantized: bool) -> None:
        self.quantized = quantized
        self._parts: tuple[torch.Tensor, ...] = ()
        self._width = 0

    @property
    def width(self) -> int:
        return self._width

    @property
    def capacity(self) -> int:
        return self._parts[0].shape[_COLUMNS] if self._parts else 0

    def reserve(self, columns: int) -> None:
        """Makes room for ``columns`` more without moving the filled ones again this step."""
        if self._width + columns > self.capacity:
            self._set(self._filled(), spare=columns)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The whole contiguous buffers, spare columns (zeros) included.

        Batched matmuls copy a column slice of a larger buffer into a contiguous tensor first;
        at 8 rows x 500 columns that copy cost more than the attention itself.
        """
        if not self._parts:
            raise RuntimeError("the cache layer is empty")
        return self._parts

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the filled columns (de-quantized to float32 if stored as int8)."""
        parts = self._filled()
        if self.quantized:
            keys, key_scales, values, value_scales = parts
            return dequantize_kv(keys, key_scales), dequantize_kv(values, value_scales)
        return parts[0], parts[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes the new columns (growing the buffers if they are full)."""
        parts = (*quantize_kv(keys), *quantize_kv(values)) if self.quantized else (keys, values)
        columns = keys.shape[_COLUMNS]
        if not self._parts:
            self._set(tuple(part.narrow(_COLUMNS, 0, 0) for part in parts), spare=columns)
        self.reserve(columns)
        for buffer, part in zip(self._parts, parts, strict=True):
            buffer.narrow(_COLUMNS, self._width, columns).copy_(part)
        self._width += columns

    def _filled(self) -> tuple[torch.Tensor, ...]:
        if not self._parts:
            raise RuntimeError("the cache layer is empty")
        return tuple(part.narrow(_COLUMNS, 0, self._width) for part in self._parts)

    def _set(self, parts: tuple[torch.Tensor, ...], spare: int) -> None:
        """Copies ``parts`` into fresh buffers with room for ``spare`` more columns.

        Spare columns are zeros, not garbage: attention over the whole buffer masks them, and a
        masked NaN would still turn the softmax-weighted sum into NaN.
        """
        width = parts[0].shape[_COLUMNS]
        capacity = width + max(spare, _GROWTH_COLUMNS)
        buffers = []
        for part in parts:
            shape = list(part.shape)
            shape[_COLUMNS] = capacity
            buffer = part.new_zeros(shape)
            buffer.narrow(_COLUMNS, 0, width).copy_(part)
            buffers.append(buffer)
        self._parts = tuple(buffers)
        self._width = width

    def select_rows(self, rows: torch.Tensor, drop_left: int) -> None:
        """Keeps ``rows`` and drops ``drop_left`` leading columns that are padding in all of them."""
        width = self._width - drop_left
        kept = tuple(part[rows].narrow(_COLUMNS, drop_left, width) for part in self._filled())
        self._set(kept, spare=0)

    def append_rows(self, other: LayerCache) -> None:
        """Stacks another cache's rows under ours, left-padding whichever is shorter."""
        width = max(self._width, other._width)
        stacked = tuple(
            torch.cat([_left_pad(mine, width), _left_pad(theirs, width)])
            for mine, theirs in zip(self._filled(), other._filled(), strict=True)
        )
        self._set(stacked, spare=0)


def _left_pad(part: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - part.shape[_COLUMNS]
    if missing == 0:
        return part
    shape = list(part.shape)
    shape[_COLUMNS] = missing
    return torch.cat([part.new_zeros(shape), part], dim=_COLUMNS)


class BatchKVCache:
    """The per-layer caches of one batch, with row-level join and leave."""

    def __init__(self, num_layers: int, quantized: bool = False) -> None:
        self.layers = [LayerCache(quantized) for _ in range(num_layers)]

    @property
    def width(self) -> int:
        """Columns currently held (history of the longest row, padding included)."""
        return self.layers[0].width

    def reserve(self, columns: int) -> int:
        """Room for ``columns`` more in every layer; returns the (common) capacity."""
        for layer in self.layers:
            if layer.width + columns > layer.capacity:
                layer.reserve(columns)
                # Layer by layer: freed buffers would otherwise pile up to a whole cache copy.
                release_free_memory()
        return self.layers[0].capacity

    def select_rows(self, rows: list[int], drop_left: int = 0) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self.layers:
            layer.select_rows(index, drop_left)
        release_free_memory()

    def append_rows(self, other: BatchKVCache) -> None:
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.append_rows(theirs)
        release_free_memory()
