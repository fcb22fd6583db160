"""How the loaded llama.cpp was built: the CMake options and the CPU features it reports.

A llama.cpp number means little without its build: ``GGML_NATIVE`` picks this CPU's
instruction set, and on Intel AMX hosts the Makefile turns AMX off (its Q8_0 kernels crash
there). So the results record the options the Makefile exports (``LLAMA_CMAKE_ARGS``) and
what the library itself says it was compiled with (``llama_print_system_info``), and say
plainly whether AMX is in the library that ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_CMAKE_ARGS_VARIABLE = "LLAMA_CMAKE_ARGS"


def system_features(system_info: str) -> dict[str, str]:
    """``"CPU : AVX2 = 1 | AMX_INT8 = 1 |"`` as ``{"AVX2": "1", "AMX_INT8": "1"}``."""
    features: dict[str, str] = {}
    for part in system_info.split("|"):
        name, equals, value = part.rpartition(":")[2].partition("=")
        if equals:
            features[name.strip()] = value.strip()
    return features


def amx_note(features: dict[str, str]) -> str:
    """One sentence on AMX in the loaded library, for the report."""
    amx = sorted(name for name, value in features.items() if name.startswith("AMX"))
    enabled = [name for name in amx if features[name] == "1"]
    if enabled:
        return f"AMX is ENABLED in the loaded llama.cpp ({', '.join(enabled)})"
    return "AMX is not enabled in the loaded llama.cpp (no AMX feature in its system info)"


def build_info() -> dict[str, Any]:
    """The build options and compiled-in CPU features of the installed llama-cpp-python.

    Meant to run in its own process (:mod:`bench.isolate`): loading the library is the point.
    """
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    features = system_features(system_info)
    cmake_args = os.environ.get(_CMAKE_ARGS_VARIABLE)
    return {
        "cmake_args": cmake_args,
        "cmake_args_source": (
            f"{_CMAKE_ARGS_VARIABLE} as exported by the Makefile"
            if cmake_args is not None
            else f"{_CMAKE_ARGS_VARIABLE} not set (not run through make)"
        ),
        "library_dir": str(Path(llama_cpp.__file__).parent / "lib"),
        "system_info": system_info,
        "features": features,
        "amx_enabled": any(
            name.startswith("AMX") and value == "1" for name, value in features.items()
        ),
        "amx_note": amx_note(features),
    }
