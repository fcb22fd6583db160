"""In-process baselines on the benchmark weights: the engine without gRPC, and plain transformers.

* The engine single stream is the same code the server runs (``load_model`` + ``Engine``, limits
  from the server's default settings), fed the same prompt; comparing it with the gRPC
  single stream isolates what the service layer costs (``service_overhead``).
* The engine's one-pass prefill of a long prompt (``LoadedModel.prefill``, nothing else
  running) is what the same prompt's TTFT among running streams is compared with.
* transformers eager ``generate`` in float32, batch 1, is how the seed service ran the model.

Each function is meant to run in a fresh process (see :mod:`bench.isolate`) so models, threads
and memory of one baseline never leak into the next.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.quiet import Quiet, Quietly, measure_quietly
from bench.stats import StreamTiming

if TYPE_CHECKING:
    from qwen_grpc.engine.model import LoadedModel

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def bench_model_dir() -> Path:
    """Where ``make bench`` builds its Qwen-shaped random model (``$QWEN_GRPC_CACHE_DIR`` or
    ``./.cache``): the default model of the benches that drive the engine by hand."""
    cache = Path(os.environ.get("QWEN_GRPC_CACHE_DIR", _REPO_ROOT / ".cache"))
    return cache / "bench-models" / "qwen1.5-0.5b-random"


def load_like_the_server(model_dir: Path, dtype: str, threads: int) -> LoadedModel:
    """``load_model`` on a helper thread, as the server's ``model-loader`` thread does.

    Which thread loads the model changes decode speed on this machine: loaded on the main
    thread and run on the engine thread, a bf16 decode step took ~39 ms; loaded on a helper
    thread, ~25-31 ms (glibc malloc arenas and thread-local state differ). The baseline must
    sit in the same configuration as the server, or ``service_overhead`` measures this instead.
    """
    from qwen_grpc.engine.model import load_model

    return on_thread("model-loader", functools.partial(load_model, model_dir, dtype, threads))


def on_thread(name: str, function: Callable[[], _T]) -> _T:
    """``function()`` on a fresh thread named ``name``; its exception is re-raised here."""
    results: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            results.append(function())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return results[0]


def engine_single_stream(
    model_dir: Path,
    dtype: str | None,
    prompt_ids: tuple[int, ...],
    max_new_tokens: int,
    repeats: int,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """Times ``repeats`` single-stream greedy generations through the engine, no gRPC.

    Args:
        dtype: a precision mode, or ``None`` for the server's default setting.
        quiet: how to deal with other load on the machine (see :mod:`bench.quiet`).
    """
    from qwen_grpc.config import Settings
    from qwen_grpc.engine.prompt import SharedTokenizer
    from qwen_grpc.engine.scheduler import Engine
    from qwen_grpc.engine.types import Completed, GenerationRequest, SamplingParams
    from qwen_grpc.server import scheduler_limits

    settings = Settings() if dtype is None else Settings(dtype=dtype)  # type: ignore[arg-type]
    started = time.perf_counter()
    model = load_like_the_server(model_dir, settings.dtype, settings.threads)
    load_s = time.perf_counter() - started
    engine = Engine(model, scheduler_limits(settings), SharedTokenizer(model.tokenizer))
    engine.start()

    def generate(request_id: str, new_tokens: int) -> StreamTiming:
        params = SamplingParams(max_new_tokens=new_tokens, greedy=True)
        start = time.perf_counter()
        handle = engine.submit(GenerationRequest(request_id, prompt_ids, params))
        first: float | None = None
        for event in handle:
            now = time.perf_counter()
            if isinstance(event, Completed):
                return StreamTiming(
                    start,
                    now if first is None else first,
                    now,
                    event.usage.completion_tokens,
                    event.finish_reason.value,
                )
            if first is None and event.text:
                first = now
        raise RuntimeError("the engine ended a stream without completing it")

    try:
        generate("warm-up", 8)
        measured = [
            measure_quietly(
                "engine generation",
                functools.partial(generate, f"bench-{i}", max_new_tokens),
                quiet or Quiet(),
            )
            for i in range(repeats)
        ]
    finally:
        engine.stop()
    return {"dtype": model.dtype, "load_s": round(load_s, 2), **_quietly(measured)}


def engine_prefill(
    model_dir: Path,
    dtype: str | None,
    prompt_ids: tuple[int, ...],
    repeats: int,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """``LoadedModel.prefill`` of one prompt on an idle engine: the one-pass prefill that a
    long prompt's TTFT among running streams is measured against.

    Loaded and run as the server does (loader thread, then the engine's thread, the server's
    default threads); one untimed pass first, then the median of ``repeats``.
    """
    from qwen_grpc.config import Settings

    settings = Settings() if dtype is None else Settings(dtype=dtype)  # type: ignore[arg-type]
    model = load_like_the_server(model_dir, settings.dtype, settings.threads)

    def prefill() -> float:
        started = time.perf_counter()
        model.prefill([list(prompt_ids)], max_new_tokens=1)
        return time.perf_counter() - started

    def timed() -> list[Quietly[float]]:
        prefill()
        return [
            measure_quietly("one-pass prefill", prefill, quiet or Quiet()) for _ in range(repeats)
        ]

    measured = on_thread("qwen-engine", timed)
    return {
        "dtype": model.dtype,
        "prompt_tokens": len(prompt_ids),
        "prefill_ms": round(1000 * statistics.median(m.value for m in measured), 3),
        "prefill_ms_all": [round(1000 * m.value, 3) for m in measured],
        "cpu_stall_shares": [m.stall_share for m in measured],
    }


def _quietly(measured: list[Quietly[StreamTiming]]) -> dict[str, Any]:
    """Timings plus the stall share, attempts and waits each one was measured with."""
    return {
        "timings": [m.value for m in measured],
        "cpu_stall_shares": [m.stall_share for m in measured],
        "attempts": [m.attempts for m in measured],
        "waited_for_quiet_s": [m.waited_s for m in measured],
    }


class _TokenClock:
    """A transformers streamer that only notes when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_eager(
    model_dir: Path,
    dtype: str,
    prompt_ids: tuple[int, ...],
    max_new_tokens: int,
    repeats: int,
    threads: int = 0,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """The seed service's way: ``AutoModelForCausalLM.generate``, batch 1, greedy.

    Prefill is timed as one forward pass over the prompt (median of ``repeats``); decode speed
    comes from per-token timestamps of ``generate`` itself.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if threads > 0:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.eval()
    load_s = time.perf_counter() - started
    input_ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(input_ids)

    def run(new_tokens: int) -> StreamTiming:
        clock = _TokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
        produced = int(out.shape[1] - input_ids.shape[1])
        return StreamTiming(start, clock.times[0], clock.times[-1], produced)

    run(4)  # warm-up
    prefill_ms: list[float] = []
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            model(input_ids=input_ids, attention_mask=mask, use_cache=True)
            prefill_ms.append((time.perf_counter() - start) * 1000)
    measured = [
        measure_quietly(
            "transformers generation", functools.partial(run, max_new_tokens), quiet or Quiet()
        )
        for _ in range(repeats)
    ]
    return {
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 2),
        "prefill_ms": round(statistics.median(prefill_ms), 3),
        "prefill_ms_all": [round(x, 3) for x in prefill_ms],
        **_quietly(measured),
    }
