"""Limits that keep misbehaving callers cheap: rate, concurrency, deadlines, sizes, keepalive.

Servers with changed interceptor settings borrow the session's loaded tiny model; the tests that
need different engine limits (the 20-stream cancellation) load their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from harness.steps import StepGate
from qwen_grpc.config import Settings
from qwen_grpc.engine.scheduler import Engine
from qwen_grpc.interceptors.rate_limit import TokenBuckets
from qwen_grpc.server import _max_prompt_tokens
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from tests.conftest import RunningServer, ServerMaker

# One token per 1,000 s: slower than any test can take.
BURST_TEST_RATE = 0.001
MESSAGES = [chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Tell a long story")]


def chat(max_new_tokens: int = 2) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        messages=MESSAGES,
        options=chat_pb2.GenerationOptions(greedy=True, max_new_tokens=max_new_tokens),
    )


def stream(max_new_tokens: int = 400) -> chat_pb2.StreamChatRequest:
    return chat_pb2.StreamChatRequest(
        messages=MESSAGES,
        options=chat_pb2.GenerationOptions(greedy=True, max_new_tokens=max_new_tokens),
    )


def engine_of(running: RunningServer) -> Engine:
    return running.server.servicer.runtime.engine


def retry_delay(error: grpc.RpcError) -> float | None:
    """The retry delay a client parses from google.rpc.RetryInfo, in seconds."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


# -- rate limit ------------------------------------------------------------------------------


def test_rate_limit_burst_first_n_pass_then_resource_exhausted_with_a_retry_delay(
    make_server: ServerMaker,
) -> None:
    running = make_server(rate_limit_per_second=0.1, rate_limit_burst=5)
    outcomes: list[grpc.StatusCode] = []
    delays: list[float | None] = []
    for _ in range(8):
        try:
            running.stub.Chat(chat())
            outcomes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            outcomes.append(error.code())
            delays.append(retry_delay(error))
    assert outcomes == [grpc.StatusCode.OK] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    # The next token is due within 1 / rate seconds, and no sooner than 10 s minus the calls.
    assert all(d is not None and 5.0 < d <= 10.0 for d in delays)


def _burst(running: RunningServer, client_ids: list[str | None]) -> dict[str, int]:
    """Fires all calls at once; counts outcomes by status code name."""
    calls = [
        running.stub.Chat.future(
            chat(), metadata=[] if client is None else [("x-client-id", client)], timeout=60
        )
        for client in client_ids
    ]
    counts: dict[str, int] = {}
    for call in calls:
        try:
            call.result()
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                delay = retry_delay(error)
                assert delay is not None and 0 < delay <= 1 / BURST_TEST_RATE
        counts[code.name] = counts.get(code.name, 0) + 1
    return counts


def test_burst_of_50_calls_from_one_client_and_from_two(
    make_server: ServerMaker, record_property: Callable[[str, object], None]
) -> None:
    # So slow a refill that none happens during the test however slow the machine: the counts
    # are the bursts exactly (the refill itself is tested on a fake clock above).
    running = make_server(rate_limit_per_second=BURST_TEST_RATE, rate_limit_burst=20)
    one = _burst(running, [None] * 50)  # one client: told apart by its address
    two = _burst(running, ["a", "b"] * 25)  # two clients: told apart by x-client-id
    record_property("burst_50_one_client", one)
    record_property("burst_50_two_clients", two)
    assert one == {"OK": 20, "RESOURCE_EXHAUSTED": 30}
    assert two == {"OK": 40, "RESOURCE_EXHAUSTED": 10}


def test_health_and_reflection_are_exempt_from_rate_limits(make_server: ServerMaker) -> None:
    running = make_server(rate_limit_per_second=0.01, rate_limit_burst=1)
    running.stub.GetModelInfo(chat_pb2.GetModelInfoRequest())
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.GetModelInfo(chat_pb2.GetModelInfoRequest())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    health = health_pb2_grpc.HealthStub(running.channel)
    for _ in range(5):
        health.Check(health_pb2.HealthCheckRequest())
    assert (
        "qwen.chat.v1.ChatService"
        in ProtoReflectionDescriptorDatabase(running.channel).get_services()
    )


def test_token_buckets_refill_at_the_rate_and_forget_idle_clients() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] = 0.25
    assert buckets.take("a") == pytest.approx(0.25)
    now[0] = 0.5
    assert buckets.take("a") == 0.0
    for index in range(3000):  # many one-off clients: refilled buckets are swept away
        now[0] += 10.0
        buckets.take(f"client-{index}")
    assert len(buckets) <= 1025


