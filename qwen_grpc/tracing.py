"""OpenTelemetry traces of the calls, exported over OTLP/gRPC to ``otlp_endpoint``.

The server imports this module only when an endpoint is set: with tracing off there is no
tracer provider, no exporter thread, and the OpenTelemetry SDK is not even loaded.

Every call gets a SERVER span. When the caller's metadata carries a W3C ``traceparent``,
OpenTelemetry's propagator (``OTEL_PROPAGATORS``, W3C trace context and baggage by default)
makes the caller's span its parent. The span ends with what the access log recorded about the
call, so token counts, finish reason and status code have one source
(:mod:`qwen_grpc.interceptors.access_log`), and the generation's stages become child spans after
the fact, from the times the engine noted (:class:`~qwen_grpc.engine.types.Timings`).

The tracer provider is the server's own, not the process-wide one: two servers in one process
(the tests) export to their own collectors, and nothing else in the process is traced through
it by accident. ``OTEL_*`` variables still tune the SDK: sampling (``OTEL_TRACES_SAMPLER``),
resource attributes, the batch delay and the export timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from qwen_grpc.engine.types import Timings

SERVICE_NAME = "qwen-grpc"
# Codes that make a server span an error (OpenTelemetry's gRPC conventions); the others are
# the caller's doing, such as INVALID_ARGUMENT or CANCELLED.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# Access-log fields and the span attributes they become. The log has prompt and answer only
# when ``log_content`` is on, so the span has them only then too.
_ATTRIBUTES = {
    "request_id": "qwen_grpc.request_id",
    "prompt_tokens": "gen_ai.usage.input_tokens",
    "completion_tokens": "gen_ai.usage.output_tokens",
    "prompt": "qwen_grpc.prompt",
    "answer": "qwen_grpc.answer",
}


class CallSpan:
    """One call's server span, from the call's start to the access log's record of its end."""

    def __init__(self, tracer: trace.Tracer, method: str, parent: Context) -> None:
        self._tracer = tracer
        # One reading of both clocks converts the engine's monotonic times to span timestamps.
        self._start_ns = time.time_ns()
        self._start = time.monotonic()
        self._span = tracer.start_span(
            method.lstrip("/"),
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=self._start_ns,
            attributes={"rpc.system.name": "grpc", "rpc.method": method.lstrip("/")},
        )
        self.trace_id = trace.format_trace_id(self._span.get_span_context().trace_id)

    def _ns(self, monotonic: float) -> int:
        return self._start_ns + int((monotonic - self._start) * 1e9)

    def finish(
        self,
        code: grpc.StatusCode,
        fields: Mapping[str, Any],
        timings: Timings | None,
        end: float,
    ) -> None:
        """Ends the span at ``end`` (``time.monotonic``) with the call's outcome, after its
        queue-wait, prefill and decode children."""
        span = self._span
        span.set_attribute("rpc.response.status_code", code.name)
        for field, attribute in _ATTRIBUTES.items():
            value = fields.get(field)
            if value is None:
                continue
            if not isinstance(value, str | int):
                value = json.dumps(value, ensure_ascii=False)
            span.set_attribute(attribute, value)
        if "finish_reason" in fields:
            span.set_attribute("gen_ai.response.finish_reasons", [fields["finish_reason"]])
        if code in _SERVER_ERRORS:
            span.set_status(trace.StatusCode.ERROR, code.name)
        if timings is not None:
            inside = trace.set_span_in_context(span)
            for name, start, stop in timings.stages(end):
                stage = self._tracer.start_span(name, context=inside, start_time=self._ns(start))
                stage.end(end_time=self._ns(stop))
        span.end(end_time=self._ns(end))


class Tracing:
    """The server's tracer: spans batched on a background thread and sent to the collector."""

    def __init__(self, endpoint: str) -> None:
        self._provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer(__name__)

    def start(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> CallSpan:
        """A span for a call that starts now, continuing the caller's trace if it sent one."""
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        return CallSpan(self._tracer, method, propagate.extract(carrier))

    def shutdown(self) -> None:
        """Exports the spans still queued (bounded by the exporter's timeout) and stops."""
        self._provider.shutdown()
