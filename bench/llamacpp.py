"""llama.cpp peer: the benchmark weights converted to GGUF, run through llama-cpp-python.

llama.cpp's own converter, ``convert_hf_to_gguf.py`` (with the ``conversion`` package and the
matching ``gguf-py`` beside it), ships inside the llama-cpp-python sdist; it is fetched from the
package registry with pip and extracted once, so the converter always matches the installed
llama.cpp. ``--outtype q8_0`` quantizes in the converter itself, so no ``llama-quantize`` binary
is needed. Measurements use llama.cpp's greedy loop with ``n_threads`` threads, single stream:
prompt evaluation time for prefill, then one ``eval`` per token.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.quiet import Quiet, measure_quietly
from bench.stats import StreamTiming

_LOGGER = logging.getLogger(__name__)
_PACKAGE = "llama-cpp-python"
_CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def installed_version() -> str | None:
    """The installed llama-cpp-python, or ``None`` (the bench extra is not installed)."""
    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def ensure_converter(cache_dir: Path, version: str) -> Path:
    """The folder holding llama.cpp's converter for ``version``, fetched and extracted once."""
    target = cache_dir / f"llama.cpp-convert-{version}"
    script = target / "convert_hf_to_gguf.py"
    if script.is_file():
        return target
    sdist_dir = cache_dir / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        _LOGGER.info("fetching the %s %s sdist for its GGUF converter", _PACKAGE, version)
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--no-binary", ":all:", "--dest", str(sdist_dir), f"{_PACKAGE}=={version}"),
            ],
            check=True,
        )
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if not member.name.startswith(prefix):
                continue
            relative = member.name[len(prefix) :]
            if any(relative == m or relative.startswith(m) for m in _CONVERTER_MEMBERS):
                member.name = relative
                members.append(member)
        archive.extractall(partial, members=members, filter="data")
    partial.rename(target)
    return target


def convert(model_dir: Path, cache_dir: Path, outtype: str, version: str) -> Path:
    """``model_dir`` as a GGUF file of ``outtype`` (``bf16``, ``q8_0``), converted once."""
    out = cache_dir / "gguf" / f"{model_dir.name}-{outtype}.gguf"
    if out.is_file():
        return out
    converter = ensure_converter(cache_dir, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    env = dict(os.environ, PYTHONPATH=str(converter / "gguf-py"))
    _LOGGER.info("converting %s to GGUF %s", model_dir, outtype)
    started = time.perf_counter()
    completed = subprocess.run(
        [
            *(sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model_dir)),
            *("--outtype", outtype, "--outfile", str(partial)),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{completed.stderr[-4000:]}")
    partial.rename(out)
    _LOGGER.info("wrote %s in %.1f s", out, time.perf_counter() - started)
    return out


def measure(
    gguf_path: Path,
    prompt_ids: tuple[int, ...],
    max_new_tokens: int,
    repeats: int,
    n_threads: int,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """Greedy single-stream generation timed around each ``eval``, plus llama.cpp's own counters.

    The wall-clock timings (``timings``, ``prefill_ms``) are what a Python caller of llama.cpp
    gets; ``internal`` is llama.cpp's perf counters, which leave out the Python binding.
    """
    import numpy as np
    from llama_cpp import Llama, llama_cpp

    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=len(prompt_ids) + max_new_tokens + 8,
        n_batch=512,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=0,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def argmax() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (n_vocab,))
        return int(logits.argmax())

    def run(new_tokens: int) -> tuple[StreamTiming, Any]:
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llm.eval(list(prompt_ids))
        token = argmax()
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = argmax()
        last = time.perf_counter()
        return StreamTiming(start, first, last, new_tokens), llama_cpp.llama_perf_context(llm.ctx)

    run(8)  # warm-up: first-touch of the weights, thread pool start
    measured = [
        measure_quietly(
            f"llama.cpp {gguf_path.stem}", functools.partial(run, max_new_tokens), quiet or Quiet()
        )
        for _ in range(repeats)
    ]
    timings = [m.value[0] for m in measured]
    perfs = [m.value[1] for m in measured]
    prefill_internal = [perf.t_p_eval_ms for perf in perfs]
    decode_internal = [
        perf.n_eval / (perf.t_eval_ms / 1000) for perf in perfs if perf.n_eval and perf.t_eval_ms
    ]
    return {
        "gguf": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "n_threads": n_threads,
        "prefill_ms": round(statistics.median(t.ttft_s * 1000 for t in timings), 3),
        "internal": {
            "prefill_ms": round(statistics.median(prefill_internal), 3),
            "decode_tok_s": round(statistics.median(decode_internal), 3)
            if decode_internal
            else None,
        },
        "timings": timings,
        "cpu_stall_shares": [m.stall_share for m in measured],
        "attempts": [m.attempts for m in measured],
        "waited_for_quiet_s": [m.waited_s for m in measured],
    }
