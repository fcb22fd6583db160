"""A KV cache for a batch whose rows come and go between decode steps.

Rows are right-aligned: every row writes its next token into the same column, and a row that
joined with a shorter history is padded on the left (masked out). That keeps one dense tensor
per layer, so a decode step is a single forward pass over the whole batch. Joining and leaving
cost one copy of the cache; a decode step appends in place into spare capacity instead of
concatenating (which would copy the whole cache every token).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_GROWTH_COLUMNS = 256


class GrowableLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare columns for the next tokens."""

    def __init__(self, storage_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._storage_dtype = storage_dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._set(key_states[..., :0, :], value_states[..., :0, :])

    def _set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = _GROWTH_COLUMNS) -> None:
        """Copies ``keys``/``values`` into fresh buffers that have ``spare`` free columns."""
        batch, heads, length, dim = keys.shape
        self._key_buffer = keys.new_empty((batch, heads, length + spare, dim))
        self._value_buffer = values.new_empty((batch, heads, length + spare, dim))
        self._key_buffer[..., :length, :] = keys
        self._value_buffer[..., :length, :] = values
        self._length = length
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_buffer[..., : self._length, :]
        self.values = self._value_buffer[..., : self._length, :]

    def _states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exposed keys and values, which exist once the layer has been initialized."""
        if self.keys is None or self.values is None:
            raise RuntimeError("the cache layer has not been initialized")
        return self.keys, self.values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._storage_dtype is not None:
            key_states = key_states.to(self._storage_dtype)
            value_states = value_states.to(self._storage_dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._length + new > self._key_buffer.shape[-2]:
            self._set(*self._states(), spare=max(_GROWTH_COLUMNS, new))
        end = self._length + new
        self._key_buffer[..., self._length : end, :] = key_states
        self._value_buffer[..., self._length : end, :] = value_states
        self._length = end
        self._expose()
        return self._states()

    def select_rows(self, rows: torch.Tensor, drop_left: int) -> None:
        """Keeps ``rows`` and drops ``drop_left`` leading columns that are padding in all of them."""
        keys, values = self._states()
        self._set(keys[rows, :, drop_left:], values[rows, :, drop_left:])

    def append_rows(self, other: GrowableLayer) -> None:
        """Stacks another cache's rows under ours, left-padding whichever is shorter."""
        width = max(self._length, other._length)
        own_keys, own_values = self._states()
        other_keys, other_values = other._states()
        keys = torch.cat([_left_pad(own_keys, width), _left_pad(other_keys, width)])
        values = torch.cat([_left_pad(own_values, width), _left_pad(other_values, width)])
        self._set(keys, values)


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.nn.functional.pad(states, (0, 0, missing, 0))


class BatchKVCache(Cache):
    """The per-layer caches of one batch, with row-level join and leave."""

    def __init__(self, num_layers: int, storage_dtype: torch.dtype | None = None) -> None:
        self._growable = [GrowableLayer(storage_dtype) for _ in range(num_layers)]
        super().__init__(layers=list(self._growable))

    @property
    def width(self) -> int:
        """Columns currently held (history of the longest row, padding included)."""
        return self.get_seq_length()

    def select_rows(self, rows: list[int], drop_left: int = 0) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self._growable:
            layer.select_rows(index, drop_left)

    def append_rows(self, other: BatchKVCache) -> None:
        for mine, theirs in zip(self._growable, other._growable, strict=True):
            mine.append_rows(theirs)
