"""Well-behaved callers running beside a fault: the calls that must not notice it.

Every bystander call is the same greedy request, whose answer is known from running it alone.
The engine's greedy output does not depend on what shares the batch (tests/test_engine.py), so
a bystander call that fails or answers differently was damaged by the fault next to it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from reliability import calls
from reliability.calls import CallOutcome
from reliability.stats import counts


@dataclass(frozen=True)
class Reference:
    """A greedy request and the answer it gets when it runs alone."""

    messages: Sequence[chat_pb2.Message]
    options: chat_pb2.GenerationOptions
    text: str

    @classmethod
    def measure(
        cls,
        stub: chat_pb2_grpc.ChatServiceStub,
        messages: Sequence[chat_pb2.Message],
        options: chat_pb2.GenerationOptions,
        timeout: float,
    ) -> Reference:
        outcome = calls.chat(stub, messages, options, timeout=timeout)
        if not outcome.ok:
            raise RuntimeError(f"the reference call failed with {outcome.code}")
        return cls(messages, options, outcome.text)

    def damaged(self, outcome: CallOutcome) -> bool:
        return not outcome.ok or outcome.text != self.text


class Bystanders:
    """Threads calling the reference request back to back (Chat and StreamChat in turn)."""

    def __init__(self, address: str, reference: Reference, threads: int, timeout: float) -> None:
        self._address = address
        self._reference = reference
        self._timeout = timeout
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"bystander-{i}", daemon=True)
            for i in range(threads)
        ]
        self.outcomes: list[CallOutcome] = []

    def _run(self, index: int) -> None:
        reference = self._reference
        with calls.open_channel(self._address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            turn = index
            while not self._stop.is_set():
                call = calls.chat if turn % 2 == 0 else calls.stream
                self.outcomes.append(
                    call(stub, reference.messages, reference.options, timeout=self._timeout)
                )
                turn += 1

    def __enter__(self) -> Bystanders:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)

    def report(self) -> dict[str, object]:
        damaged = [o for o in self.outcomes if self._reference.damaged(o)]
        return {
            "calls": len(self.outcomes),
            "damaged": len(damaged),
            "damaged_codes": counts(
                o.code if not o.ok else "OK, different answer" for o in damaged
            ),
        }

    @property
    def unaffected(self) -> bool:
        """Calls were made, and every one ended OK with the reference answer."""
        return bool(self.outcomes) and not any(map(self._reference.damaged, self.outcomes))
