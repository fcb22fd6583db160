"""What this CPU is, in the terms that decide the engine's kernels and precision.

The hosts differ: AMD EPYC with AVX512-BF16 and VNNI but no AMX, AMD EPYC (Zen 3) with AVX2
only, Intel Xeon with AMX. oneDNN takes other bf16 kernels on AMX, so greedy bf16 text differs by host; the start-up log names
the features found so a user can tell which kind of machine answered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

# The flags that change which kernels run, in the order the log names them.
RELEVANT_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 halves memory traffic, but only pays off where the CPU computes it natively."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    def describe(self) -> str:
        found = [flag for flag in RELEVANT_FLAGS if self.has(flag)]
        return f"{self.model_name} ({' '.join(found) or 'none of ' + ' '.join(RELEVANT_FLAGS)})"


@functools.cache
def cpu_info() -> CpuInfo:
    """Read once from ``/proc/cpuinfo``; an unreadable file means no optional features."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CpuInfo("unknown CPU", frozenset())
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip() and fields:
            break
    return CpuInfo(
        fields.get("model name", "unknown CPU"), frozenset(fields.get("flags", "").split())
    )
