"""Prometheus metrics on their own HTTP port: what the engine and the calls are doing.

Each server gets its own registry, so several servers in one process (tests) never clash.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from qwen_grpc.engine.scheduler import Engine

_LOGGER = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)


class ServiceMetrics:
    """Every metric the service exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.calls = Counter(
            "qwen_grpc_calls", "Finished gRPC calls.", ["method", "code"], registry=registry
        )
        self.call_seconds = Histogram(
            "qwen_grpc_call_seconds",
            "Call duration, whole stream included.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "qwen_grpc_time_to_first_token_seconds",
            "From call start to the first streamed delta.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "qwen_prompt_tokens", "Prompt tokens prefilled.", registry=registry
        )
        self.generated_tokens = Counter(
            "qwen_generated_tokens", "Tokens generated.", registry=registry
        )
        self.queue_depth = Gauge(
            "qwen_queue_depth", "Requests waiting for a batch slot.", registry=registry
        )
        self.active_sequences = Gauge(
            "qwen_active_sequences", "Sequences in the running batch.", registry=registry
        )
        self.batch_size = Histogram(
            "qwen_batch_size",
            "Sequences per forward pass.",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=registry,
        )
        self.step_seconds = Histogram(
            "qwen_engine_step_seconds",
            "Duration of one forward pass.",
            ["kind"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        )

    def watch_engine(self, engine: Engine) -> None:
        """Reads queue depth and active sequences from the engine at scrape time."""
        self.queue_depth.set_function(lambda: engine.queued_requests)
        self.active_sequences.set_function(lambda: engine.active_sequences)

    def on_step(self, kind: str, batch_size: int, tokens: int, seconds: float) -> None:
        """Engine observer: one call per forward pass, on the engine thread."""
        self.batch_size.labels(kind).observe(batch_size)
        self.step_seconds.labels(kind).observe(seconds)
        if kind == "prefill":
            self.prompt_tokens.inc(tokens)
            self.generated_tokens.inc(batch_size)
        else:
            self.generated_tokens.inc(tokens)

    def on_call(self, method: str, code: str, seconds: float, ttft: float | None) -> None:
        """One call per finished RPC."""
        self.calls.labels(method, code).inc()
        self.call_seconds.labels(method).observe(seconds)
        if ttft is not None:
            self.ttft_seconds.labels(method).observe(ttft)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Starts the scrape endpoint; returns the server (its port) and its thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        _LOGGER.info("metrics on http://%s:%d/metrics", host, server.server_port)
        return server, thread
