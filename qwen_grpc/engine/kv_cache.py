"""A KV cache for a batch whose rows come and go between decode steps.

Rows are right-aligned: every row writes its next token into the same column, and a row that
joined with a shorter history is padded on the left (masked out). That keeps one dense tensor
per layer, so a decode step is a single forward pass over the whole batch. Joining and leaving
cost one copy of the cache; a decode step appends in place into spare capacity instead of
concatenating (which would copy the whole cache every token). Every reallocation hands the
freed buffers' pages back to the OS (see ``memory.py``), so RSS follows the batch down too.
"""

from __future__ import annotations

import torch

from qwen_grpc.engine.memory import release_free_memory

# Spare columns allocated each time a layer's buffer fills up: a larger step copies the cache
# less often; a smaller one holds less unused memory and, since decode attention runs over the
# whole buffer, wastes less attention on empty columns (8 rows x 24 layers x 32 columns of
# Qwen1.5-0.5B keys and values are 25 MB in bf16).
_GROWTH_COLUMNS = 32


class LayerCache:
    """One layer's keys and values ``[batch, kv_heads, width, head_dim]`` with spare columns."""

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._width = 0

    @property
    def width(self) -> int:
        return self._width

    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[-2]

    def reserve(self, columns: int) -> None:
        """Makes room for ``columns`` more without moving the filled ones again this step."""
        if self._width + columns > self.capacity:
            self._set(*self.states(), spare=columns)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole contiguous buffers, spare columns (zeros) included.

        Batched matmuls copy a column slice of a larger buffer into a contiguous tensor first;
        at 8 rows x 500 columns that copy cost more than the attention itself.
        """
        if self._keys is None or self._values is None:
            raise RuntimeError("the cache layer is empty")
        return self._keys, self._values

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the filled columns."""
        if self._keys is None or self._values is None:
            raise RuntimeError("the cache layer is empty")
        return self._keys[..., : self._width, :], self._values[..., : self._width, :]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes the new columns (growing the buffers if they are full)."""
        if self._keys is None:
            self._set(keys[..., :0, :], values[..., :0, :], spare=keys.shape[-2])
        self.reserve(keys.shape[-2])
        assert self._keys is not None and self._values is not None
        end = self._width + keys.shape[-2]
        self._keys[..., self._width : end, :] = keys
        self._values[..., self._width : end, :] = values
        self._width = end

    def _set(self, keys: torch.Tensor, values: torch.Tensor, spare: int) -> None:
        """Copies ``keys``/``values`` into fresh buffers with room for ``spare`` more columns.

        Spare columns are zeros, not garbage: attention over the whole buffer masks them, and a
        masked NaN would still turn the softmax-weighted sum into NaN.
        """
        batch, heads, width, dim = keys.shape
        capacity = width + max(spare, _GROWTH_COLUMNS)
        self._keys = keys.new_zeros((batch, heads, capacity, dim))
        self._values = values.new_zeros((batch, heads, capacity, dim))
        self._keys[..., :width, :] = keys
        self._values[..., :width, :] = values
        self._width = width

    def select_rows(self, rows: torch.Tensor, drop_left: int) -> None:
        """Keeps ``rows`` and drops ``drop_left`` leading columns that are padding in all of them."""
        keys, values = self.states()
        self._set(keys[rows, :, drop_left:], values[rows, :, drop_left:], spare=0)

    def append_rows(self, other: LayerCache) -> None:
        """Stacks another cache's rows under ours, left-padding whichever is shorter."""
        width = max(self._width, other._width)
        own_keys, own_values = self.states()
        other_keys, other_values = other.states()
        keys = torch.cat([_left_pad(own_keys, width), _left_pad(other_keys, width)])
        values = torch.cat([_left_pad(own_values, width), _left_pad(other_values, width)])
        self._set(keys, values, spare=0)


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


class BatchKVCache:
    """The per-layer caches of one batch, with row-level join and leave."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]

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
