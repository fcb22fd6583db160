"""Watching a server from outside while a scenario runs: its health and its resident memory.

A scenario's verdict often hangs on what happened *between* its calls (did health flicker to
NOT_SERVING, how high did memory go), so these watchers poll on their own thread and keep every
sample with its time, measured from :meth:`start`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from harness.probes import health_status
from reliability import calls


class _Poller:
    """Calls :meth:`_sample` every ``interval`` seconds on a daemon thread until stopped."""

    def __init__(self, name: str, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.since = time.monotonic()

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def start(self) -> None:
        self.since = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class HealthWatch(_Poller):
    """Polls ``grpc.health.v1`` Check on its own connection and records every answer."""

    def __init__(self, address: str, interval: float) -> None:
        super().__init__("health-watch", interval)
        self._address = address
        self._channel: grpc.Channel
        self.seen: list[tuple[float, str]] = []

    def _sample(self) -> None:
        status = health_status(self._channel, timeout=1.0)
        self.seen.append((time.monotonic() - self.since, status))

    def start(self) -> None:
        self._channel = calls.open_channel(self._address)
        super().start()

    def stop(self) -> None:
        super().stop()
        self._channel.close()

    @property
    def statuses(self) -> list[str]:
        return [status for _, status in self.seen]

    def runs(self) -> list[dict[str, Any]]:
        """Consecutive equal observations merged: what health said, from when, how often."""
        merged: list[dict[str, Any]] = []
        for at, status in self.seen:
            if merged and merged[-1]["status"] == status:
                merged[-1]["polls"] += 1
            else:
                merged.append({"status": status, "from_seconds": round(at, 2), "polls": 1})
        return merged


class RssWatch(_Poller):
    """Samples a process's resident memory (``read`` returns bytes) and keeps the samples.

    A sampled peak can miss a spike shorter than the interval; the kernel's high-water mark
    (``VmHWM``) cannot, so scenarios judge by the larger of the two and record both.
    """

    def __init__(self, read: Callable[[], int], interval: float) -> None:
        super().__init__("rss-watch", interval)
        self._read = read
        self.samples: list[tuple[float, int]] = []

    def _sample(self) -> None:
        try:
            self.samples.append((time.monotonic() - self.since, self._read()))
        except (OSError, RuntimeError):
            self._stop.set()  # the process is gone: nothing more to measure

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)
