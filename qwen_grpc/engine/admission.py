"""The engine's queue: one first-come-first-served line per client, the lines taking turns.

One FIFO over every caller lets a client that queues forty requests make all others wait for
those forty. Here a client's request waits at most one turn of every other client that is
waiting, however long a heavy client's backlog is; within one client, order is arrival order.
Whether the request that has its turn fits the batch and the KV budget is the scheduler's
question, not this queue's.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Round-robin over per-client FIFOs; not thread-safe (the engine's lock guards it)."""

    def __init__(self, client_of: Callable[[T], str]) -> None:
        self._client_of = client_of
        # Insertion order is turn order: the first line has the next turn; a line that was
        # served, or a client that arrives, goes to the end of the round.
        self._lines: dict[str, collections.deque[T]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        """Every waiting item, in the order they would be served if nothing else arrived."""
        return (item for _, _, item in self._turns())

    def waiting(self, client: str) -> int:
        """How many items ``client`` has in the queue."""
        line = self._lines.get(client)
        return len(line) if line else 0

    def push(self, item: T) -> None:
        self._lines.setdefault(self._client_of(item), collections.deque()).append(item)
        self._size += 1

    def peek(self) -> T:
        """The item whose turn it is; raises :class:`IndexError` when nothing waits."""
        for line in self._lines.values():
            return line[0]
        raise IndexError("peek into an empty queue")

    def pop(self) -> T:
        """Takes the item whose turn it is; its client's line moves to the end of the round."""
        client, line = next(iter(self._lines.items()))
        item = line.popleft()
        del self._lines[client]
        if line:
            self._lines[client] = line
        self._size -= 1
        return item

    def ahead_of_new(self, client: str) -> list[T]:
        """What would be served before an item of ``client`` pushed now, in serving order."""
        clients = list(self._lines)
        # A new item is served in the round after its client's last one, at the client's
        # rank; a client with nothing waiting joins the end of the first round.
        new_turn = (
            (len(self._lines[client]), clients.index(client))
            if client in self._lines
            else (0, len(clients))
        )
        ahead: list[T] = []
        for round_, rank, item in self._turns():
            if (round_, rank) >= new_turn:
                break
            ahead.append(item)
        return ahead

    def remove(self, leaves: Callable[[T], bool]) -> None:
        """Takes out every item for which ``leaves`` holds, asking once per item; the rest
        keep their order and their clients their turns."""
        for client, line in list(self._lines.items()):
            kept = collections.deque(item for item in line if not leaves(item))
            self._size -= len(line) - len(kept)
            if not kept:
                del self._lines[client]
            elif len(kept) < len(line):
                self._lines[client] = kept

    def clear(self) -> None:
        self._lines.clear()
        self._size = 0

    def _turns(self) -> Iterator[tuple[int, int, T]]:
        """``(round, rank of the line in the round, item)`` in serving order; O(queue) in all."""
        lines = list(enumerate(self._lines.values()))
        round_ = 0
        while lines:
            for rank, line in lines:
                yield round_, rank, line[round_]
            round_ += 1
            lines = [(rank, line) for rank, line in lines if len(line) > round_]
