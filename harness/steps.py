"""The engine's clock for tests: count its forward passes, or hold it at the next decode step.

Tests of deadlines, cancellation and drains would otherwise race the machine's speed. Through
the engine's :class:`StepObserver` hook they can instead count steps ("stopped within one
step") and freeze generation at a known point ("the stream is still in flight when ...").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from qwen_grpc.engine.scheduler import Engine, StepObserver

_WAIT_SECONDS = 30.0
# Conditions on the engine's queues change between steps too (a cancelled call leaves them).
_RECHECK_SECONDS = 0.01


class StepGate:
    """Wraps an engine's observer while in a ``with`` block; the wrapped one still sees every step.

    ``hold()`` makes the next decode step wait, on the engine thread, until ``release()``: every
    sequence stays where it is, in the batch or the queue.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._inner: StepObserver | None = None
        self._cond = threading.Condition()
        self._holding = False
        self._released = threading.Event()
        self.held = threading.Event()
        """Set while the engine waits at a held step."""
        self.decode_steps = 0

    def __enter__(self) -> StepGate:
        self._inner = self._engine.observer
        self._engine.observer = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
        self._engine.observer = self._inner

    def on_step(self, kind: str, batch_size: int, tokens: int, seconds: float) -> None:
        if self._inner is not None:
            self._inner.on_step(kind, batch_size, tokens, seconds)
        if kind != "decode":
            return
        with self._cond:
            self.decode_steps += 1
            self._cond.notify_all()
            holding = self._holding
        if holding:
            self.held.set()
            self._released.wait()

    def hold(self) -> None:
        """The next decode step waits for :meth:`release`."""
        with self._cond:
            self._released.clear()
            self.held.clear()
            self._holding = True

    def release(self) -> None:
        with self._cond:
            self._holding = False
            self._released.set()

    def wait_for(self, condition: Callable[[], bool], timeout: float = _WAIT_SECONDS) -> bool:
        """Waits until ``condition()`` holds, re-checking after every decode step and every 10 ms."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, _RECHECK_SECONDS))
            return True

    def steps_until_idle(self, timeout: float = _WAIT_SECONDS) -> int:
        """Decode steps the engine still runs before no sequence runs or waits."""
        start = self.decode_steps
        engine = self._engine
        idle = self.wait_for(lambda: engine.active_sequences == 0 and engine.queued_requests == 0)
        assert idle, "the engine never went idle"
        return self.decode_steps - start
