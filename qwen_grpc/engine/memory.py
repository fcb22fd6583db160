"""Keeping the process's resident memory close to what the engine actually holds.

glibc serves a large allocation from its own ``mmap`` (given back to the OS on free) only up to
a threshold that rises every time such a block is freed; after loading, KV-cache buffers that
grow and shrink with the batch land in the heap instead, and their freed pages stay resident.
Pinning the threshold keeps the biggest tensors in ``mmap``; trimming after loading, after
every KV-cache reallocation and when the batch empties returns the rest. Measured on
Qwen1.5-0.5B, 8 rows x 576 tokens in process: RSS 2.23 GB before, 2.07 GB after in bf16; in
the int8 server, 0.31 GB that stayed resident after the streams ended is now returned. Elsewhere
than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

_LOGGER = logging.getLogger(__name__)
_M_MMAP_THRESHOLD = -3
# Above one decode step's temporaries (8 rows of fp32 logits are 4.9 MB): mapping those afresh
# every step would page-fault them in every step.
_MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    library = ctypes.CDLL(name)
    return library if hasattr(library, "mallopt") and hasattr(library, "malloc_trim") else None


def map_large_blocks() -> None:
    """Serves allocations above the threshold from ``mmap``, whatever was freed before."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES):
        _LOGGER.warning("mallopt(M_MMAP_THRESHOLD) failed; RSS may exceed live memory")


def release_free_memory() -> None:
    """Returns the heap's free pages to the OS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
