"""Runs one baseline in a fresh Python process and returns its result.

Baselines load their own model copies and set their own thread counts (torch, OpenMP in
llama.cpp); a fresh ``spawn`` process per baseline keeps them from sharing memory, threads or
warm caches with each other or with the load generator, and returns the memory when done.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


def _configure_child(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_isolated(function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``function(*args, **kwargs)`` in a new spawned process; its exceptions are re-raised here."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=_configure_child, initargs=(level,)
    ) as pool:
        return pool.submit(function, *args, **kwargs).result()
