"""Wiring and lifecycle: build the gRPC server, load the model, serve, drain, stop.

The order is explicit (as in vLLM's gRPC entry point): start listening with health
NOT_SERVING, load and warm up the model, mark SERVING, wait for a signal, mark NOT_SERVING,
stop accepting calls and let in-flight ones finish within the grace period, release the model.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from types import FrameType
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen_grpc.config import Settings
from qwen_grpc.engine.model import load_model
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.scheduler import Engine, SchedulerLimits
from qwen_grpc.engine.sources import resolve_model
from qwen_grpc.engine.types import ChatMessage, GenerationRequest, Role, SamplingParams
from qwen_grpc.health import HealthService
from qwen_grpc.interceptors import build_interceptors
from qwen_grpc.interceptors.drain import Drain
from qwen_grpc.metrics import ServiceMetrics
from qwen_grpc.reflection import CHAT_SERVICE_NAME, enable_reflection
from qwen_grpc.service import ChatServicer, ModelRuntime
from qwen_grpc.tls import server_credentials
from qwen_grpc.v1 import chat_pb2_grpc
from qwen_grpc.validation import RequestLimits, default_sampling
from qwen_grpc.watchdog import EngineWatchdog

if TYPE_CHECKING:
    from qwen_grpc.tracing import Tracing

_LOGGER = logging.getLogger(__name__)
SERVICE_NAME = CHAT_SERVICE_NAME
HEALTH_SERVICES = ("", SERVICE_NAME)
# A second SIGTERM/SIGINT exits with 128 + the signal's number, as a shell reports a process
# that the signal killed.
FORCED_EXIT_BASE = 128


class QwenServer:
    """One process serving one model; tests build it on port 0 and drive it for real."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = HealthService()
        self.servicer = ChatServicer()
        self.engine: Engine | None = None
        self.metrics = ServiceMetrics()
        self.metrics_port: int | None = None
        self._metrics_http: WSGIServer | None = None
        self._watchdog: EngineWatchdog | None = None
        self._drain = Drain()
        self.tracing = _tracing(settings)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.handler_threads, thread_name_prefix="grpc-handler"
            ),
            interceptors=build_interceptors(settings, self.metrics, self._drain, self.tracing),
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
                *_transport_options(settings),
            ],
        )
        chat_pb2_grpc.add_ChatServiceServicer_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        if settings.reflection:
            enable_reflection(self._grpc)
        credentials = server_credentials(settings)
        address = f"{settings.host}:{settings.port}"
        self.port = (
            self._grpc.add_secure_port(address, credentials)
            if credentials is not None
            else self._grpc.add_insecure_port(address)
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def _set_health(self, state: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in HEALTH_SERVICES:
            self.health.set(service, state)

    def start(self) -> None:
        """Starts answering: health says NOT_SERVING and chat calls UNAVAILABLE until loaded."""
        self._grpc.start()
        _LOGGER.info("listening on %s (NOT_SERVING until the model is warm)", self.address)
        if self.settings.metrics_port > 0:
            self._metrics_http, _ = self.metrics.serve(
                self.settings.host, self.settings.metrics_port
            )
            self.metrics_port = self._metrics_http.server_port

    def load(self) -> None:
        """Resolves, loads and warms up the model, then reports SERVING."""
        settings = self.settings
        files = resolve_model(settings.model, settings.revision, settings.cache_dir)
        model = load_model(files.path, settings.dtype, settings.threads)
        tokenizer = SharedTokenizer(model.tokenizer)
        engine = Engine(model, scheduler_limits(settings), tokenizer, observer=self.metrics)
        engine.start()
        self.engine = engine
        self.metrics.watch_engine(engine)
        max_new_tokens = min(settings.max_new_tokens_cap, model.context_length - 1)
        seconds_per_prompt_token = None
        if settings.warmup:
            seconds_per_prompt_token = _warm_up(engine, model.context_length)
        limits = RequestLimits(
            max_messages=settings.max_messages,
            max_stop_sequences=settings.max_stop_sequences,
            max_new_tokens=max_new_tokens,
            default_max_new_tokens=min(settings.default_max_new_tokens, max_new_tokens),
            max_prompt_tokens=_max_prompt_tokens(
                settings, model.context_length, max_new_tokens, seconds_per_prompt_token
            ),
            vocab_size=model.vocab_size,
            control_tokens=tuple(model.tokenizer.all_special_tokens),
        )
        defaults = default_sampling(model.generation_config, limits)
        self.servicer.attach(
            ModelRuntime(
                engine=engine,
                limits=limits,
                defaults=defaults,
                model_id=files.model_id,
                revision=files.revision,
            )
        )
        self._watchdog = EngineWatchdog(
            engine, settings.watchdog_stall_seconds, on_failure=self._engine_failed
        )
        self._watchdog.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        _LOGGER.info("SERVING %s (%s) on %s", files.model_id, model.dtype, self.address)

    def _engine_failed(self, problem: str) -> None:
        """The watchdog's verdict: stop advertising a service that cannot answer."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING, refuse new calls, let in-flight calls finish, free the model."""
        self.health.enter_graceful_shutdown()
        if self.engine is not None:
            time.sleep(self.settings.drain_delay_seconds)
        grace = self.settings.drain_grace_seconds if grace is None else grace
        if grace is None:
            _LOGGER.info("draining until every call has ended")
        else:
            _LOGGER.info("draining for up to %.0f s", grace)
        if not self._drain.close(grace):
            _LOGGER.warning("the grace period ended with chat calls in flight: cutting them")
        # Chat calls are over (or out of time). Health watches end with OK, not cut; what is
        # left (a reflection stream, say) carries no generation and ends with the transport.
        watches = self.health.end_watches()
        if watches:
            _LOGGER.info("ended %d open health watch(es)", watches)
        self._grpc.stop(0).wait()
        if self._watchdog is not None:
            self._watchdog.stop()
        if self.engine is not None:
            self.engine.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.tracing is not None:
            self.tracing.shutdown()
        _LOGGER.info("stopped")


def _tracing(settings: Settings) -> Tracing | None:
    """The call tracer, or ``None`` without a collector: then OpenTelemetry is not imported,
    no tracer provider exists and no exporter thread runs, so tracing off costs nothing."""
    if not settings.otlp_endpoint:
        return None
    from qwen_grpc.tracing import Tracing

    _LOGGER.info("exporting traces to %s over OTLP/gRPC", settings.otlp_endpoint)
    return Tracing(settings.otlp_endpoint)


# The warm-up prompt whose prefill time sizes the default prompt limit, and the share of the
# watchdog window that the longest prompt may take to prefill.
WARMUP_PREFILL_TOKENS = 1024
PREFILL_WINDOW_SHARE = 4


def scheduler_limits(settings: Settings) -> SchedulerLimits:
    """The engine's admission limits, as the settings give them."""
    return SchedulerLimits(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_queue_per_client=settings.max_queue_per_client,
        kv_cache_tokens=settings.kv_cache_tokens,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        prefill_step_factor=settings.prefill_step_factor,
    )


def _transport_options(settings: Settings) -> list[tuple[str, int]]:
    """Keepalive and connection-age options: find dead peers, refuse ping floods (issue 4)."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options = [
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            ms(settings.keepalive_min_ping_interval_seconds),
        ),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
        # Our own keepalive pings must not stop on idle connections.
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if settings.max_connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds)))
        # Without a longest call, gRPC's own default applies: no limit on the grace.
        if settings.longest_call_seconds is not None:
            options.append(("grpc.max_connection_age_grace_ms", ms(settings.longest_call_seconds)))
    return options


def _max_prompt_tokens(
    settings: Settings,
    context_length: int,
    max_new_tokens: int,
    seconds_per_prompt_token: float | None,
) -> int:
    """Room for the prompt: the window minus a default answer, and no more than this host
    prefills in a quarter of the watchdog window (measured at warm-up), unless set (then
    capped by the window only).

    A prompt prefills in one pass while every stream waits; one that takes minutes is legal
    but stalls the replica, and attention's quadratic cost makes the linear estimate low for
    long prompts, hence the quarter.
    """
    window = min(context_length, settings.kv_cache_tokens)
    if settings.max_prompt_tokens > 0:
        return min(settings.max_prompt_tokens, window - 1)
    default_answer = min(settings.default_max_new_tokens, max_new_tokens)
    room = max(1, window - default_answer)
    if seconds_per_prompt_token is None:
        return room
    budget_seconds = settings.watchdog_stall_seconds / PREFILL_WINDOW_SHARE
    prefillable = int(budget_seconds / seconds_per_prompt_token)
    if prefillable < room:
        _LOGGER.info(
            "max_prompt_tokens %d: this host prefills a prompt token in %.2f ms, and a prompt "
            "must prefill within %.0f s (a quarter of the watchdog window)",
            prefillable,
            seconds_per_prompt_token * 1000,
            budget_seconds,
        )
    return max(1, min(room, prefillable))


def _warm_up(engine: Engine, context_length: int) -> float:
    """Real generations, so the first caller does not pay for lazy initialization; returns
    the seconds per prompt token of a long prefill, which sizes the default prompt limit."""
    hello = engine.tokenizer.encode_chat([ChatMessage(Role.USER, "Hello")])
    _generate(engine, "warm-up", hello, max_new_tokens=4)
    length = min(WARMUP_PREFILL_TOKENS, context_length // 2, engine.limits.kv_cache_tokens - 1)
    words = engine.tokenizer.encode_chat([ChatMessage(Role.USER, "hello " * length)])
    started = time.perf_counter()
    _generate(engine, "warm-up-prefill", words[:length], max_new_tokens=1)
    return (time.perf_counter() - started) / length


def _generate(engine: Engine, request_id: str, prompt: list[int], max_new_tokens: int) -> None:
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    for _ in engine.submit(GenerationRequest(request_id, tuple(prompt), params)):
        pass


def serve(settings: Settings) -> int:
    """Runs until SIGTERM or SIGINT, then drains; returns the process exit code.

    A second SIGTERM or SIGINT during the drain exits at once (code 128 + the signal).
    """
    server = QwenServer(settings)
    stop = threading.Event()
    failure: list[BaseException] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # An operator who asks twice wants out now; the drain's threads would keep a normal
            # exit waiting, so leave without them.
            _LOGGER.warning("received %s again: exiting without finishing the drain", name)
            logging.shutdown()
            os._exit(FORCED_EXIT_BASE + signum)
        _LOGGER.info("received %s: draining (send it again to exit at once)", name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()

    def load() -> None:
        try:
            server.load()
        except BaseException as exc:
            failure.append(exc)
            stop.set()

    threading.Thread(target=load, name="model-loader", daemon=True).start()
    stop.wait()
    server.stop()
    if failure:
        _LOGGER.error("could not start: %s", failure[0])
        return 1
    return 0
