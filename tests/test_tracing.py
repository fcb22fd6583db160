"""Traces: a client's span, through the server's call span and its stages, reaches a collector.

The collector is a real OTLP/gRPC ``TraceService`` on a free loopback port. The server exports
to it as to any collector, over the network, in batches; stopping the server flushes them, so
every assertion runs after a stop and needs no sleep.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from qwen_client import ChatClient

from qwen_grpc.config import Settings
from qwen_grpc.engine.types import Timings
from qwen_grpc.server import SERVICE_NAME
from qwen_grpc.v1 import chat_pb2
from tests.conftest import REPO_ROOT, RunningServer, ServerMaker

AccessLog = Callable[[], list[dict[str, Any]]]
SECRET_PROMPT = "my account number is 4242-SECRET"
STAGES = ["queue_wait", "prefill", "decode"]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector got it, ids in hex as logs and trace viewers show them."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]
    status: int


def _value(value: common_pb2.AnyValue) -> Any:
    if value.HasField("array_value"):
        return [_value(item) for item in value.array_value.values]
    return getattr(value, str(value.WhichOneof("value")))


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.endpoint = ""

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self._requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self._requests)
        received = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        received.append(
                            ReceivedSpan(
                                service=resource["service.name"],
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                start=span.start_time_unix_nano,
                                end=span.end_time_unix_nano,
                                attributes={a.key: _value(a.value) for a in span.attributes},
                                status=span.status.code,
                            )
                        )
        return received

    def children_of(self, parent: ReceivedSpan) -> list[ReceivedSpan]:
        return sorted(
            (s for s in self.spans() if s.parent_id == parent.span_id), key=lambda s: s.start
        )


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.endpoint = f"http://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield receiver
    server.stop(0)


def traced_server(settings: Settings, collector: Collector) -> RunningServer:
    """A server exporting to ``collector``; the test stops it (which flushes) before asserting."""
    return RunningServer(replace(settings, otlp_endpoint=collector.endpoint))


def serving(running: RunningServer, loaded: RunningServer) -> RunningServer:
    """``running`` serving ``loaded``'s model and saying so, as the client's health check asks."""
    running.server.servicer.attach(loaded.server.servicer.runtime)
    running.server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return running


def server_span(collector: Collector, request_id: str) -> ReceivedSpan:
    [span] = [
        s
        for s in collector.spans()
        if s.service == "qwen-grpc" and s.attributes.get("qwen_grpc.request_id") == request_id
    ]
    return span


def test_a_client_span_continues_through_the_server_span_and_its_stages_to_the_collector(
    tiny_settings: Settings,
    tiny_server: RunningServer,
    collector: Collector,
    access_log: AccessLog,
) -> None:
    client_provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    client_provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector.endpoint))
    )
    client_span = client_provider.get_tracer("test").start_span("ask the model")
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(client_span))
    running = serving(traced_server(tiny_settings, collector), tiny_server)
    try:
        with ChatClient(running.server.address) as client:
            result = client.chat(
                [("user", SECRET_PROMPT)],
                metadata=[*headers.items(), ("x-request-id", "traced-1")],
                max_new_tokens=6,
                greedy=True,
            )
        client_span.end()
    finally:
        running.close()
        client_provider.shutdown()

    client_context = client_span.get_span_context()
    trace_id = trace.format_trace_id(client_context.trace_id)
    server = server_span(collector, "traced-1")
    assert server.name == "qwen.chat.v1.ChatService/Chat"
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server.trace_id == trace_id
    assert server.parent_id == trace.format_span_id(client_context.span_id)
    [client_received] = [s for s in collector.spans() if s.service == "test-client"]
    assert client_received.span_id == server.parent_id
    assert server.attributes["rpc.response.status_code"] == "OK"
    assert server.attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert server.attributes["gen_ai.usage.output_tokens"] == result.usage.completion_tokens
    assert server.attributes["gen_ai.response.finish_reasons"] == [result.finish_reason]
    assert server.status == trace_pb2.Status.STATUS_CODE_UNSET

    stages = collector.children_of(server)
    assert [s.name for s in stages] == STAGES
    assert {s.trace_id for s in stages} == {trace_id}
    assert server.start <= stages[0].start
    for earlier, later in itertools.pairwise(stages):
        assert earlier.end == later.start
    assert stages[-1].end <= server.end

    everything = json.dumps([s.attributes for s in collector.spans()])
    assert "4242" not in everything and result.text not in everything
    [line] = access_log()
    assert line["trace_id"] == trace_id
    assert line["finish_reason"] == result.finish_reason


def test_refused_and_streamed_calls_get_spans_with_their_status_codes(
    tiny_settings: Settings, tiny_server: RunningServer, collector: Collector
) -> None:
    running = traced_server(tiny_settings, collector)
    ask = chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hello")],
        options=chat_pb2.GenerationOptions(greedy=True, max_new_tokens=4),
    )
    try:
        with pytest.raises(grpc.RpcError) as loading:
            running.stub.Chat(ask, metadata=[("x-request-id", "loading")])
        running.server.servicer.attach(tiny_server.server.servicer.runtime)
        with pytest.raises(grpc.RpcError) as invalid:
            running.stub.Chat(chat_pb2.ChatRequest(), metadata=[("x-request-id", "empty")])
        stream = list(
            running.stub.StreamChat(
                chat_pb2.StreamChatRequest(messages=ask.messages, options=ask.options),
                metadata=[("x-request-id", "streamed")],
            )
        )
    finally:
        running.close()

    assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
    unavailable = server_span(collector, "loading")
    assert unavailable.attributes["rpc.response.status_code"] == "UNAVAILABLE"
    assert unavailable.status == trace_pb2.Status.STATUS_CODE_ERROR

    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = server_span(collector, "empty")
    assert refused.attributes["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert refused.status == trace_pb2.Status.STATUS_CODE_UNSET  # the caller's fault
    assert "gen_ai.usage.input_tokens" not in refused.attributes
    assert collector.children_of(refused) == []  # refused before the engine saw it

    final = stream[-1].final
    streamed = server_span(collector, "streamed")
    assert streamed.name == "qwen.chat.v1.ChatService/StreamChat"
    assert streamed.parent_id == ""  # no traceparent: the server's span starts the trace
    assert streamed.attributes["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    assert streamed.attributes["gen_ai.response.finish_reasons"] == [
        chat_pb2.FinishReason.Name(final.finish_reason)
    ]
    assert [s.name for s in collector.children_of(streamed)] == STAGES


def test_prompt_and_answer_reach_the_span_only_with_log_content(
    tiny_settings: Settings, tiny_server: RunningServer, collector: Collector
) -> None:
    running = serving(
        traced_server(replace(tiny_settings, log_content=True), collector), tiny_server
    )
    try:
        with ChatClient(running.server.address) as client:
            result = client.chat(
                [("user", SECRET_PROMPT)],
                metadata=[("x-request-id", "content")],
                max_new_tokens=4,
                greedy=True,
            )
    finally:
        running.close()

    attributes = server_span(collector, "content").attributes
    assert SECRET_PROMPT in attributes["qwen_grpc.prompt"]
    assert attributes["qwen_grpc.answer"] == result.text


def test_without_an_endpoint_nothing_is_traced_or_even_loaded(
    make_server: ServerMaker, access_log: AccessLog
) -> None:
    exporters_before = {t for t in threading.enumerate() if t.name.startswith("OtelBatch")}
    running = make_server()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    running.stub.CountTokens(
        chat_pb2.CountTokensRequest(
            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")]
        ),
        metadata=[("traceparent", parent)],
    )
    [line] = access_log()
    assert "trace_id" not in line
    assert running.server.tracing is None
    exporters_after = {t for t in threading.enumerate() if t.name.startswith("OtelBatch")}
    assert exporters_after <= exporters_before
    # A fresh process shows that a server without an endpoint never imports OpenTelemetry.
    probe = (
        "import sys\n"
        "from qwen_grpc.config import Settings\n"
        "from qwen_grpc.server import QwenServer\n"
        "QwenServer(Settings(port=0, metrics_port=0))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_stages_end_where_the_request_left_and_never_after_the_call() -> None:
    cancelled_in_queue = Timings(submitted=1.0, finished=3.0)
    assert cancelled_in_queue.stages(end=5.0) == [("queue_wait", 1.0, 3.0)]
    still_prefilling = Timings(submitted=1.0, admitted=2.0)
    assert still_prefilling.stages(end=4.0) == [("queue_wait", 1.0, 2.0), ("prefill", 2.0, 4.0)]
    answered = Timings(submitted=1.0, admitted=2.0, first_token=3.0, finished=9.0)
    assert answered.stages(end=5.0)[-1] == ("decode", 3.0, 5.0)
