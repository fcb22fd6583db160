"""Interceptors: request ids, the JSON access log, auth, and the last-resort error mapping.

Most tests run a real server with changed settings that borrows the session's loaded tiny
model (no second load); interceptors alone are also tried on a dummy service (grpc-interceptor's
``dummy_client`` pattern) where a handler can be made to fail in ways the servicer never does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from qwen_grpc.interceptors.access_log import AccessLogInterceptor
from qwen_grpc.interceptors.auth import BearerTokens
from qwen_grpc.interceptors.base import CallContext
from qwen_grpc.interceptors.deadlines import DeadlineInterceptor
from qwen_grpc.interceptors.errors import ErrorInterceptor
from qwen_grpc.v1 import chat_pb2
from tests.conftest import RunningServer, ServerMaker

SECRET_PROMPT = "my account number is 4242-SECRET"
REQUEST = chat_pb2.ChatRequest(
    messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=SECRET_PROMPT)],
    options=chat_pb2.GenerationOptions(greedy=True, max_new_tokens=6),
)
STREAM_REQUEST = chat_pb2.StreamChatRequest(messages=REQUEST.messages, options=REQUEST.options)


def wait_for_lines(
    lines: Callable[[], list[dict[str, Any]]], count: int, within: float = 2.0
) -> list[dict[str, Any]]:
    """Cancelled calls are logged from gRPC's completion callback, a moment after the client."""
    deadline = time.monotonic() + within
    while len(lines()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return lines()


def metadata_value(metadata: Any, key: str) -> str | None:
    return next((value for k, value in metadata or () if k == key), None)


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(v.field for v in bad_request.field_violations)
    return fields


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


# -- request id and access log ---------------------------------------------------------------


def test_request_id_is_echoed_and_the_call_logged_as_one_json_line_without_the_prompt(
    tiny_server: RunningServer, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    reply, call = tiny_server.stub.Chat.with_call(
        REQUEST, metadata=[("x-request-id", "req-42"), ("x-client-id", "billing")]
    )
    assert metadata_value(call.initial_metadata(), "x-request-id") == "req-42"
    assert metadata_value(call.trailing_metadata(), "x-request-id") == "req-42"
    [line] = access_log()
    assert line["method"] == "/qwen.chat.v1.ChatService/Chat"
    assert line["request_id"] == "req-42"
    assert line["code"] == "OK"
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert line["client"] == "id:billing"
    assert line["duration_ms"] > 0
    assert line["prompt_tokens"] == reply.usage.prompt_tokens
    assert line["completion_tokens"] == reply.usage.completion_tokens
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", line["time"])
    assert "prompt" not in line and "answer" not in line
    assert "4242" not in json.dumps(line) and reply.message.content not in line.values()


def test_a_request_id_is_generated_when_the_caller_sends_none(
    tiny_server: RunningServer, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    _, call = tiny_server.stub.CountTokens.with_call(
        chat_pb2.CountTokensRequest(messages=REQUEST.messages)
    )
    echoed = metadata_value(call.initial_metadata(), "x-request-id")
    assert echoed is not None and re.fullmatch(r"[0-9a-f]{32}", echoed)
    [line] = access_log()
    assert line["request_id"] == echoed
    assert line["prompt_tokens"] > 0


def test_stream_is_timed_to_its_end_with_time_to_first_token(
    tiny_server: RunningServer, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    request = replace_options(STREAM_REQUEST, max_new_tokens=32)
    stream = tiny_server.stub.StreamChat(request, metadata=[("x-request-id", "stream-1")])
    first = next(stream)
    first_at = time.monotonic()
    assert metadata_value(stream.initial_metadata(), "x-request-id") == "stream-1"
    *_, final = stream
    last_at = time.monotonic()
    assert first.WhichOneof("event") == "delta"
    assert metadata_value(stream.trailing_metadata(), "x-request-id") == "stream-1"
    [line] = access_log()
    assert line["code"] == "OK"
    assert line["request_id"] == "stream-1"
    assert 0 < line["ttft_ms"] < line["duration_ms"]
    # The whole stream, not the creation of the generator (grpc's latency example's pitfall).
    assert line["duration_ms"] >= 0.5 * (last_at - first_at) * 1000
    assert line["completion_tokens"] == final.final.usage.completion_tokens


def replace_options(request: Any, **options: Any) -> Any:
    changed = type(request)()
    changed.CopyFrom(request)
    for name, value in options.items():
        setattr(changed.options, name, value)
    return changed


@pytest.mark.parametrize("streaming", [False, True], ids=["Chat", "StreamChat"])
def test_failed_calls_echo_the_request_id_in_trailers_only_and_are_logged_with_their_code(
    tiny_server: RunningServer, access_log: Callable[[], list[dict[str, Any]]], streaming: bool
) -> None:
    """No headers before the answer: headers would commit the call and defeat retries."""
    options = {"temperature": 9.0}
    metadata = [("x-request-id", "bad-1")]
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            bad_stream = chat_pb2.StreamChatRequest(messages=REQUEST.messages, options=options)
            list(tiny_server.stub.StreamChat(bad_stream, metadata=metadata))
        else:
            bad = chat_pb2.ChatRequest(messages=REQUEST.messages, options=options)
            tiny_server.stub.Chat(bad, metadata=metadata)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metadata_value(error.trailing_metadata(), "x-request-id") == "bad-1"
    assert metadata_value(error.initial_metadata(), "x-request-id") is None
    assert "options.temperature" in bad_request_fields(error)  # the details survive too
    [line] = access_log()
    assert (line["code"], line["request_id"], line["level"]) == (
        "INVALID_ARGUMENT",
        "bad-1",
        "INFO",
    )


def test_cancelled_stream_is_logged_as_cancelled(
    tiny_server: RunningServer, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    stream = tiny_server.stub.StreamChat(replace_options(STREAM_REQUEST, max_new_tokens=400))
    next(stream)
    stream.cancel()
    [line] = wait_for_lines(access_log, 1)
    assert line["code"] == "CANCELLED"
    assert "ttft_ms" in line


def test_log_content_setting_adds_prompt_and_answer(
    make_server: ServerMaker, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    running = make_server(log_content=True)
    reply = running.stub.Chat(REQUEST)
    streamed = list(running.stub.StreamChat(STREAM_REQUEST))
    unary_line, stream_line = access_log()
    assert unary_line["prompt"] == [{"role": "ROLE_USER", "content": SECRET_PROMPT}]
    assert unary_line["answer"] == reply.message.content
    assert stream_line["answer"] == "".join(e.delta for e in streamed)


def test_health_checks_are_logged_only_when_asked(
    make_server: ServerMaker, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    quiet, chatty = make_server(), make_server(log_health_checks=True)
    for running in (quiet, chatty):
        health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest())
    [line] = access_log()
    assert line["method"] == "/grpc.health.v1.Health/Check"


# -- one error model -------------------------------------------------------------------------


def test_a_stray_exception_becomes_internal_with_the_request_id_and_no_traceback(
    make_server: ServerMaker,
    tiny_server: RunningServer,
    access_log: Callable[[], list[dict[str, Any]]],
) -> None:
    running = make_server()
    # A handler bug: GetModelInfo reads limits outside any try block.
    broken = replace(tiny_server.server.servicer.runtime, limits=None)  # type: ignore[arg-type]
    running.server.servicer.attach(broken)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.GetModelInfo(
            chat_pb2.GetModelInfoRequest(), metadata=[("x-request-id", "bug-7")]
        )
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details()  # type: ignore[attr-defined]
    assert "bug-7" in details and "Traceback" not in details and "NoneType" not in details
    info = error_info(caught.value)
    assert info is not None and info.metadata["request_id"] == "bug-7"
    [line] = access_log()
    assert (line["code"], line["level"]) == ("INTERNAL", "ERROR")


@contextmanager
def dummy_service(
    interceptors: list[grpc.ServerInterceptor], handlers: dict[str, grpc.RpcMethodHandler]
) -> Iterator[grpc.Channel]:
    """A real server on port 0 with only the interceptors under test and raw-bytes handlers."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("qwen.chat.v1.ChatService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(0)


def _fails_mid_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    raise KeyError("a bug halfway through")


def _fails_at_once(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise ZeroDivisionError("a bug")


def test_no_exception_leaks_as_unknown_not_even_mid_stream(
    access_log: Callable[[], list[dict[str, Any]]],
) -> None:
    handlers = {
        "StreamChat": grpc.unary_stream_rpc_method_handler(_fails_mid_stream),
        "Chat": grpc.unary_unary_rpc_method_handler(_fails_at_once),
    }
    with dummy_service([AccessLogInterceptor(), ErrorInterceptor()], handlers) as channel:
        stream = channel.unary_stream("/qwen.chat.v1.ChatService/StreamChat")(
            b"", metadata=[("x-request-id", "mid")]
        )
        assert next(stream) == b"first"
        with pytest.raises(grpc.RpcError) as mid_stream:
            next(stream)
        with pytest.raises(grpc.RpcError) as unary:
            channel.unary_unary("/qwen.chat.v1.ChatService/Chat")(b"")
    assert mid_stream.value.code() == grpc.StatusCode.INTERNAL
    assert "mid" in mid_stream.value.details()  # type: ignore[attr-defined]
    assert unary.value.code() == grpc.StatusCode.INTERNAL
    assert [line["code"] for line in access_log()] == ["INTERNAL", "INTERNAL"]


def test_server_deadline_reaches_the_handler_through_time_remaining() -> None:
    seen: list[float] = []

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(context.time_remaining())
        return b""

    interceptors = [ErrorInterceptor(), DeadlineInterceptor(2.0, 5.0, 0.1)]
    handlers = {"Chat": grpc.unary_unary_rpc_method_handler(handler)}
    with dummy_service(interceptors, handlers) as channel:
        call = channel.unary_unary("/qwen.chat.v1.ChatService/Chat")
        call(b"")  # no deadline: the default applies
        call(b"", timeout=60)  # too long: cut to the maximum
        call(b"", timeout=1)  # shorter than both: the caller's stands
    assert 1.5 < seen[0] <= 2.0
    assert 4.5 < seen[1] <= 5.0
    assert 0.5 < seen[2] <= 1.05  # grpc reads its deadline against a different clock


def test_call_context_keeps_one_request_id_in_the_metadata_the_servicer_reads() -> None:
    class Fake:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("x-request-id", "x" * 500), ("other", "1"))

    context = CallContext.of(Fake())  # type: ignore[arg-type]
    assert CallContext.of(context) is context
    assert context.request_id == "x" * 128
    assert dict(context.invocation_metadata()) == {"x-request-id": "x" * 128, "other": "1"}


# -- auth ------------------------------------------------------------------------------------


def test_auth_is_off_by_default(tiny_server: RunningServer) -> None:
    assert tiny_server.stub.GetModelInfo(chat_pb2.GetModelInfoRequest()).context_length > 0


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "CREDENTIALS_MISSING"),
        ([("authorization", "Bearer wrong")], "CREDENTIALS_INVALID"),
        ([("authorization", "Bearer s3cret-alic")], "CREDENTIALS_INVALID"),
        ([("authorization", "Basic s3cret-alice")], "CREDENTIALS_INVALID"),
    ],
    ids=["missing", "wrong", "prefix", "not-bearer"],
)
def test_auth_on_refuses_missing_or_wrong_tokens_with_unauthenticated(
    make_server: ServerMaker, metadata: list[tuple[str, str]], reason: str
) -> None:
    running = make_server(auth_tokens="alice:s3cret-alice,bob:hunter2")
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Chat(REQUEST, metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(caught.value)
    assert info is not None and info.reason == reason and info.domain == "qwen-grpc"


def test_auth_on_serves_known_tokens_and_names_the_client(
    make_server: ServerMaker, tmp_path: Path, access_log: Callable[[], list[dict[str, Any]]]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# callers\nalice:s3cret-alice\n\nbare-token-123\n")
    running = make_server(auth_tokens_file=tokens)
    for token in ("s3cret-alice", "bare-token-123"):
        running.stub.Chat(
            REQUEST, metadata=[("authorization", f"bearer {token}"), ("x-client-id", "alice")]
        )
    clients = [line["client"] for line in access_log()]
    assert clients[0] == "user:alice"
    assert re.fullmatch(r"user:token-[0-9a-f]{8}", clients[1])


def test_health_is_exempt_from_auth_and_reflection_is_not(make_server: ServerMaker) -> None:
    running = make_server(auth_tokens="probe-less-token")
    health = health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # answered, not refused
    with pytest.raises(grpc.RpcError) as caught:
        ProtoReflectionDescriptorDatabase(running.channel).get_services()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bearer_tokens_parse_names_and_refuse_an_empty_configuration(tmp_path: Path) -> None:
    tokens = BearerTokens.from_sources(None, "alice:a1, b2 ,carol:c3")
    assert len(tokens) == 3
    assert tokens.identify("a1") == "alice"
    assert tokens.identify("c3") == "carol"
    assert (tokens.identify("b2") or "").startswith("token-")
    assert tokens.identify("nope") is None
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    with pytest.raises(ValueError, match="no bearer token"):
        BearerTokens.from_sources(empty, None)
    assert not BearerTokens.from_sources(None, None)
