"""Which Q8 path runs here, and the native one built on first use (cached across processes).

The extension is compiled with ``torch.utils.cpp_extension.load`` into a directory named by the
sha256 of the source, the flags and the torch version, so a second process (or ``make install``
having run ``python -m qwen_grpc.engine.kernels``) loads it without compiling. Its ops are
registered with ``TORCH_LIBRARY`` (``torch.ops.qwen_q8.linear`` / ``.rows`` from ``q8.cpp``,
``.quantize_kv`` from ``kv.cpp``, ``.bf16_linear`` from ``bf16.cpp``,
``.paged_decode_attention`` from ``paged.cpp``, ``.paged_chunk_attention`` from ``chunk.cpp``,
one library built from all five): the dispatcher checks the schema, and no pybind11 headers are
compiled. Where the CPU has AMX-INT8 and Linux grants its tile state, the q8 linear runs
batches of several rows on AMX tiles (bit-identical to its VNNI path);
``QWEN_GRPC_KERNELS=vnni`` keeps it on VNNI.
``at::parallel_for`` inside it runs on torch's own OpenMP pool, so ``torch.set_num_threads``
applies.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_LOGGER = logging.getLogger(__name__)

_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("q8.cpp", "kv.cpp", "bf16.cpp", "paged.cpp", "chunk.cpp")
)
# Included by the sources, not compiled on their own; hashed so that editing one rebuilds.
_HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "attention.h"))
_EXTENSION = "qwen_q8"
_CFLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")
# -fopenmp makes at::parallel_for's pragma real; the extension then links libgomp.so.1 by
# soname, which resolves to the copy torch has already loaded: one OpenMP pool, not two.
_OPENMP = ("-fopenmp",)
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
FORCE_ENV = "QWEN_GRPC_KERNELS"
CACHE_ENV = "QWEN_GRPC_CACHE_DIR"


@dataclass(frozen=True)
class KernelChoice:
    """The path chosen for this process and a sentence saying why."""

    native: bool
    reason: str
    amx: bool = False

    @property
    def description(self) -> str:
        path = "native AVX512-VNNI extension" if self.native else "torch fallback"
        if self.amx:
            path += " with AMX-INT8 tiles for batches"
        return f"q8 kernels: {path} ({self.reason})"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags; empty where /proc/cpuinfo is not readable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def missing_cpu_features(flags: frozenset[str]) -> list[str]:
    """The instruction sets q8.cpp is compiled for that ``flags`` lack."""
    return [flag for flag in _REQUIRED_FLAGS if flag not in flags]


def build_directory() -> Path:
    """``<cache>/kernels/<sha256>``: a changed source, flag or torch version rebuilds."""
    digest = hashlib.sha256()
    for source in _SOURCES + _HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(_CFLAGS + _OPENMP).encode())
    digest.update(torch.__version__.encode())
    cache = os.environ.get(CACHE_ENV)
    root = Path(cache) if cache else Path.home() / ".cache" / "qwen-grpc"
    return root / "kernels" / digest.hexdigest()[:16]


def _build() -> None:
    """Compiles (or reuses) the extension and loads its ops into ``torch.ops.qwen_q8``."""
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=_EXTENSION,
        sources=[str(source) for source in _SOURCES],
        # Fresh lists: load() appends torch's link flags to extra_ldflags, which would change
        # the flags build_directory() hashes and so name a directory nothing was built in.
        extra_cflags=[*_CFLAGS, *_OPENMP],
        extra_ldflags=[*_OPENMP],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def build_for_image() -> Path:
    """Compiles the library whatever this CPU supports and returns it; raises if it cannot.

    For an image's builder stage: the CPU that builds the image need not be the one that runs
    it, and a build that fell back to torch here would ship an image that never runs native.
    """
    if problem := _compiler_missing():
        raise RuntimeError(problem)
    _build()
    return _prebuilt()


def _compiler_missing() -> str | None:
    """Why the extension cannot be built here, or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no compiler: {compiler} not found"
    if shutil.which("ninja") is None:
        # cpp_extension runs `ninja` from PATH; a venv used without activation has it beside
        # the interpreter (the `ninja` package's console script).
        beside = Path(sys.executable).parent
        if not (beside / "ninja").exists():
            return "no compiler: ninja not found"
        os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"
    return None


_CHOICE_LOCK = threading.Lock()


def choose() -> KernelChoice:
    """Decides once per process: forced fallback, CPU features, then whether the build works.

    Locked because loading the library twice would register ``qwen_q8`` twice, which torch
    refuses.
    """
    with _CHOICE_LOCK:
        return _choose()


@functools.cache
def _choose() -> KernelChoice:
    forced = os.environ.get(FORCE_ENV, "auto").strip().lower()
    if forced == "torch":
        choice = KernelChoice(False, f"{FORCE_ENV}=torch")
    elif forced not in ("", "auto", "vnni"):
        choice = KernelChoice(
            False, f"unknown {FORCE_ENV}={forced!r}, expected auto, vnni or torch"
        )
    elif missing := missing_cpu_features(cpu_flags()):
        choice = KernelChoice(False, f"CPU lacks {', '.join(missing)}")
    elif _prebuilt().exists():
        choice = _try_load_prebuilt()
    elif problem := _compiler_missing():
        choice = KernelChoice(False, problem)
    else:
        choice = _try_build()
    if choice.native:
        # Asks Linux for the AMX tile state where the CPU has it; False elsewhere.
        amx = bool(torch.ops.qwen_q8.use_amx(forced != "vnni"))
        choice = KernelChoice(True, choice.reason, amx)
    _LOGGER.info("%s", choice.description)
    return choice


def _prebuilt() -> Path:
    """The library a build of these very sources left, e.g. by ``make install`` or an image's
    builder stage: a runtime image without a compiler loads it as it is."""
    return build_directory() / f"{_EXTENSION}.so"


def _try_load_prebuilt() -> KernelChoice:
    try:
        torch.ops.load_library(str(_prebuilt()))
    except Exception as error:  # a broken file must leave the portable path working
        _LOGGER.warning("q8 native library did not load: %s", error)
        return KernelChoice(False, f"prebuilt library failed to load: {type(error).__name__}")
    return KernelChoice(True, f"prebuilt in {build_directory()}")


def _try_build() -> KernelChoice:
    try:
        _build()
    except Exception as error:  # a failed build must leave the portable path working
        _LOGGER.warning("q8 native build failed: %s", error)
        return KernelChoice(False, f"build failed: {type(error).__name__}")
    return KernelChoice(True, f"built in {build_directory()}")
