"""ChatClient and ``qwen-grpc chat`` against a real demo-model server process."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from qwen_client import (
    ChatClient,
    MessageLike,
    StreamFinal,
    TextDelta,
    error_details,
)
from qwen_client.cli import describe_error

from qwen_grpc.config import Settings
from qwen_grpc.interceptors import build_interceptors
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from tests._demo_server import REPO_ROOT, ServerProcess, demo_server, server_env  # noqa: F401

QUESTION = "What is the capital of France?"
USAGE_LINE = re.compile(r"\[(\w+)\] prompt (\d+) \+ completion (\d+) = (\d+) tokens")


@pytest.fixture(scope="module")
def client(demo_server: ServerProcess) -> Iterator[ChatClient]:  # noqa: F811
    with ChatClient(demo_server.address, timeout=60.0) as chat_client:
        yield chat_client


def run_cli(
    demo_server: ServerProcess,  # noqa: F811
    *args: str,
    stdin: str = "",
) -> subprocess.CompletedProcess[str]:
    """``qwen-grpc chat ...`` as a user runs it, the target taken from the environment."""
    env = server_env()
    env["QWEN_GRPC_TARGET"] = demo_server.address
    return subprocess.run(
        [sys.executable, "-m", "qwen_grpc", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def usage_lines(stderr: str) -> list[tuple[str, int, int, int]]:
    return [
        (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in USAGE_LINE.finditer(stderr)
    ]


def test_health_reports_serving_for_server_and_chat_service(client: ChatClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("qwen.chat.v1.ChatService") == "SERVING"


def test_health_of_unknown_service_raises_not_found(client: ChatClient) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        client.health("no.such.Service")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_chat_answers_with_text_finish_reason_and_usage(client: ChatClient) -> None:
    result = client.chat([("user", QUESTION)], greedy=True)
    assert "Paris" in result.text
    assert result.finish_reason == "FINISH_REASON_STOP"
    usage = result.usage
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_chat_yields_deltas_then_one_final_equal_to_chat(client: ChatClient) -> None:
    messages = [("system", "You are a concise assistant."), ("user", QUESTION)]
    events = list(client.stream_chat(messages, greedy=True, max_new_tokens=48))
    *deltas, final = events
    assert deltas
    assert all(isinstance(event, TextDelta) for event in deltas)
    assert isinstance(final, StreamFinal)
    streamed = "".join(event.text for event in deltas if isinstance(event, TextDelta))
    assert "Paris" in streamed
    unary = client.chat(messages, greedy=True, max_new_tokens=48)
    assert streamed == unary.text
    assert final.finish_reason == unary.finish_reason
    assert final.usage == unary.usage


def test_count_tokens_equals_prompt_tokens_of_chat(client: ChatClient) -> None:
    messages = [("user", QUESTION)]
    prompt_tokens = client.count_tokens(messages)
    assert prompt_tokens > 0
    assert client.chat(messages, greedy=True, max_new_tokens=1).usage.prompt_tokens == (
        prompt_tokens
    )


def test_model_info_describes_the_demo_model(client: ChatClient) -> None:
    info = client.model_info()
    assert info.model_id == "demo"
    assert info.context_length > 0
    assert 0 < info.limits.max_new_tokens < info.context_length
    assert info.defaults.HasField("max_new_tokens")


def test_proto_messages_and_tuples_are_both_accepted(client: ChatClient) -> None:
    mixed: list[MessageLike] = [
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="You are a concise assistant."),
        ("USER", QUESTION),
    ]
    tuples = [("system", "You are a concise assistant."), ("user", QUESTION)]
    assert client.count_tokens(mixed) == client.count_tokens(tuples)


def test_unknown_role_is_rejected_before_any_call() -> None:
    with ChatClient("127.0.0.1:1") as offline, pytest.raises(ValueError, match="role"):
        offline.chat([("robot", "hello")])


def test_empty_messages_raise_invalid_argument_naming_the_field(client: ChatClient) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        client.chat([])
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in [violation.field for violation in details.field_violations]
    assert describe_error(raised.value).startswith("error: INVALID_ARGUMENT: ")


def test_stream_errors_surface_while_iterating_with_details(client: ChatClient) -> None:
    stream = client.stream_chat([("user", QUESTION)], temperature=5.0)
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    details = error_details(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details.field_violations] == ["options.temperature"]


def test_per_call_timeout_overrides_the_default_deadline(client: ChatClient) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        client.chat([("user", "Tell me a long story.")], max_new_tokens=512, timeout=0.05)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_leaving_a_stream_early_cancels_it_and_the_client_keeps_working(
    client: ChatClient,
) -> None:
    stream = client.stream_chat([("user", "Tell me a long story.")], max_new_tokens=256)
    first = next(stream)
    assert isinstance(first, TextDelta)
    stream.close()  # what `break` does: the call is cancelled, the server stops generating
    assert "Paris" in client.chat([("user", QUESTION)], greedy=True).text


def test_dns_target_balances_round_robin(demo_server: ServerProcess) -> None:  # noqa: F811
    with ChatClient(f"dns:///127.0.0.1:{demo_server.port}", timeout=30.0) as dns_client:
        assert dns_client.health() == "SERVING"
        assert dns_client.count_tokens([("user", QUESTION)]) > 0


class RefusesFirstCalls(chat_pb2_grpc.ChatServiceServicer):
    """A real servicer that answers UNAVAILABLE a few times, like a server still loading."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.attempts = 0

    def _refuse_at_first(self, context: grpc.ServicerContext) -> None:
        self.attempts += 1
        if self.attempts <= self.refusals:
            context.abort(grpc.StatusCode.UNAVAILABLE, "still loading")

    def Chat(
        self, request: chat_pb2.ChatRequest, context: grpc.ServicerContext
    ) -> chat_pb2.ChatResponse:
        self._refuse_at_first(context)
        return chat_pb2.ChatResponse(
            message=chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT, content="Paris"),
            finish_reason=chat_pb2.FINISH_REASON_STOP,
        )

    def CountTokens(
        self, request: chat_pb2.CountTokensRequest, context: grpc.ServicerContext
    ) -> chat_pb2.CountTokensResponse:
        self._refuse_at_first(context)
        return chat_pb2.CountTokensResponse(prompt_tokens=7, context_length=32)

    def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.StreamChatResponse]:
        self.attempts += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "still loading")
        yield chat_pb2.StreamChatResponse()  # unreachable; makes this a generator


