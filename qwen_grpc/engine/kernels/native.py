"""Which kernel path runs here, and the native one built on first use (cached across processes).

The sources compile for two instruction sets (``simd.h`` hides the difference): AVX512-VNNI,
and AVX2 with FMA for CPUs without AVX-512 (AMD Zen 2/3, older Intel). Both builds give the
same bits; the AVX-512 one is faster. A process takes the best build its CPU runs, or the torch
fallback where it runs neither. Each build is compiled with ``torch.utils.cpp_extension.load``
into a directory named by the sha256 of the sources, the flags and the torch version, so a
second process (or ``make install`` having run ``python -m qwen_grpc.engine.kernels``) loads it
without compiling. Its ops are
registered with ``TORCH_LIBRARY`` (``torch.ops.qwen_q8.linear`` / ``.rows`` from ``q8.cpp``,
``.quantize_kv`` from ``kv.cpp``, ``.bf16_linear`` from ``bf16.cpp``,
``.paged_decode_attention`` from ``paged.cpp``, ``.paged_chunk_attention`` from ``chunk.cpp``,
one library built from all five): the dispatcher checks the schema, and no pybind11 headers are
compiled. Where the CPU has AMX-INT8 and Linux grants its tile state, the q8 linear runs
batches of several rows on AMX tiles (bit-identical to its VNNI path).
``QWEN_GRPC_KERNELS`` overrides the choice: ``vnni`` (the AVX-512 build without AMX), ``avx2``
(the AVX2 build, also on an AVX-512 CPU), ``torch`` (the fallback); ``auto`` is the default.
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
_COMMON_CFLAGS = ("-O3", "-std=c++17")
# -fopenmp makes at::parallel_for's pragma real; the extension then links libgomp.so.1 by
# soname, which resolves to the copy torch has already loaded: one OpenMP pool, not two.
_OPENMP = ("-fopenmp",)
FORCE_ENV = "QWEN_GRPC_KERNELS"
CACHE_ENV = "QWEN_GRPC_CACHE_DIR"


@dataclass(frozen=True)
class Build:
    """One compilation of the extension: the instruction set it targets."""

    name: str
    """How ``QWEN_GRPC_KERNELS`` forces it."""
    label: str
    """How the log line names it."""
    cpu_features: tuple[str, ...]
    """The /proc/cpuinfo flags it needs."""
    cflags: tuple[str, ...]


AVX512_VNNI = Build(
    "vnni",
    "AVX512-VNNI",
    ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"),
)
AVX2 = Build("avx2", "AVX2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"))
BUILDS = (AVX512_VNNI, AVX2)
"""Fastest first: ``auto`` takes the first one the CPU runs."""


@dataclass(frozen=True)
class KernelChoice:
    """The path chosen for this process and a sentence saying why."""

    build: Build | None
    """None: the torch fallback."""
    reason: str
    amx: bool = False

    @property
    def native(self) -> bool:
        return self.build is not None

    @property
    def description(self) -> str:
        path = f"native {self.build.label} extension" if self.build else "torch fallback"
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


def missing_cpu_features(flags: frozenset[str], build: Build) -> list[str]:
    """The features ``build`` needs that ``flags`` lack."""
    return [flag for flag in build.cpu_features if flag not in flags]


def pick_build(flags: frozenset[str], forced: str) -> tuple[Build | None, str]:
    """The build to run on a CPU with ``flags`` (``forced`` as ``QWEN_GRPC_KERNELS`` says), or
    None and why not."""
    if forced == "torch":
        return None, f"{FORCE_ENV}=torch"
    names = {build.name: build for build in BUILDS}
    if forced not in ("", "auto", *names):
        expected = ", ".join(["auto", *names, "torch"])
        return None, f"unknown {FORCE_ENV}={forced!r}, expected one of {expected}"
    candidates = (names[forced],) if forced in names else BUILDS
    lacking = []
    for build in candidates:
        if not (missing := missing_cpu_features(flags, build)):
            return build, ""
        lacking.append(f"{', '.join(missing)} for {build.label}")
    return None, f"CPU lacks {'; '.join(lacking)}"


def build_directory(build: Build) -> Path:
    """``<cache>/kernels/<sha256>``: a changed source, flag or torch version rebuilds."""
    digest = hashlib.sha256()
    for source in _SOURCES + _HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(_cflags(build) + _OPENMP).encode())
    digest.update(torch.__version__.encode())
    cache = os.environ.get(CACHE_ENV)
    root = Path(cache) if cache else Path.home() / ".cache" / "qwen-grpc"
    return root / "kernels" / digest.hexdigest()[:16]


def _cflags(build: Build) -> tuple[str, ...]:
    return _COMMON_CFLAGS + build.cflags


def _build(build: Build, load: bool) -> None:
    """Compiles (or reuses) ``build`` and, if ``load``, loads its ops into ``torch.ops.qwen_q8``."""
    from torch.utils import cpp_extension

    directory = build_directory(build)
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(source) for source in _SOURCES]
    # Fresh lists: torch appends its link flags to extra_ldflags, which would change the flags
    # build_directory() hashes and so name a directory nothing was built in.
    cflags, ldflags = [*_cflags(build), *_OPENMP], [*_OPENMP]
    if load:
        cpp_extension.load(
            name=_EXTENSION,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        return
    # Compile only: a library for another instruction set may not load on this CPU, and a
    # second qwen_q8 cannot register in a process that has one. load() offers no build-only
    # mode; this is the step it runs before loading (torch is pinned in the Makefile).
    cpp_extension._write_ninja_file_and_build_library(
        name=_EXTENSION,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=[],
        extra_sycl_cflags=[],
        extra_ldflags=ldflags,
        extra_include_paths=[],
        build_directory=str(directory),
        verbose=False,
        with_cuda=False,
        with_sycl=False,
    )


def build_for_image() -> list[Path]:
    """Compiles every build, whatever this CPU supports, and returns the libraries; raises if
    one cannot be built.

    For an image's builder stage: the CPU that builds the image need not be the one that runs
    it (an AVX-512 builder may ship to AVX2-only hosts), and a build that fell back to torch
    here would ship an image that never runs native.
    """
    if problem := _compiler_missing():
        raise RuntimeError(problem)
    for build in BUILDS:
        _build(build, load=False)
    return [_prebuilt(build) for build in BUILDS]


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
    build, reason = pick_build(cpu_flags(), forced)
    if build is None:
        choice = KernelChoice(None, reason)
    elif _prebuilt(build).exists():
        choice = _try_load_prebuilt(build)
    elif problem := _compiler_missing():
        choice = KernelChoice(None, problem)
    else:
        choice = _try_build(build)
    if choice.native:
        # Asks Linux for the AMX tile state where the CPU has it; False elsewhere.
        amx = bool(torch.ops.qwen_q8.use_amx(forced not in ("vnni", "avx2")))
        choice = KernelChoice(choice.build, choice.reason, amx)
    _LOGGER.info("%s", choice.description)
    return choice


def _prebuilt(build: Build) -> Path:
    """The library a build of these very sources left, e.g. by ``make install`` or an image's
    builder stage: a runtime image without a compiler loads it as it is."""
    return build_directory(build) / f"{_EXTENSION}.so"


def _try_load_prebuilt(build: Build) -> KernelChoice:
    try:
        torch.ops.load_library(str(_prebuilt(build)))
    except Exception as error:  # a broken file must leave the portable path working
        _LOGGER.warning("q8 native library did not load: %s", error)
        return KernelChoice(None, f"prebuilt library failed to load: {type(error).__name__}")
    return KernelChoice(build, f"prebuilt in {build_directory(build)}")


def _try_build(build: Build) -> KernelChoice:
    try:
        _build(build, load=True)
    except Exception as error:  # a failed build must leave the portable path working
        _LOGGER.warning("q8 native build failed: %s", error)
        return KernelChoice(None, f"build failed: {type(error).__name__}")
    return KernelChoice(build, f"built in {build_directory(build)}")
