"""Sampling a process's resident memory in a thread: a cross-check on the kernel's VmHWM."""

from __future__ import annotations

import threading

import psutil


class RssSampler:
    """The highest RSS seen every ``interval_s`` while the ``with`` block runs."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_bytes = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