@pytest.fixture
def refusing_server() -> Iterator[tuple[str, RefusesFirstCalls]]:
    """The refusing servicer behind the production interceptor chain, as the server runs it."""
    servicer = RefusesFirstCalls(refusals=2)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=build_interceptors(Settings())
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_chat_refused_with_unavailable_is_retried_through_the_servers_interceptors(
    refusing_server: tuple[str, RefusesFirstCalls],
) -> None:
    target, servicer = refusing_server
    with ChatClient(target, timeout=10.0) as retrying:
        assert retrying.chat([("user", QUESTION)]).text == "Paris"
    assert servicer.attempts == 3


def test_count_tokens_refused_with_unavailable_is_retried(
    refusing_server: tuple[str, RefusesFirstCalls],
) -> None:
    target, servicer = refusing_server
    with ChatClient(target, timeout=10.0) as retrying:
        assert retrying.count_tokens([("user", "hi")]) == 7
    assert servicer.attempts == 3


def test_retries_stop_after_five_attempts(refusing_server: tuple[str, RefusesFirstCalls]) -> None:
    target, servicer = refusing_server
    servicer.refusals = 100
    with ChatClient(target, timeout=10.0) as retrying, pytest.raises(grpc.RpcError) as raised:
        retrying.chat([("user", QUESTION)])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts == 5
    # The refusal carries its request id in the trailers, where it commits nothing.
    assert re.fullmatch(r"[0-9a-f]{32}", error_details(raised.value).request_id or "")


def test_streams_are_not_retried(refusing_server: tuple[str, RefusesFirstCalls]) -> None:
    target, servicer = refusing_server
    with ChatClient(target, timeout=10.0) as client, pytest.raises(grpc.RpcError) as raised:
        list(client.stream_chat([("user", "hi")]))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts == 1


class RecordsMetadata(chat_pb2_grpc.ChatServiceServicer):
    """A real servicer that remembers the metadata of each stream and answers "hi there"."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.StreamChatResponse]:
        self.metadata.append(dict(context.invocation_metadata()))
        yield chat_pb2.StreamChatResponse(delta="hi ")
        yield chat_pb2.StreamChatResponse(delta="there")
        yield chat_pb2.StreamChatResponse(
            final=chat_pb2.StreamChatFinal(finish_reason=chat_pb2.FINISH_REASON_STOP)
        )


def test_cli_sends_the_bearer_token_from_the_environment() -> None:
    servicer = RecordsMetadata()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = server_env()
        env["QWEN_GRPC_TOKEN"] = "s3cret"
        done = subprocess.run(
            [sys.executable, "-m", "qwen_grpc", "chat", "hello", "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        server.stop(None)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi there\n"
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer s3cret"]


def test_cli_streams_only_the_answer_to_stdout(demo_server: ServerProcess) -> None:  # noqa: F811
    done = run_cli(demo_server, QUESTION, "--greedy")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert done.stdout.endswith("\n")
    assert "FINISH_REASON" not in done.stdout
    assert done.stderr == ""


def test_cli_verbose_reports_usage_on_stderr(demo_server: ServerProcess) -> None:  # noqa: F811
    done = run_cli(demo_server, QUESTION, "--greedy", "--verbose", "--target", demo_server.address)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert [line[0] for line in usage_lines(done.stderr)] == ["FINISH_REASON_STOP"]


def test_cli_interactive_chat_keeps_the_history(demo_server: ServerProcess) -> None:  # noqa: F811
    done = run_cli(
        demo_server,
        "--greedy",
        "--max-new-tokens",
        "24",
        "--verbose",
        stdin="My name is Ada.\nWhat is my name?\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "> " not in done.stderr  # no prompt when stdin is not a terminal
    (_, first_prompt, first_completion, _), (_, second_prompt, _, _) = usage_lines(done.stderr)
    # The second prompt resends the first question and answer.
    assert second_prompt > first_prompt + first_completion


def test_cli_reset_forgets_the_conversation(
    demo_server: ServerProcess,  # noqa: F811
    client: ChatClient,
) -> None:
    done = run_cli(
        demo_server,
        "--greedy",
        "--max-new-tokens",
        "8",
        "--verbose",
        stdin="My name is Ada.\n/reset\nWhat is my name?\n/exit\nIgnored after exit.\n",
    )
    assert done.returncode == 0, done.stderr
    prompts = [prompt for _, prompt, _, _ in usage_lines(done.stderr)]
    assert prompts == [
        client.count_tokens([("user", "My name is Ada.")]),
        client.count_tokens([("user", "What is my name?")]),
    ]


def test_cli_failed_call_prints_one_line_with_the_code_and_exits_1(
    demo_server: ServerProcess,  # noqa: F811
) -> None:
    done = run_cli(demo_server, QUESTION, "--temperature", "5")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert done.stderr.count("\n") == 1
