"""What one forward pass computes: ragged pieces of several sequences, flattened into one batch.

A step mixes running sequences' decode tokens (one each) with chunks of prompts being
prefilled. Every projection runs once over all of their tokens together, so the weights are
read once per step however the tokens are split; only attention needs to know which token
belongs to which sequence, and that is what a :class:`StepPlan` tells it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwen_grpc.engine.kv_cache import KVRow, PagedKVCache


@dataclass(frozen=True)
class Segment:
    """Tokens of one sequence fed at its next positions, and from where logits are wanted.

    ``logits_from`` counts within ``tokens``: ``len(tokens) - 1`` for the next token only (a
    decode step, or a prompt's last chunk), ``len(tokens)`` for none (an inner chunk), 0 for
    every position (scoring a text).
    """

    row: KVRow
    tokens: Sequence[int]
    logits_from: int

    @classmethod
    def next_token(cls, row: KVRow, tokens: Sequence[int]) -> Segment:
        return cls(row, tokens, len(tokens) - 1)

    @classmethod
    def inner(cls, row: KVRow, tokens: Sequence[int]) -> Segment:
        return cls(row, tokens, len(tokens))


@dataclass(frozen=True)
class Chunk:
    """Several tokens of one row: attention of their queries over the row's history and them."""

    start: int
    """Index of the chunk's first token in the flattened batch."""
    count: int
    position: int
    """The row's length before the chunk, i.e. the first token's position."""
    blocks: torch.Tensor
    """The row's block ids (int32) covering ``position + count`` tokens."""


@dataclass(frozen=True)
class StepPlan:
    """The flattened batch of one forward pass and where its keys and values go."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    """Where each token's keys and values go (:meth:`PagedKVCache.flat_slots`)."""
    single_index: torch.Tensor
    """Flat indices of the one-token segments, attended by the paged decode kernel."""
    single_table: torch.Tensor
    single_lengths: torch.Tensor
    chunks: tuple[Chunk, ...]
    logits_index: torch.Tensor
    """Flat indices of the tokens whose logits the caller wants, in segment order."""
    segments: tuple[Segment, ...]

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def only_singles(self) -> bool:
        """Every token is a one-token segment, in order: the decode kernel's output is the lot."""
        return not self.chunks

    def commit(self) -> None:
        """Advances every row past its tokens, once the forward pass has written them."""
        for segment in self.segments:
            segment.row.length += len(segment.tokens)


def plan_step(cache: PagedKVCache, segments: Sequence[Segment]) -> StepPlan:
    """Takes the blocks the segments need and lays their tokens out for one forward pass.

    Rows' lengths move only on :meth:`StepPlan.commit`: a pass that fails leaves every row as
    it was, and the next pass overwrites the same slots.
    """
    ids: list[int] = []
    positions: list[int] = []
    blocks: list[int] = []
    offsets: list[int] = []
    singles: list[int] = []
    single_rows: list[KVRow] = []
    chunks: list[Chunk] = []
    wanted: list[int] = []
    for segment in segments:
        row, count, start = segment.row, len(segment.tokens), len(ids)
        if count == 0:
            raise ValueError("a segment needs at least one token")
        row_blocks, row_offsets = cache.slots(row, count)
        ids.extend(segment.tokens)
        positions.extend(range(row.length, row.length + count))
        blocks.extend(row_blocks)
        offsets.extend(row_offsets)
        wanted.extend(range(start + segment.logits_from, start + count))
        if count == 1:
            singles.append(start)
            single_rows.append(row)
        else:
            covered = cache.blocks_for(row.length + count)
            chunks.append(
                Chunk(
                    start, count, row.length, torch.tensor(row.blocks[:covered], dtype=torch.int32)
                )
            )
    return StepPlan(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slots=cache.flat_slots(
            torch.tensor(blocks, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)
        ),
        single_index=torch.tensor(singles, dtype=torch.long),
        single_table=_block_table(single_rows, cache),
        single_lengths=torch.tensor([row.length + 1 for row in single_rows], dtype=torch.int32),
        chunks=tuple(chunks),
        logits_index=torch.tensor(wanted, dtype=torch.long),
        segments=tuple(segments),
    )


def _block_table(rows: Sequence[KVRow], cache: PagedKVCache) -> torch.Tensor:
    """``[rows, widest]`` int32 block ids, each row's own blocks first, zeros after (unread)."""
    width = max((cache.blocks_for(row.length + 1) for row in rows), default=0)
    table = torch.zeros((len(rows), width), dtype=torch.int32)
    for index, row in enumerate(rows):
        used = row.blocks[: cache.blocks_for(row.length + 1)]
        table[index, : len(used)] = torch.tensor(used, dtype=torch.int32)
    return table
