"""The access log: one structured line per call.

When a call ends the logger ``qwen_grpc.access`` records method, peer, client, request id (the
same one :mod:`qwen_grpc.interceptors.request_id` sends back), status code, duration, token
counts and, for StreamChat, the time to the first token. The fields ride
on the record (``extra=``), so :class:`qwen_grpc.logs.JsonFormatter` writes one JSON object.

Streams are timed to their end, not to the creation of the generator, by wrapping the response
iterator. Prompt and answer text are personal data: they are logged only if ``log_content``.
The same finished-call facts feed the Prometheus call metrics through a :class:`CallObserver`,
and, when tracing is on, the call's span through a :class:`CallTracer`: the log line then
carries the span's ``trace_id``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import grpc

from qwen_grpc.engine.types import Timings
from qwen_grpc.interceptors.base import (
    GENERATION_METHODS,
    HEALTH_PREFIX,
    Behavior,
    CallContext,
    CallInfo,
    Interceptor,
)
from qwen_grpc.v1 import chat_pb2

_LOGGER = logging.getLogger(__name__)
ACCESS_LOGGER = logging.getLogger("qwen_grpc.access")
_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)


class CallObserver(Protocol):
    """Told about every finished call, e.g. to count calls by method and code."""

    def on_call(self, method: str, code: str, seconds: float, ttft: float | None) -> None: ...


class CallTrace(Protocol):
    """The trace of one call, started with the call and finished with its log line."""

    trace_id: str

    def finish(
        self, code: grpc.StatusCode, fields: Mapping[str, Any], timings: Timings | None, end: float
    ) -> None: ...


class CallTracer(Protocol):
    """Starts a trace per call (:class:`qwen_grpc.tracing.Tracing`)."""

    def start(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> CallTrace: ...


class _CallRecord:
    """What is known about one call so far; written to the log exactly once."""

    def __init__(
        self,
        context: CallContext,
        call: CallInfo,
        request: Any,
        log_content: bool,
        observer: CallObserver | None,
        tracer: CallTracer | None,
    ) -> None:
        self._observer = observer
        self._context = context
        self._call = call
        self._log_content = log_content
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._written = False
        self._first_response: float | None = None
        # A time to first token exists only where tokens stream (StreamChat); other streams,
        # such as reflection's, answer without generating and would skew the histogram.
        self._streams_tokens = call.response_streaming and call.method in GENERATION_METHODS
        self._answer: list[str] = []
        self.fields: dict[str, Any] = {
            "method": call.method,
            "peer": context.peer(),
            "request_id": context.request_id,
        }
        prompt = _prompt_of(request) if log_content and not call.request_streaming else None
        if prompt is not None:
            self.fields["prompt"] = prompt
        self._trace: CallTrace | None = None
        if tracer is not None:
            self._trace = tracer.start(call.method, context.invocation_metadata())
            self.fields["trace_id"] = self._trace.trace_id

    def observe(self, response: Any) -> None:
        """Notes token counts, the first response's time, and (if enabled) the answer text."""
        if self._first_response is None:
            self._first_response = time.monotonic()
        usage: chat_pb2.Usage | None = None
        finish_reason: chat_pb2.FinishReason | None = None
        if isinstance(response, chat_pb2.ChatResponse):
            usage, finish_reason = response.usage, response.finish_reason
            if self._log_content:
                self._answer.append(response.message.content)
        elif isinstance(response, chat_pb2.StreamChatResponse):
            if response.HasField("final"):
                usage, finish_reason = response.final.usage, response.final.finish_reason
            elif self._log_content:
                self._answer.append(response.delta)
        elif isinstance(response, chat_pb2.CountTokensResponse):
            self.fields["prompt_tokens"] = response.prompt_tokens
        if usage is not None:
            self.fields["prompt_tokens"] = usage.prompt_tokens
            self.fields["completion_tokens"] = usage.completion_tokens
        if finish_reason is not None:
            self.fields["finish_reason"] = chat_pb2.FinishReason.Name(finish_reason)

    def write(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._written:
                return
            self._written = True
        end = time.monotonic()
        fields = dict(self.fields)
        fields["code"] = code.name
        fields["duration_ms"] = round((end - self._start) * 1000, 2)
        ttft: float | None = None
        if self._streams_tokens and self._first_response is not None:
            ttft = self._first_response - self._start
            fields["ttft_ms"] = round(ttft * 1000, 2)
        if self._observer is not None:
            self._observer.on_call(self._call.method, code.name, end - self._start, ttft)
        try:
            fields["client"] = self._context.client
        except Exception:  # the peer may be gone; the log line matters more
            _LOGGER.debug("could not name the client", exc_info=True)
        if self._log_content and self._answer:
            fields["answer"] = "".join(self._answer)
        if self._trace is not None:
            self._trace.finish(code, fields, self._context.timings, end)
        level = logging.ERROR if code in _SERVER_FAULTS else logging.INFO
        ACCESS_LOGGER.log(
            level,
            "%s %s %.1f ms",
            fields["method"],
            fields["code"],
            fields["duration_ms"],
            extra=fields,
        )


def _prompt_of(request: Any) -> list[dict[str, str]] | None:
    messages = getattr(request, "messages", None)
    if messages is None:
        return None
    return [
        {
            "role": chat_pb2.Role.Name(m.role) if m.role in chat_pb2.Role.values() else str(m.role),
            "content": m.content,
        }
        for m in messages
    ]


def _final_code(context: CallContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, as far as the server can tell."""
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    if error is None and context.is_active():
        return grpc.StatusCode.OK
    if isinstance(error, Exception):
        return grpc.StatusCode.UNKNOWN
    # The client went away (cancelled, disconnected, or its own deadline passed).
    if context.client_deadline_remaining() == 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class AccessLogInterceptor(Interceptor):
    """Writes one access-log line per call."""

    def __init__(
        self,
        log_content: bool = False,
        log_health_checks: bool = False,
        observer: CallObserver | None = None,
        tracer: CallTracer | None = None,
    ) -> None:
        self._log_content = log_content
        self._log_health_checks = log_health_checks
        self._observer = observer
        self._tracer = tracer

    def applies_to(self, method: str) -> bool:
        return self._log_health_checks or not method.startswith(HEALTH_PREFIX)

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        record = _CallRecord(
            context, call, request, self._log_content, self._observer, self._tracer
        )
        try:
            response = method(request, context)
        except BaseException as exc:
            record.write(_final_code(context, exc))
            raise
        if not call.response_streaming:
            record.observe(response)
            record.write(_final_code(context, None))
            return response
        context.add_callback(lambda: record.write(_final_code(context, GeneratorExit())))
        return self._observe(response, record, context)

    @staticmethod
    def _observe(responses: Iterator[Any], record: _CallRecord, context: CallContext) -> Any:
        try:
            for response in responses:
                record.observe(response)
                yield response
        except BaseException as exc:
            record.write(_final_code(context, exc))
            raise
        record.write(_final_code(context, None))
