"""One client call, timed and classified: the unit every scenario counts.

Calls go through the generated stubs rather than :class:`qwen_client.ChatClient` on purpose:
the client retries UNAVAILABLE and waits for ready, which is right for callers and wrong for a
suite that must see every status the server sends exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc

CHAT = "Chat"
STREAM = "StreamChat"
INCOMPLETE = "INCOMPLETE"
"""Pseudo status: the call ended OK but the answer was not whole (no final, no finish reason)."""


@dataclass(frozen=True)
class CallOutcome:
    """How one call ended, as the client saw it."""

    method: str
    code: str
    """The status code name; ``OK`` only when the whole answer arrived, else :data:`INCOMPLETE`."""
    seconds: float
    ttft_seconds: float | None = None
    """Streams: from the call to the first text delta."""
    deltas: int = 0
    text: str = ""
    completion_tokens: int = 0
    message: str = ""
    """The status message of a failed call: what a refusal told the caller."""
    delta_times: tuple[float, ...] = ()
    """Streams: ``time.monotonic()`` at each text delta, for gaps between tokens."""

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def open_channel(address: str) -> grpc.Channel:
    """A channel with its own TCP connection, as a separate client process would have.

    gRPC shares connections between channels with equal arguments; a local subchannel pool
    keeps 32 simulated clients from multiplexing over one HTTP/2 connection.
    """
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def user_turn(text: str) -> list[chat_pb2.Message]:
    return [chat_pb2.Message(role=chat_pb2.ROLE_USER, content=text)]


def chat(
    stub: chat_pb2_grpc.ChatServiceStub,
    messages: Sequence[chat_pb2.Message],
    options: chat_pb2.GenerationOptions,
    *,
    timeout: float,
) -> CallOutcome:
    """A unary Chat call."""
    started = time.monotonic()
    try:
        reply = stub.Chat(chat_pb2.ChatRequest(messages=messages, options=options), timeout=timeout)
    except grpc.RpcError as error:
        return CallOutcome(
            CHAT, error.code().name, time.monotonic() - started, message=error.details() or ""
        )
    whole = reply.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED
    return CallOutcome(
        CHAT,
        "OK" if whole else INCOMPLETE,
        time.monotonic() - started,
        text=reply.message.content,
        completion_tokens=reply.usage.completion_tokens,
    )


def stream(
    stub: chat_pb2_grpc.ChatServiceStub,
    messages: Sequence[chat_pb2.Message],
    options: chat_pb2.GenerationOptions,
    *,
    timeout: float,
    cancel_after: int | None = None,
    first_delta: threading.Event | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> CallOutcome:
    """A StreamChat call: deltas then exactly one final, or a status.

    ``cancel_after`` cancels the call once that many deltas arrived (the client walks away
    mid-stream); ``first_delta`` is set when the first delta arrives (the call is in flight);
    ``metadata`` goes with the call (``x-client-id``, say, for per-client admission).
    """
    started = time.monotonic()
    ttft: float | None = None
    parts: list[str] = []
    times: list[float] = []
    final: chat_pb2.StreamChatFinal | None = None
    after_final = 0
    call = stub.StreamChat(
        chat_pb2.StreamChatRequest(messages=messages, options=options),
        timeout=timeout,
        metadata=tuple(metadata) or None,
    )

    def outcome(code: str, message: str = "") -> CallOutcome:
        return CallOutcome(
            STREAM,
            code,
            time.monotonic() - started,
            ttft_seconds=ttft,
            deltas=len(parts),
            text="".join(parts),
            completion_tokens=0 if final is None else final.usage.completion_tokens,
            message=message,
            delta_times=tuple(times),
        )

    try:
        for reply in call:
            if final is not None:
                after_final += 1
            elif reply.HasField("final"):
                final = reply.final
            else:
                if ttft is None:
                    ttft = time.monotonic() - started
                    if first_delta is not None:
                        first_delta.set()
                parts.append(reply.delta)
                times.append(time.monotonic())
                if cancel_after is not None and len(parts) >= cancel_after:
                    call.cancel()
                    return outcome("CANCELLED")
    except grpc.RpcError as error:
        return outcome(error.code().name, error.details() or "")
    whole = (
        final is not None
        and after_final == 0
        and final.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED
    )
    return outcome("OK" if whole else INCOMPLETE)
