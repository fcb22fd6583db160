"""Under pressure: memory follows the KV budget, a slow prefill is not a stall, and nothing the
engine does while copying its cache keeps callers or the watchdog waiting (issue 14)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from qwen_grpc.engine.errors import UnavailableError
from qwen_grpc.engine.model import LoadedModel, load_model
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.scheduler import Engine, RequestHandle, SchedulerLimits
from qwen_grpc.engine.synthetic import build_random_qwen
from qwen_grpc.engine.types import Completed, GenerationRequest, SamplingParams
from qwen_grpc.watchdog import EngineWatchdog


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class PeakRss:
    """Samples this process's RSS on a thread until stopped; the peak above the start."""

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


@pytest.fixture(scope="module")
def kv_heavy_model(cache_dir: Path) -> LoadedModel:
    folder = build_random_qwen(cache_dir / "test-models" / "kv-heavy", cache_dir, "kv-heavy")
    return load_model(folder, "float32", threads=0)


def started(model: LoadedModel, limits: SchedulerLimits) -> Engine:
    engine = Engine(model, limits, SharedTokenizer(model.tokenizer))
    engine.start()
    return engine


def request(name: str, prompt_tokens: int, new_tokens: int) -> GenerationRequest:
    prompt = tuple(range(1000, 1000 + prompt_tokens))
    return GenerationRequest(name, prompt, SamplingParams(max_new_tokens=new_tokens, greedy=True))


def finish(handle: RequestHandle) -> Completed:
    *_, final = list(handle)
    assert isinstance(final, Completed)
    return final


def test_a_long_prompt_among_short_streams_stays_within_the_kv_memory_budget(
    kv_heavy_model: LoadedModel,
) -> None:
    config_bytes_per_token = 4 * 2 * 8 * 64 * 4  # layers x (K, V) x kv heads x head dim x fp32
    budget_tokens = 8192
    # Activations of a 6,000-token float32 prefill through 512-wide layers: hidden states,
    # q/k/v and attention output are about 12 MB each; allow generously for the allocator.
    activations = 250 * 2**20
    engine = started(kv_heavy_model, SchedulerLimits(kv_cache_tokens=budget_tokens))
    try:
        finish(engine.submit(request("warm", 64, 2)))
        memory = PeakRss()
        short = [engine.submit(request(f"short-{i}", 32, 48)) for i in range(7)]
        long = engine.submit(request("long", 6000, 4))
        finals = [finish(handle) for handle in [*short, long]]
        growth = memory.growth()
    finally:
        engine.stop()
    assert [final.usage.completion_tokens for final in finals] == [48] * 7 + [4]
    budget = budget_tokens * config_bytes_per_token + activations
    # Padding all eight rows to the long prompt's width would take 8 x 6,004 x 16 KB = 787 MB.
    assert growth <= budget, f"RSS grew {growth / 2**20:.0f} MB, budget {budget / 2**20:.0f} MB"


class SlowLayers:
    """Makes every layer of the model's forward pass take ``seconds`` (a slow host)."""

    def __init__(self, model: LoadedModel, seconds: float) -> None:
        self.seconds = seconds
        self._layers = model.decoder.layers
        self._originals = [layer.down for layer in self._layers]

    def __enter__(self) -> SlowLayers:
        for layer, original in zip(self._layers, self._originals, strict=True):
            layer.down = _delayed(original, self)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, original in zip(self._layers, self._originals, strict=True):
            layer.down = original


def _delayed(
    module: Callable[[torch.Tensor], torch.Tensor], slow: SlowLayers
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        time.sleep(slow.seconds)
        return module(x)

    return run  # type: ignore[return-value]


@pytest.fixture
def tiny_engine(tiny_model_dir: Path) -> Iterator[tuple[LoadedModel, Engine]]:
    model = load_model(tiny_model_dir, "float32", threads=0)
    engine = started(model, SchedulerLimits())
    yield model, engine
    engine.stop()


def watched(engine: Engine, stall_seconds: float) -> tuple[EngineWatchdog, threading.Event]:
    failed = threading.Event()
    watchdog = EngineWatchdog(engine, stall_seconds, lambda _: failed.set(), 0.02)
    watchdog.start()
    return watchdog, failed


def test_a_prefill_slower_than_the_watchdog_window_is_progress_not_a_stall(
    tiny_engine: tuple[LoadedModel, Engine],
) -> None:
    model, engine = tiny_engine
    watchdog, failed = watched(engine, stall_seconds=0.4)
    try:
        # Two layers of 0.3 s each: the pass takes 0.6 s, each layer less than the window.
        with SlowLayers(model, 0.3):
            final = finish(engine.submit(request("slow", 16, 1)))
    finally:
        watchdog.stop()
    assert final.usage.completion_tokens == 1
    assert not failed.is_set()


def test_a_layer_that_never_finishes_is_still_caught_and_callers_are_answered(
    tiny_engine: tuple[LoadedModel, Engine],
) -> None:
    model, engine = tiny_engine
    watchdog, failed = watched(engine, stall_seconds=0.3)
    try:
        with SlowLayers(model, 2.0):
            handle = engine.submit(request("stuck", 16, 1))
            assert failed.wait(timeout=1.5)
            with pytest.raises(UnavailableError):
                list(handle)
    finally:
        watchdog.stop()


def test_the_watchdog_answers_callers_even_while_the_engine_thread_holds_its_lock(
    tiny_engine: tuple[LoadedModel, Engine],
) -> None:
    _, engine = tiny_engine
    queued = engine.submit(request("queued", 16, 400))
    next(iter(queued))
    answered = threading.Event()

    def abandon() -> None:
        engine.abandon(UnavailableError("the engine is unhealthy"))
        answered.set()

    # A thread stuck while holding the engine's lock (before this fix, a KV copy or a trim).
    with engine._cond:
        threading.Thread(target=abandon, daemon=True).start()
        assert answered.wait(timeout=2), "abandon waited for the engine's lock"
    with pytest.raises(UnavailableError):
        list(queued)
