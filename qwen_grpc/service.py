"""The ChatService servicer: translates between proto and the engine, and nothing else.

Handlers never touch the model. They validate, submit a request to the engine and relay its
events; every failure becomes a status through :mod:`qwen_grpc.status`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from qwen_grpc import status
from qwen_grpc.engine.errors import UnavailableError
from qwen_grpc.engine.scheduler import Engine, RequestHandle
from qwen_grpc.engine.types import Completed, FinishReason, GenerationRequest, SamplingParams, Usage
from qwen_grpc.interceptors.base import CallContext
from qwen_grpc.metadata import QUEUE_POSITION_KEY, REQUEST_ID_KEY
from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc
from qwen_grpc.validation import (
    RequestLimits,
    check_prompt_length,
    to_messages,
    to_sampling_params,
)

_LOGGER = logging.getLogger(__name__)

_FINISH_REASONS = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: chat_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CONTEXT_LENGTH: chat_pb2.FINISH_REASON_CONTEXT_LENGTH,
}


@dataclass(frozen=True)
class ModelRuntime:
    """Everything the servicer needs once the model is loaded."""

    engine: Engine
    limits: RequestLimits
    defaults: SamplingParams
    model_id: str
    revision: str


def request_id_of(context: grpc.ServicerContext) -> str:
    """The caller's ``x-request-id``, or a fresh one, so logs and errors can be correlated."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            return value[:128]
    return uuid.uuid4().hex


def _usage(usage: Usage) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _options(params: SamplingParams) -> chat_pb2.GenerationOptions:
    return chat_pb2.GenerationOptions(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        greedy=params.greedy,
    )


def _send_queue_position(context: grpc.ServicerContext, position: int) -> None:
    """Tells a queued stream where it waits, before its first token.

    Headers commit the call (gRFC A6): no retry policy applies to it afterwards. That is fine
    once the engine has accepted the request: the refusals worth retrying (UNAVAILABLE while
    the model loads or the server drains) come before this point, and a stream that fails
    later is not retried anyway, as it may have sent text (the Python client retries unary
    calls only).
    """
    try:
        context.send_initial_metadata(((QUEUE_POSITION_KEY, str(position)),))
    except grpc.RpcError:  # the client left; its cancellation callback ends the request
        return


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """Serves ``qwen.chat.v1.ChatService`` on top of an :class:`Engine`."""

    def __init__(self) -> None:
        self._runtime: ModelRuntime | None = None

    def attach(self, runtime: ModelRuntime) -> None:
        """Called once the model is loaded; until then every call is UNAVAILABLE."""
        self._runtime = runtime

    @property
    def runtime(self) -> ModelRuntime:
        if self._runtime is None:
            raise UnavailableError("the model is still loading; retry shortly")
        return self._runtime

    def _start(
        self,
        request: chat_pb2.ChatRequest | chat_pb2.StreamChatRequest,
        context: grpc.ServicerContext,
        request_id: str,
    ) -> RequestHandle:
        runtime = self.runtime
        messages = to_messages(request.messages, runtime.limits)
        params = to_sampling_params(request.options, runtime.defaults, runtime.limits)
        prompt_ids = runtime.engine.tokenizer.encode_chat(messages)
        check_prompt_length(len(prompt_ids), runtime.limits)
        remaining = context.time_remaining()
        call = CallContext.of(context)
        handle = runtime.engine.submit(
            GenerationRequest(
                request_id=request_id,
                prompt_ids=tuple(prompt_ids),
                params=params,
                deadline=None if remaining is None else time.monotonic() + remaining,
                client=call.client,
            )
        )
        call.timings = handle.timings
        if not context.add_callback(handle.cancel):
            # The call ended between submit and here: no callback will ever cancel it, and
            # the engine would generate for nobody until the deadline.
            handle.cancel()
        return handle

    def Chat(
        self, request: chat_pb2.ChatRequest, context: grpc.ServicerContext
    ) -> chat_pb2.ChatResponse:
        request_id = request_id_of(context)
        try:
            parts: list[str] = []
            for event in self._start(request, context, request_id):
                if isinstance(event, Completed):
                    return chat_pb2.ChatResponse(
                        message=chat_pb2.Message(
                            role=chat_pb2.ROLE_ASSISTANT, content="".join(parts)
                        ),
                        finish_reason=_FINISH_REASONS[event.finish_reason],
                        usage=_usage(event.usage),
                    )
                parts.append(event.text)
            raise RuntimeError("the engine ended a stream without completing it")
        except Exception as exc:
            context.abort_with_status(status.from_exception(exc, request_id))
            raise  # unreachable: abort_with_status raises

    def StreamChat(
        self, request: chat_pb2.StreamChatRequest, context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.StreamChatResponse]:
        request_id = request_id_of(context)
        try:
            handle = self._start(request, context, request_id)
            if handle.queue_position is not None:
                _send_queue_position(context, handle.queue_position)
            for event in handle:
                if isinstance(event, Completed):
                    yield chat_pb2.StreamChatResponse(
                        final=chat_pb2.StreamChatFinal(
                            finish_reason=_FINISH_REASONS[event.finish_reason],
                            usage=_usage(event.usage),
                        )
                    )
                else:
                    yield chat_pb2.StreamChatResponse(delta=event.text)
        except Exception as exc:
            context.abort_with_status(status.from_exception(exc, request_id))

    def CountTokens(
        self, request: chat_pb2.CountTokensRequest, context: grpc.ServicerContext
    ) -> chat_pb2.CountTokensResponse:
        request_id = request_id_of(context)
        try:
            runtime = self.runtime
            messages = to_messages(request.messages, runtime.limits)
            prompt_ids = runtime.engine.tokenizer.encode_chat(messages)
            return chat_pb2.CountTokensResponse(
                prompt_tokens=len(prompt_ids),
                context_length=runtime.engine.model.context_length,
            )
        except Exception as exc:
            context.abort_with_status(status.from_exception(exc, request_id))
            raise

    def GetModelInfo(
        self, request: chat_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> chat_pb2.GetModelInfoResponse:
        try:
            runtime = self.runtime
        except UnavailableError as exc:
            context.abort_with_status(status.from_exception(exc, request_id_of(context)))
            raise
        limits = runtime.limits
        return chat_pb2.GetModelInfoResponse(
            model_id=runtime.model_id,
            revision=runtime.revision,
            dtype=runtime.engine.model.dtype,
            context_length=runtime.engine.model.context_length,
            limits=chat_pb2.ModelLimits(
                max_new_tokens=limits.max_new_tokens,
                max_prompt_tokens=limits.max_prompt_tokens,
                max_messages=limits.max_messages,
                max_stop_sequences=limits.max_stop_sequences,
            ),
            defaults=_options(runtime.defaults),
        )
