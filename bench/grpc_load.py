"""Load generator: concurrent ``StreamChat`` calls over one channel, timed on the client.

Each of ``concurrency`` workers sends its own prompt, waits for the whole stream, and sends the
next (a closed loop), so the server always has ``concurrency`` calls in flight. Raw generated
stubs are used rather than the client library, so the numbers measure the service and nothing
that a client library may add or change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from bench.prompts import BenchPrompt
from bench.stats import StreamTiming
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc

_LOGGER = logging.getLogger(__name__)
_FINISH_NAMES = {
    value: name.removeprefix("FINISH_REASON_").lower()
    for name, value in chat_pb2.FinishReason.items()
}


@dataclass
class LevelResult:
    """Every timed stream of one concurrency level, and the calls that failed."""

    concurrency: int
    timings: list[StreamTiming] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _request(prompt: BenchPrompt, max_new_tokens: int) -> chat_pb2.StreamChatRequest:
    return chat_pb2.StreamChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=prompt.text)],
        options=chat_pb2.GenerationOptions(max_new_tokens=max_new_tokens, greedy=True),
    )


def stream_once(
    stub: chat_pb2_grpc.ChatServiceStub,
    prompt: BenchPrompt,
    max_new_tokens: int,
    timeout_s: float,
) -> StreamTiming:
    """One streamed generation; the first token is the first delta, the last is the final.

    The final message is sent in the engine step that produced the last token, so its arrival
    is the last token's time even when that token decodes to no text of its own.
    """
    request = _request(prompt, max_new_tokens)
    start = time.perf_counter()
    first: float | None = None
    for reply in stub.StreamChat(request, timeout=timeout_s):
        now = time.perf_counter()
        if reply.HasField("final"):
            usage = reply.final.usage
            return StreamTiming(
                start=start,
                first_token=now if first is None else first,
                last_token=now,
                completion_tokens=usage.completion_tokens,
                finish_reason=_FINISH_NAMES.get(reply.final.finish_reason, "unspecified"),
            )
        if first is None and reply.delta:
            first = now
    raise RuntimeError("the stream ended without a final message")


def run_level(
    address: str,
    prompts: Sequence[BenchPrompt],
    concurrency: int,
    requests_per_worker: int,
    max_new_tokens: int,
    timeout_s: float,
) -> LevelResult:
    """Runs ``concurrency`` closed-loop workers, worker ``i`` always sending ``prompts[i]``."""
    result = LevelResult(concurrency)
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency)
    with grpc.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)

        def worker(index: int) -> None:
            prompt = prompts[index % len(prompts)]
            barrier.wait()
            for _ in range(requests_per_worker):
                try:
                    timing = stream_once(stub, prompt, max_new_tokens, timeout_s)
                except ValueError:  # the channel closed under us: the bench is exiting
                    return
                except (grpc.RpcError, RuntimeError) as exc:
                    detail = (
                        f"{exc.code().name}: {exc.details()}"
                        if isinstance(exc, grpc.RpcError)
                        else str(exc)
                    )
                    _LOGGER.warning("stream failed at concurrency %d: %s", concurrency, detail)
                    with lock:
                        result.errors.append(detail)
                    continue
                with lock:
                    result.timings.append(timing)

        threads = [
            threading.Thread(target=worker, args=(i,), name=f"bench-worker-{i}")
            for i in range(concurrency)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result.wall_s = time.perf_counter() - started
    return result


def warm_up(address: str, prompt: BenchPrompt, timeout_s: float) -> None:
    """One short call so connection setup and first-call costs stay out of the numbers."""
    with grpc.insecure_channel(address) as channel:
        stream_once(chat_pb2_grpc.ChatServiceStub(channel), prompt, 8, timeout_s)


def model_info(address: str) -> chat_pb2.GetModelInfoResponse:
    """What the server says it runs (its dtype in particular)."""
    with grpc.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        return stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=30)