def test_concurrent_generations_are_capped_and_slots_come_back(make_server: ServerMaker) -> None:
    # The cap is batch + queue = 2 here; the borrowed engine itself has room for many more.
    running = make_server(max_batch_size=1, max_queue=1)
    streams = [running.stub.StreamChat(stream()) for _ in range(2)]
    for call in streams:
        next(call)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Chat(chat())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(caught.value) == 1.0
    assert running.stub.CountTokens(chat_pb2.CountTokensRequest(messages=MESSAGES)).prompt_tokens
    streams[0].cancel()  # an abandoned stream gives its slot back
    deadline = time.monotonic() + 2.0
    while True:
        try:
            running.stub.Chat(chat())
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled stream's slot never came back"
            time.sleep(0.02)
    streams[1].cancel()


def test_with_the_default_limits_a_full_queue_is_what_refuses_a_call(
    make_server: ServerMaker,
) -> None:
    running = make_server()
    settings = running.server.settings
    engine = engine_of(running)
    calls: list[Any] = []
    with StepGate(engine) as gate:
        gate.hold()
        try:
            calls.append(running.stub.StreamChat(stream(), timeout=60))
            assert gate.held.wait(30), "the first stream never started decoding"
            # Two clients, as one alone may queue only max_queue_per_client; and deadlines so
            # long that the queue's estimated wait never refuses one.
            calls.extend(
                running.stub.StreamChat(stream(), metadata=client(f"c{i % 2}"), timeout=300)
                for i in range(settings.max_queue)
            )
            assert gate.wait_for(lambda: engine.queued_requests == settings.max_queue), (
                f"only {engine.queued_requests} of {settings.max_queue} calls reached the queue"
            )
            with pytest.raises(grpc.RpcError) as caught:
                next(running.stub.StreamChat(stream(), timeout=60))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in caught.value.details()  # type: ignore[attr-defined]
            assert retry_delay(caught.value) is not None
            # Health checks still find a handler thread (this borrowed-model server never
            # reports SERVING itself; that it answers is the point).
            health_pb2_grpc.HealthStub(running.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        finally:
            for call in calls:
                call.cancel()
        gate.release()
        assert gate.steps_until_idle() <= 1


# -- fair, deadline-aware admission ----------------------------------------------------------


def client(name: str) -> list[tuple[str, str]]:
    return [("x-client-id", name)]


@pytest.fixture(scope="module")
def one_slot(tiny_settings: Settings) -> Iterator[RunningServer]:
    """A server whose engine decodes one sequence at a time: everyone else queues."""
    running = RunningServer(
        replace(tiny_settings, max_batch_size=1, max_queue=4, max_queue_per_client=2)
    )
    running.server.load()
    yield running
    running.close()


def test_a_client_past_its_queue_bound_is_refused_while_another_is_accepted(
    one_slot: RunningServer,
) -> None:
    engine = engine_of(one_slot)
    calls: list[Any] = []
    with StepGate(engine) as gate:
        gate.hold()
        try:
            calls.append(one_slot.stub.StreamChat(stream(), metadata=client("heavy"), timeout=60))
            assert gate.held.wait(30), "the first stream never started decoding"
            calls.extend(
                one_slot.stub.StreamChat(stream(), metadata=client("heavy"), timeout=60)
                for _ in range(2)
            )
            assert gate.wait_for(lambda: engine.queued_requests == 2)
            with pytest.raises(grpc.RpcError) as caught:
                next(one_slot.stub.StreamChat(stream(), metadata=client("heavy"), timeout=10))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            light = one_slot.stub.StreamChat(stream(), metadata=client("light"), timeout=10)
            calls.append(light)
            # Accepted: it waits behind the heavy client's first queued request only.
            assert dict(light.initial_metadata()).get("x-queue-position") == "2"
        finally:
            for call in calls:
                call.cancel()
        gate.release()
        assert gate.steps_until_idle() <= 1
    details = caught.value.details()  # type: ignore[attr-defined]
    assert "this client's queue is full (2 waiting" in details
    assert retry_delay(caught.value) is not None


def test_a_queued_stream_gets_its_queue_position_in_the_headers_before_any_token(
    one_slot: RunningServer,
) -> None:
    at_once = one_slot.stub.StreamChat(stream(4), timeout=30)
    at_once_headers = dict(at_once.initial_metadata())
    assert list(at_once)[-1].WhichOneof("event") == "final"
    engine = engine_of(one_slot)
    with StepGate(engine) as gate:
        gate.hold()
        first = one_slot.stub.StreamChat(stream(), timeout=60)
        assert gate.held.wait(30), "the first stream never started decoding"
        queued = one_slot.stub.StreamChat(stream(4), timeout=10)
        # Generation is frozen: these headers can only have been sent when the call queued.
        queued_headers = dict(queued.initial_metadata())
        first.cancel()
        gate.release()
        events = list(queued)
    assert "x-request-id" in at_once_headers
    assert "x-queue-position" not in at_once_headers
    assert queued_headers["x-queue-position"] == "1"
    assert queued_headers["x-request-id"] == dict(queued.trailing_metadata())["x-request-id"]
    assert events[-1].WhichOneof("event") == "final"


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once_naming_the_estimate(
    server_factory: Any,
) -> None:
    running: RunningServer = server_factory(max_batch_size=1, warmup=False)
    running.server.load()
    engine = engine_of(running)
    # What the estimate learns from: 400 decode steps and one 400-token answer.
    assert running.stub.Chat(chat(400), timeout=120).usage.completion_tokens == 400
    heavy = client("heavy")
    ahead: list[Any] = []
    with StepGate(engine) as gate:
        gate.hold()
        try:
            ahead.append(running.stub.StreamChat(stream(400), metadata=heavy, timeout=600))
            assert gate.held.wait(30), "the first stream never started decoding"
            # About 13 x 400 decode steps ahead: seconds even on a fast machine.
            ahead.extend(
                running.stub.StreamChat(stream(400), metadata=heavy, timeout=600) for _ in range(12)
            )
            assert gate.wait_for(lambda: engine.queued_requests == 12)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                running.stub.Chat(chat(4), metadata=heavy, timeout=2.0)
            # Refused on arrival, not failed once the 2 s had passed.
            assert time.monotonic() - started < 0.5
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            generous = running.stub.StreamChat(stream(4), metadata=heavy, timeout=600)
            position = dict(generous.initial_metadata()).get("x-queue-position")
        finally:
            for call in ahead:
                call.cancel()
        gate.release()
        events = list(generous)
    details = caught.value.details()  # type: ignore[attr-defined]
    assert "the first token is estimated in" in details
    assert "(1 running, 12 queued ahead), after the deadline in" in details
    assert position == "13"
    assert events[-1].WhichOneof("event") == "final"


# -- deadlines -------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["Chat", "StreamChat"])
def test_too_little_time_left_is_refused_before_queuing(
    make_server: ServerMaker, streaming: bool
) -> None:
    running = make_server(min_deadline_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(running.stub.StreamChat(stream(), timeout=0.6))
        else:
            running.stub.Chat(chat(), timeout=0.6)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "at least 1 s" in caught.value.details()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 0.5  # refused by the server, not timed out by the client
    assert engine_of(running).queued_requests == 0


def _stream_until_error(
    call: Any,
) -> tuple[int, grpc.RpcError]:
    deltas = 0
    try:
        for event in call:
            deltas += event.WhichOneof("event") == "delta"
    except grpc.RpcError as error:
        return deltas, error
    raise AssertionError("the stream completed instead of running out of time")


DEADLINE_SECONDS = 0.6


@pytest.mark.parametrize(
    ("settings", "timeout"),
    [
        ({"default_deadline_seconds": DEADLINE_SECONDS}, None),
        ({"max_deadline_seconds": DEADLINE_SECONDS}, 60.0),
        ({}, DEADLINE_SECONDS),
    ],
    ids=["server-default", "server-maximum", "client-deadline"],
)
def test_a_deadline_passing_during_generation_stops_it_within_a_step(
    make_server: ServerMaker, settings: dict[str, float], timeout: float | None
) -> None:
    running = make_server(**settings)
    with StepGate(engine_of(running)) as gate:
        gate.hold()
        call = running.stub.StreamChat(stream(500), timeout=timeout)
        assert gate.held.wait(30), "the stream never started decoding"
        # Generation is frozen mid-reply while the deadline passes. The call arrived before
        # the step was held, so its deadline is over DEADLINE_SECONDS after that at the latest.
        time.sleep(DEADLINE_SECONDS + 0.1)
        gate.release()
        steps = gate.steps_until_idle()
    deltas, error = _stream_until_error(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deltas < 500
    # The step that was running when the deadline passed is the sequence's last.
    assert steps == 0


# -- sizes -----------------------------------------------------------------------------------


def test_oversized_request_message_is_refused(make_server: ServerMaker) -> None:
    running = make_server(max_receive_message_bytes=2048)
    big = chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="x" * 4096)]
    )
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Chat(big)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_many_messages_is_invalid_argument(tiny_server: RunningServer) -> None:
    messages = [chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi")] * 129
    with pytest.raises(grpc.RpcError) as caught:
        tiny_server.stub.CountTokens(chat_pb2.CountTokensRequest(messages=messages))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_max_prompt_tokens_leaves_room_for_a_default_answer(
    tiny_server: RunningServer, tiny_settings: Settings
) -> None:
    info = tiny_server.stub.GetModelInfo(chat_pb2.GetModelInfoRequest())
    assert info.limits.max_prompt_tokens == 2048 - 32  # context window minus default answer
    assert _max_prompt_tokens(Settings(kv_cache_tokens=1000), 32768, 1024, None) == 1000 - 256
    assert _max_prompt_tokens(Settings(max_prompt_tokens=500), 2048, 512, None) == 500
    assert _max_prompt_tokens(Settings(max_prompt_tokens=9999), 2048, 512, None) == 2047


def test_default_prompt_limit_is_what_this_host_prefills_in_a_quarter_of_the_watchdog() -> None:
    slow_host = 0.01  # seconds per prompt token, as measured at warm-up
    settings = Settings(watchdog_stall_seconds=60.0)
    assert _max_prompt_tokens(settings, 32768, 1024, slow_host) == 1500
    assert _max_prompt_tokens(settings, 32768, 1024, 1e-6) == 16384 - 256
    assert _max_prompt_tokens(Settings(max_prompt_tokens=9000), 32768, 1024, slow_host) == 9000


# -- keepalive -------------------------------------------------------------------------------


def _connectivity_after_pinging(running: RunningServer, seconds: float) -> list[str]:
    """A client that pings every 100 ms of idleness; returns the states its channel went through."""
    channel = grpc.insecure_channel(
        running.server.address,
        options=[
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_sent_ping_interval_without_data_ms", 100),
        ],
    )
    states: list[str] = []
    channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    time.sleep(seconds)
    channel.close()
    return states


def test_keepalive_enforcement_sends_ping_flooders_away(make_server: ServerMaker) -> None:
    strict = make_server(keepalive_min_ping_interval_seconds=10.0, keepalive_max_ping_strikes=1)
    lenient = make_server(keepalive_min_ping_interval_seconds=0.05)
    results: dict[str, list[str]] = {}
    threads = [
        threading.Thread(
            target=lambda name=name, running=running: results.__setitem__(
                name, _connectivity_after_pinging(running, 3.0)
            )
        )
        for name, running in (("strict", strict), ("lenient", lenient))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # GOAWAY too_many_pings drops the strict server's connection; the lenient one stays READY.
    assert results["strict"][-1] != "READY"
    assert results["lenient"][-1] == "READY"


def test_a_connection_past_its_age_lets_its_calls_finish_when_deadlines_have_no_maximum(
    make_server: ServerMaker,
) -> None:
    running = make_server(max_connection_age_seconds=0.3, max_deadline_seconds=0.0)
    channel = grpc.insecure_channel(running.server.address)
    states: list[grpc.ChannelConnectivity] = []
    aged = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state != grpc.ChannelConnectivity.READY:
            aged.set()  # the server's GOAWAY: the connection reached its age

    channel.subscribe(on_state, try_to_connect=True)
    try:
        with StepGate(engine_of(running)) as gate:
            gate.hold()
            call = chat_pb2_grpc.ChatServiceStub(channel).StreamChat(stream(40), timeout=60)
            assert gate.held.wait(30), "the stream never started decoding"
            assert aged.wait(30), "the connection never reached its maximum age"
            gate.release()
            events = list(call)
    finally:
        channel.close()
    assert events[-1].WhichOneof("event") == "final"


# -- cancellation ----------------------------------------------------------------------------


def test_cancelling_20_streams_frees_the_engine_within_a_step(server_factory: Any) -> None:
    running: RunningServer = server_factory(max_batch_size=24)
    running.server.load()
    engine = engine_of(running)

    def cancelled_calls() -> float:
        return (
            running.server.metrics.registry.get_sample_value(
                "qwen_grpc_calls_total",
                {"method": "/qwen.chat.v1.ChatService/StreamChat", "code": "CANCELLED"},
            )
            or 0.0
        )

    with StepGate(engine) as gate:
        streams = [running.stub.StreamChat(stream(500)) for _ in range(20)]
        for call in streams:
            assert next(call).WhichOneof("event") == "delta"
        # A joiner's first delta is sent during its prefill, a moment before it joins the batch.
        assert gate.wait_for(lambda: engine.active_sequences == 20)
        gate.hold()
        assert gate.held.wait(30)
        for call in streams:
            call.cancel()
        # The server has seen every cancellation once the access log has counted it.
        assert gate.wait_for(lambda: cancelled_calls() == 20)
        gate.release()
        # The held step finishes and drops them all; a cancellation whose callback was still
        # running when the step ended may take one step more. Without cancellation: ~480 more.
        assert gate.steps_until_idle() <= 1
