"""Rate limiting: a token bucket per client and a global cap on concurrent generations.

The seed service allowed one request every 2 seconds for everybody at once. Here each client
(see :attr:`CallContext.client`) gets its own bucket, so one noisy caller cannot starve the
others, and the cap on concurrent ``Chat``/``StreamChat`` calls keeps handler threads free for
health checks however many clients there are. Refusals are immediate RESOURCE_EXHAUSTED with
``google.rpc.RetryInfo``, so well-behaved clients back off for exactly as long as needed.
Health and reflection are exempt: only the chat service is limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from qwen_grpc import status
from qwen_grpc.interceptors.base import (
    CHAT_SERVICE_PREFIX,
    GENERATION_METHODS,
    Behavior,
    CallContext,
    CallInfo,
    Interceptor,
    on_stream_end,
    once,
    refuse,
)

_LOGGER = logging.getLogger(__name__)
# A finished generation frees a slot; a second is about one short answer on the target CPU.
CONCURRENCY_RETRY_SECONDS = 1.0
_FIRST_SWEEP_AT = 1024


class TokenBuckets:
    """One token bucket per client key: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._sweep_at = _FIRST_SWEEP_AT

    def take(self, key: str) -> float:
        """Takes a token for ``key``: 0.0 if granted, else the seconds until one is available."""
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._maybe_sweep(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _maybe_sweep(self, now: float) -> None:
        """Forgets clients whose bucket has refilled: a full bucket is the same as none."""
        if len(self._buckets) <= self._sweep_at:
            return
        self._buckets = {
            key: (tokens, last)
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate < self.burst
        }
        self._sweep_at = max(_FIRST_SWEEP_AT, 2 * len(self._buckets))


class RateLimitInterceptor(Interceptor):
    """Refuses chat calls past a client's rate or past the global concurrency cap."""

    def __init__(self, buckets: TokenBuckets | None, max_concurrent_generations: int) -> None:
        """``buckets`` ``None`` means no per-client rate; a cap of 0 means no cap."""
        self._buckets = buckets
        self._max_concurrent = max_concurrent_generations
        self._slots = (
            threading.BoundedSemaphore(max_concurrent_generations)
            if max_concurrent_generations > 0
            else None
        )

    def applies_to(self, method: str) -> bool:
        return method.startswith(CHAT_SERVICE_PREFIX)

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        if self._buckets is not None:
            wait = self._buckets.take(context.client)
            if wait > 0:
                refuse(
                    context,
                    status.resource_exhausted(
                        f"rate limit: {self._buckets.rate:g} calls/s with bursts of "
                        f"{self._buckets.burst:g} per client; retry in {wait:.2f} s",
                        wait,
                    ),
                )
        if self._slots is None or call.method not in GENERATION_METHODS:
            return method(request, context)
        if not self._slots.acquire(blocking=False):
            refuse(
                context,
                status.resource_exhausted(
                    f"the server is generating for {self._max_concurrent} calls already",
                    CONCURRENCY_RETRY_SECONDS,
                ),
            )
        release = once(self._slots.release)
        # Also on termination: a stream the client abandons is only closed when collected.
        context.add_callback(release)
        try:
            responses = method(request, context)
        except BaseException:
            release()
            raise
        if not call.response_streaming:
            release()
            return responses
        return on_stream_end(responses, lambda _error: release())
