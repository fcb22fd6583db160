"""A typed Python client for ``qwen.chat.v1.ChatService``.

Callers get plain Python values (:class:`ChatResult`, :class:`TextDelta`, :class:`StreamFinal`)
instead of protobuf, while the channel is configured the way the service is deployed: DNS
targets balanced per call with ``round_robin`` (a headless Kubernetes Service behind
``dns:///host:port``), unary calls retried when the server refused them with UNAVAILABLE, and a
deadline on every call so nothing waits forever.

Errors are not wrapped: every failed call raises :class:`grpc.RpcError` (which is also a
:class:`grpc.Call`, so ``code()`` and ``details()`` work), because callers already know how to
handle it and the status code is the contract. :func:`error_details` reads the ``google.rpc``
details the server attaches (field violations, retry delay, request id).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypedDict, Unpack

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc

_LOGGER = logging.getLogger(__name__)

DEFAULT_TARGET = "127.0.0.1:50051"
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"
REQUEST_ID_KEY = "x-request-id"

# Unary calls refused with UNAVAILABLE never reached the model (not loaded yet, draining,
# connection lost before the call started), so retrying them cannot double the work the caller
# asked for. StreamChat is left out: a retry after the first delta would repeat text.
_RETRIED_METHODS = (
    (CHAT_SERVICE, "Chat"),
    (CHAT_SERVICE, "CountTokens"),
    (CHAT_SERVICE, "GetModelInfo"),
    (HEALTH_SERVICE, "Check"),
)
SERVICE_CONFIG: dict[str, object] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    # round_robin skips a backend whose health turns NOT_SERVING (draining) before it closes.
    "healthCheckConfig": {"serviceName": "qwen.chat.v1.ChatService"},
    "methodConfig": [
        {
            "name": [
                {"service": service, "method": method} for service, method in _RETRIED_METHODS
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    # Retries stop when most calls fail, so a struggling fleet is not hit by a retry storm.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

_ROLES: dict[str, chat_pb2.Role] = {
    "system": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "role_system": chat_pb2.ROLE_SYSTEM,
    "role_user": chat_pb2.ROLE_USER,
    "role_assistant": chat_pb2.ROLE_ASSISTANT,
}

MessageLike = tuple[str, str] | chat_pb2.Message
"""A turn: ``(role, content)`` with role ``system``/``user``/``assistant``, or a proto Message."""


class GenerationKwargs(TypedDict, total=False):
    """Keyword options of :meth:`ChatClient.chat`; each maps to a ``GenerationOptions`` field.

    Unset options take the model's defaults (see ``model_info().defaults``).
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: Sequence[str]
    greedy: bool


