"""Notices an engine thread that is stuck or dead, so Kubernetes can replace the pod.

A stuck model thread leaves health SERVING and every caller hanging; the watchdog turns that
into NOT_SERVING (the liveness probe then restarts the container) and UNAVAILABLE answers that
clients retry elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from qwen_grpc.engine.errors import UnavailableError
from qwen_grpc.engine.scheduler import Engine

_LOGGER = logging.getLogger(__name__)


class EngineWatchdog:
    """Checks the engine's progress from its own thread."""

    def __init__(
        self,
        engine: Engine,
        stall_seconds: float,
        on_failure: Callable[[str], None],
        interval_seconds: float = 0.5,
    ) -> None:
        self._engine = engine
        self._stall_seconds = stall_seconds
        self._on_failure = on_failure
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def diagnose(self) -> str | None:
        """Why the engine cannot serve, or ``None`` while it is healthy."""
        engine = self._engine
        if not engine.alive:
            return "the engine thread died"
        stalled_for = time.monotonic() - engine.last_progress
        if engine.has_work and stalled_for > self._stall_seconds:
            return f"the engine made no progress for {stalled_for:.0f} s with work pending"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            problem = self.diagnose()
            if problem is not None:
                _LOGGER.error("engine unhealthy: %s; reporting NOT_SERVING", problem)
                self._engine.abandon(UnavailableError(f"the engine is unhealthy: {problem}"))
                self._on_failure(problem)
                return
