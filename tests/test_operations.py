"""What operators rely on: Prometheus metrics that move, and a watchdog that tells the truth."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness.server_process import ServerProcess, free_port
from qwen_grpc.server import FORCED_EXIT_BASE
from qwen_grpc.v1 import chat_pb2
from tests.conftest import RunningServer


def scrape(port: int) -> dict[str, float]:
    """Samples by name and labels, e.g. ``qwen_grpc_calls_total{code="OK",method=...}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def stream_request(max_new_tokens: int) -> chat_pb2.StreamChatRequest:
    return chat_pb2.StreamChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Tell me a long story")],
        options=chat_pb2.GenerationOptions(greedy=True, max_new_tokens=max_new_tokens),
    )


def health(running: RunningServer) -> int:
    stub = health_pb2_grpc.HealthStub(running.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_metrics_move_during_and_after_a_real_call(server_factory: Any) -> None:
    port = free_port()
    running = server_factory(metrics_port=port)
    running.server.load()
    before = scrape(port)
    stream = running.stub.StreamChat(stream_request(300))
    first = [next(stream) for _ in range(3)]  # later deltas come from batched decode steps
    during = scrape(port)
    assert during["qwen_active_sequences"] >= 1
    rest = list(stream)
    assert rest[-1].WhichOneof("event") == "final"
    after = scrape(port)
    method = "/qwen.chat.v1.ChatService/StreamChat"
    calls = f'qwen_grpc_calls_total{{code="OK",method="{method}"}}'
    assert after[calls] == before.get(calls, 0) + 1
    generated = after["qwen_generated_tokens_total"] - before["qwen_generated_tokens_total"]
    assert generated >= len(first) + len(rest) - 1
    assert after["qwen_prompt_tokens_total"] > before["qwen_prompt_tokens_total"]
    assert total(after, 'qwen_grpc_time_to_first_token_seconds_count{method="' + method) >= 1
    assert after['qwen_engine_step_seconds_count{kind="decode"}'] > before.get(
        'qwen_engine_step_seconds_count{kind="decode"}', 0
    )
    assert after["qwen_active_sequences"] == 0
    assert after["qwen_queue_depth"] == 0


def test_time_to_first_token_counts_only_chat_calls(server_factory: Any) -> None:
    port = free_port()
    running = server_factory(metrics_port=port)
    running.server.load()
    ttft_count = "qwen_grpc_time_to_first_token_seconds_count"
    before = total(scrape(port), ttft_count)
    # What `grpcurl list` sends: a reflection stream, which answers but generates nothing.
    reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    answers = list(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    assert "qwen.chat.v1.ChatService" in {s.name for s in answers[0].list_services_response.service}
    after_reflection = scrape(port)
    reflection_calls = 'qwen_grpc_calls_total{code="OK",method="/grpc.reflection.v1alpha.'
    assert total(after_reflection, reflection_calls) == 1, "the reflection call was not seen"
    assert total(after_reflection, ttft_count) == before
    assert list(running.stub.StreamChat(stream_request(4)))[-1].WhichOneof("event") == "final"
    assert total(scrape(port), ttft_count) == before + 1


@pytest.mark.parametrize("fault", ["stuck", "crash"])
def test_watchdog_reports_not_serving_and_fails_calls_when_the_engine_breaks(
    server_factory: Any, fault: str
) -> None:
    running = server_factory(watchdog_stall_seconds=1.0)
    running.server.load()
    engine = running.server.engine
    assert engine is not None
    release = threading.Event()

    def broken_step(*_: object) -> object:
        if fault == "crash":
            raise SystemExit("injected crash of the engine thread")
        release.wait(30)
        raise RuntimeError("released")

    engine.model.step = broken_step  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(running.stub.StreamChat(stream_request(50), timeout=20))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while health(running) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never left SERVING"
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as refused:
        running.stub.Chat(chat_pb2.ChatRequest(messages=stream_request(5).messages), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    release.set()


def test_a_second_sigterm_exits_at_once_in_the_middle_of_a_drain(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    server = ServerProcess(
        str(tiny_model_dir),
        tmp_path / "server.log",
        cache_dir=cache_dir,
        # The first SIGTERM starts a drain that would keep the process for two minutes.
        extra_args=("--dtype", "float32", "--drain-delay-seconds", "120", "--threads", "1"),
        startup_timeout=120.0,
    )
    server.start()
    try:
        server.sigterm()
        deadline = time.monotonic() + 30
        while server.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "the first SIGTERM never started the drain"
            time.sleep(0.05)
        assert server.alive
        server.sigterm()
        code = server.wait_exit(timeout=20)
    finally:
        server.stop(timeout=5)
    assert code == FORCED_EXIT_BASE + signal.SIGTERM, server.log_tail()


def test_an_idle_health_watch_does_not_hold_a_sigterm_shutdown(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # As client-side health checking does: one Watch open, no chat call, then a rollout's
    # SIGTERM. A grace of 20 s would keep the process that long if the Watch held the drain.
    drain_delay = 0.5
    server = ServerProcess(
        str(tiny_model_dir),
        tmp_path / "server.log",
        cache_dir=cache_dir,
        extra_args=(
            *("--dtype", "float32", "--threads", "1", "--grace-seconds", "20"),
            *("--drain-delay-seconds", str(drain_delay)),
        ),
        startup_timeout=120.0,
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=60
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            signalled = time.monotonic()
            server.sigterm()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                rest = [r.status for r in watch]
                ended_with = "OK"
            except grpc.RpcError as error:
                rest, ended_with = [], f"{error.code().name} ({error.details()})"
            watch_seconds = time.monotonic() - signalled
            # Interpreter teardown after "stopped" takes seconds on a loaded 2-core host; a
            # held drain would take the whole 20 s grace.
            code = server.wait_exit(timeout=drain_delay + 8 - watch_seconds)
            exited = time.monotonic() - signalled
    finally:
        server.stop(timeout=30)
    # The server ends the stream as a finished call, not by cutting the connection.
    assert ended_with == "OK", f"the Watch ended {ended_with} {watch_seconds:.1f} s after SIGTERM"
    assert set(rest) <= {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert code == 0, f"still running {exited:.1f} s after SIGTERM:\n{server.log_tail()}"
    assert exited <= drain_delay + 8