@dataclass(frozen=True)
class Usage:
    """Token accounting of one call."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_proto(cls, usage: chat_pb2.Usage) -> Usage:
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


@dataclass(frozen=True)
class ChatResult:
    """The whole reply of :meth:`ChatClient.chat`.

    ``finish_reason`` is the proto enum name (``FINISH_REASON_STOP``, ``FINISH_REASON_LENGTH``,
    ...): the same spelling grpcurl and the contract use.
    """

    text: str
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class TextDelta:
    """The next piece of a streamed reply: whole characters, in order."""

    text: str


@dataclass(frozen=True)
class StreamFinal:
    """The last event of a stream: why generation ended and what it cost."""

    finish_reason: str
    usage: Usage


StreamEvent = TextDelta | StreamFinal
"""What :meth:`ChatClient.stream_chat` yields: deltas, then exactly one :class:`StreamFinal`."""


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, as named by the server's ``google.rpc.BadRequest``."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call tells its caller, beyond the status code (AIP-193)."""

    code: grpc.StatusCode
    message: str
    field_violations: tuple[FieldViolation, ...] = ()
    retry_delay: float | None = None
    """Seconds to wait before retrying (``google.rpc.RetryInfo``), if the server said."""
    reason: str | None = None
    """``google.rpc.ErrorInfo.reason``, if any."""
    request_id: str | None = None
    """The id to quote in a bug report: ``ErrorInfo.metadata["request_id"]``, else the
    call's ``x-request-id`` trailer."""


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Extracts the status code and ``google.rpc`` details from a failed call.

    Works for errors raised by unary calls and by iterating a stream (both are
    :class:`grpc.Call`). Details the server did not send stay empty; details the client cannot
    parse are logged and skipped, so this helper never raises while handling an error.
    """
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code: grpc.StatusCode = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    message: str = (details_of() if callable(details_of) else None) or ""
    violations: list[FieldViolation] = []
    retry_delay: float | None = None
    reason: str | None = None
    request_id: str | None = None
    try:
        status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    except ValueError as exc:  # trailers disagree with the status: keep what we know
        _LOGGER.warning("ignoring malformed status details: %s", exc)
        status = None
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            packed.Unpack(retry_info)
            retry_delay = retry_info.retry_delay.ToNanoseconds() / 1e9
        elif packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason = info.reason or None
            request_id = info.metadata.get("request_id") or None
        else:
            _LOGGER.debug("skipping unknown error detail %s", packed.type_url)
    if request_id is None:
        request_id = _trailer(error, REQUEST_ID_KEY)
    return ErrorDetails(
        code=code,
        message=message,
        field_violations=tuple(violations),
        retry_delay=retry_delay,
        reason=reason,
        request_id=request_id,
    )


def _trailer(error: grpc.RpcError, key: str) -> str | None:
    """The first string value of trailing metadata ``key``, if the error carries any."""
    trailing_of = getattr(error, "trailing_metadata", None)
    for entry_key, value in (trailing_of() if callable(trailing_of) else None) or ():
        if entry_key == key and isinstance(value, str):
            return value
    return None


def to_message(turn: MessageLike) -> chat_pb2.Message:
    """One turn as a proto Message; role names are case-insensitive.

    Raises:
        ValueError: for a role name the contract does not know (a caller bug, caught before
            the network round trip).
    """
    if isinstance(turn, chat_pb2.Message):
        return turn
    role, content = turn
    try:
        proto_role = _ROLES[role.lower()]
    except KeyError:
        raise ValueError(f"unknown role {role!r}; use system, user or assistant") from None
    return chat_pb2.Message(role=proto_role, content=content)


def to_messages(messages: Iterable[MessageLike]) -> list[chat_pb2.Message]:
    """A conversation as proto Messages. An empty one is sent as is: the server rejects it."""
    return [to_message(turn) for turn in messages]


def _finish_reason_name(value: chat_pb2.FinishReason) -> str:
    try:
        return str(chat_pb2.FinishReason.Name(value))
    except ValueError:  # a reason added to the contract after this client was built
        return f"FINISH_REASON_{value}"


def channel_options(service_config: dict[str, object] | None = None) -> list[tuple[str, object]]:
    """Channel arguments that turn on the service config (balancing and retries)."""
    config = SERVICE_CONFIG if service_config is None else service_config
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
    ]


class ChatClient:
    """A connection to a qwen-grpc server; use it as a context manager to close the channel.

    One client can be shared by many threads: gRPC channels are thread-safe and multiplex
    calls over one HTTP/2 connection per backend.

    Every call raises :class:`grpc.RpcError` on failure: ``INVALID_ARGUMENT`` for a bad request
    (see :func:`error_details` for the field), ``RESOURCE_EXHAUSTED`` when the server sheds load
    (with a retry delay), ``DEADLINE_EXCEEDED`` when ``timeout`` passed, ``UNAVAILABLE`` when
    no server answered, ``UNAUTHENTICATED`` for missing credentials.

    Args:
        target: ``host:port``, or any gRPC name such as ``dns:///qwen-grpc.ns.svc:50051``
            (every resolved address is used, round robin per call).
        timeout: default deadline in seconds for every call, including a whole stream.
        wait_for_ready: wait (up to the deadline) for the server to become reachable instead of
            failing at once with UNAVAILABLE; rides out restarts and rolling updates.
        credentials: TLS channel credentials; plaintext when ``None``.
        metadata: sent with every call, e.g. ``[("authorization", "Bearer ...")]``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 60.0,
        wait_for_ready: bool = True,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        options = channel_options()
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        _LOGGER.debug("channel to %s (timeout %.1f s)", target, timeout)

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for stubs of other services on the same server."""
        return self._channel

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call_kwargs(
        self, timeout: float | None, metadata: Sequence[tuple[str, str]]
    ) -> dict[str, object]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.metadata + tuple(metadata),
            "wait_for_ready": self.wait_for_ready,
        }

    def chat(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **options: Unpack[GenerationKwargs],
    ) -> ChatResult:
        """Generates the whole reply to a conversation.

        Args:
            messages: oldest first, usually ending with a user turn.
            timeout: deadline in seconds for this call instead of the client's default.
            metadata: extra metadata for this call (e.g. ``("x-request-id", ...)``).
            **options: generation options (``max_new_tokens``, ``temperature``, ``top_p``,
                ``top_k``, ``repetition_penalty``, ``seed``, ``stop``, ``greedy``).

        Raises:
            grpc.RpcError: the call failed; the code says why.
        """
        request = chat_pb2.ChatRequest(
            messages=to_messages(messages), options=chat_pb2.GenerationOptions(**options)
        )
        response = self._stub.Chat(request, **self._call_kwargs(timeout, metadata))
        return ChatResult(
            text=response.message.content,
            finish_reason=_finish_reason_name(response.finish_reason),
            usage=Usage.from_proto(response.usage),
        )

    def stream_chat(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **options: Unpack[GenerationKwargs],
    ) -> Generator[StreamEvent, None, None]:
        """Streams the reply as it is generated: text deltas, then one final event.

        Yields :class:`TextDelta` events, then exactly one :class:`StreamFinal`. The call
        starts at the first ``next()``. Stopping early (``break``, closing the generator,
        garbage collection) cancels the call, so the server stops generating within one decode
        step instead of computing for nobody. ``timeout`` bounds the whole stream.

        Raises:
            grpc.RpcError: while iterating, when the call fails (even after some deltas).
        """
        request = chat_pb2.StreamChatRequest(
            messages=to_messages(messages), options=chat_pb2.GenerationOptions(**options)
        )
        call = self._stub.StreamChat(request, **self._call_kwargs(timeout, metadata))
        try:
            for response in call:
                kind = response.WhichOneof("event")
                if kind == "delta":
                    yield TextDelta(response.delta)
                elif kind == "final":
                    yield StreamFinal(
                        finish_reason=_finish_reason_name(response.final.finish_reason),
                        usage=Usage.from_proto(response.final.usage),
                    )
                else:  # an event kind added to the contract later: skip, do not fail
                    _LOGGER.debug("skipping unknown stream event %s", kind)
        finally:
            call.cancel()  # no-op once the stream has ended

    def count_tokens(
        self,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Prompt tokens of a conversation after the chat template, to budget the context.

        Raises:
            grpc.RpcError: the call failed.
        """
        request = chat_pb2.CountTokensRequest(messages=to_messages(messages))
        response = self._stub.CountTokens(request, **self._call_kwargs(timeout, metadata))
        return int(response.prompt_tokens)

    def model_info(
        self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()
    ) -> chat_pb2.GetModelInfoResponse:
        """The served model: id, revision, dtype, context length, limits and defaults.

        Raises:
            grpc.RpcError: the call failed (UNAVAILABLE while the model loads).
        """
        return self._stub.GetModelInfo(  # type: ignore[no-any-return]
            chat_pb2.GetModelInfoRequest(), **self._call_kwargs(timeout, metadata)
        )

    def health(
        self,
        service: str = "",
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> str:
        """The serving status from ``grpc.health.v1``: ``SERVING``, ``NOT_SERVING``, ...

        ``""`` is the whole server; ``"qwen.chat.v1.ChatService"`` the chat service alone.

        Raises:
            grpc.RpcError: ``NOT_FOUND`` for a service the server does not know, or a
                transport failure.
        """
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), **self._call_kwargs(timeout, metadata)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
