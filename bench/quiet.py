"""Measuring on a shared machine: wait for a quiet CPU, and redo measurements that were not.

Other users' jobs on the same two cores can triple a decode step for a few seconds. Linux PSI
(``/proc/pressure/cpu``) counts the time in which some runnable task waited for a CPU; its growth
over a measurement, divided by the measurement's wall time, is the *stall share*. The bench's own
processes cause a little (a few %); much more means that measurement was distorted. Each
measurement starts after a quiet moment and is redone (up to ``retries`` times, keeping the
least disturbed attempt) when its stall share is too high. Every record keeps its stall share so
a reader can judge what is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")


def cpu_stall_us() -> int | None:
    """Cumulative microseconds in which some runnable task waited for a CPU (PSI ``some``)."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class Quiet:
    """How picky to be about machine load; all zeros measures whatever happens."""

    start_below_pct: float = 0.0
    """Start a measurement only after a 2 s window with less stall than this."""
    max_wait_s: float = 0.0
    """Longest wait for such a window; then measure anyway."""
    redo_above_pct: float = 0.0
    """Redo a measurement whose stall share exceeded this (0: never)."""
    retries: int = 0
    """Most redos per measurement."""


@dataclass(frozen=True)
class Quietly(Generic[_T]):
    """A measurement's result with the stall share it ran under."""

    value: _T
    stall_share: float | None
    attempts: int
    waited_s: float


def wait_for_quiet(quiet: Quiet, window_s: float = 2.0) -> float:
    """Waits for a ``window_s`` with little CPU stall; returns the seconds waited.

    Short windows of the cumulative counter are used instead of PSI's 10-second average so the
    bench's own just-finished work does not count as load.
    """
    if quiet.start_below_pct <= 0:
        return 0.0
    started = time.monotonic()
    while True:
        before = cpu_stall_us()
        time.sleep(window_s)
        after = cpu_stall_us()
        waited = time.monotonic() - started
        if before is None or after is None:
            return waited
        share = 100 * (after - before) / 1e6 / window_s
        if share < quiet.start_below_pct:
            return waited
        if waited >= quiet.max_wait_s:
            _LOGGER.warning("CPU stall still %.0f %% after %.0f s; measuring anyway", share, waited)
            return waited


def measure_quietly(what: str, measure: Callable[[], _T], quiet: Quiet) -> Quietly[_T]:
    """Runs ``measure`` in a quiet moment; redoes it while it ran under heavy stall."""
    best: Quietly[_T] | None = None
    waited_total = 0.0
    for attempt in range(1, quiet.retries + 2):
        waited_total += wait_for_quiet(quiet)
        before, started = cpu_stall_us(), time.perf_counter()
        value = measure()
        elapsed, after = time.perf_counter() - started, cpu_stall_us()
        share = None
        if before is not None and after is not None and elapsed > 0:
            share = round((after - before) / 1e6 / elapsed, 3)
        if best is None or (share is not None and (best.stall_share or 0) > share):
            best = Quietly(value, share, attempt, round(waited_total, 1))
        if share is None or quiet.redo_above_pct <= 0 or 100 * share <= quiet.redo_above_pct:
            break
        if attempt <= quiet.retries:
            _LOGGER.warning("%s ran under %.0f %% CPU stall; measuring again", what, 100 * share)
    assert best is not None
    return Quietly(best.value, best.stall_share, attempt, round(waited_total, 1))
