"""What every interceptor shares: one ``intercept`` method, one context object per call.

gRPC's own ``ServerInterceptor`` hands out method handlers, not calls, so each interceptor
would otherwise repeat the unwrapping of four handler kinds. Here a subclass writes only
``intercept(method, request, context, call)`` (the grpc-interceptor library's shape). For
streaming responses ``method`` returns an iterator; an interceptor that must act when the
stream ends wraps that iterator (see :func:`on_stream_end`), so it sees the whole stream and
not just the creation of the generator.

Interceptors learn things the servicer and later interceptors need (the request id, the client's
identity, the effective deadline). They keep them on a :class:`CallContext`, a thin wrapper of the
servicer context that is created once per call and passed down the chain to the servicer.
"""

from __future__ import annotations

import abc
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import grpc

from qwen_grpc.engine.types import Timings
from qwen_grpc.metadata import CLIENT_ID_KEY, REQUEST_ID_KEY
from qwen_grpc.v1 import chat_pb2

MAX_REQUEST_ID_CHARS = 128
CHAT_SERVICE_PREFIX = f"/{chat_pb2.DESCRIPTOR.services_by_name['ChatService'].full_name}/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
GENERATION_METHODS = frozenset({CHAT_SERVICE_PREFIX + "Chat", CHAT_SERVICE_PREFIX + "StreamChat"})
# grpc reports "no deadline" as a remaining time of about 2**63 seconds.
_NO_DEADLINE_SECONDS = 1e9

Behavior = Callable[[Any, grpc.ServicerContext], Any]


class Metadatum(NamedTuple):
    """One metadata entry; unpacks as ``key, value`` and has ``.key``/``.value`` like grpc's."""

    key: str
    value: str | bytes


@dataclass(frozen=True)
class CallInfo:
    """The static facts of a call: which method, and which sides stream."""

    method: str
    request_streaming: bool
    response_streaming: bool


class CallContext:
    """The servicer context of one call, plus what the interceptors learned about the call.

    Every attribute not defined here is the real context's (``abort``, ``add_callback``, ...).
    Three methods are adjusted so the servicer needs no knowledge of the interceptors:
    ``invocation_metadata`` always carries the call's ``x-request-id`` (generated if the caller
    sent none, so the servicer's errors quote the same id the access log and the response
    metadata show), ``time_remaining`` honours the server's default and maximum deadline, and
    ``send_initial_metadata`` adds the ``x-request-id`` to headers the servicer sends itself.
    """

    def __init__(self, inner: grpc.ServicerContext) -> None:
        self._inner = inner
        self._request_id: str | None = None
        self.headers_sent = False
        """The response headers are gone (gRPC sends them once per call)."""
        self.identity: str | None = None
        """Authenticated client name, set by the auth interceptor."""
        self.deadline: float | None = None
        """Server-side deadline (``time.monotonic`` clock), set by the deadline interceptor."""
        self.timings: Timings | None = None
        """The generation's stage times, set by the servicer once the engine took the request."""

    @classmethod
    def of(cls, context: grpc.ServicerContext) -> CallContext:
        """The call's one :class:`CallContext`, wrapping the real context on first use."""
        return context if isinstance(context, CallContext) else cls(context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def metadata_value(self, key: str) -> str | None:
        """The first value the caller sent under ``key`` (lower case), if any."""
        for entry_key, value in self._inner.invocation_metadata() or ():
            if entry_key == key and isinstance(value, str):
                return value
        return None

    @property
    def request_id(self) -> str:
        """The caller's ``x-request-id`` (at most 128 characters), or a fresh one."""
        if self._request_id is None:
            sent = self.metadata_value(REQUEST_ID_KEY)
            self._request_id = sent[:MAX_REQUEST_ID_CHARS] if sent else uuid.uuid4().hex
        return self._request_id

    @property
    def client(self) -> str:
        """Who the call is from, for rate limits, fair queueing and logs, most trustworthy first.

        The authenticated identity; else the client certificate's identity (mutual TLS); else
        the self-declared ``x-client-id``; else the peer's address without its port, so a
        client that reconnects stays the same client. Prefixes keep the sources apart: an
        ``x-client-id`` can never pose as an authenticated name.
        """
        if self.identity is not None:
            return f"user:{self.identity}"
        certificate = self._inner.peer_identities()
        if certificate:
            return "cert:" + certificate[0].decode("utf-8", "replace")
        declared = self.metadata_value(CLIENT_ID_KEY)
        if declared:
            return "id:" + declared[:MAX_REQUEST_ID_CHARS]
        return "peer:" + peer_host(self._inner.peer())

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        entries = [
            Metadatum(key, value)
            for key, value in self._inner.invocation_metadata() or ()
            if key != REQUEST_ID_KEY
        ]
        entries.append(Metadatum(REQUEST_ID_KEY, self.request_id))
        return tuple(entries)

    def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str]]) -> None:
        """Sends the response headers now, with the call's ``x-request-id`` among them."""
        self.headers_sent = True
        self._inner.send_initial_metadata((*initial_metadata, (REQUEST_ID_KEY, self.request_id)))

    def time_remaining(self) -> float:
        remaining: float = self._inner.time_remaining()
        if self.deadline is None:
            return remaining
        return min(remaining, max(self.deadline - time.monotonic(), 0.0))

    def client_deadline_remaining(self) -> float | None:
        """Seconds left of the caller's own deadline, or ``None`` if it set none."""
        remaining: float = self._inner.time_remaining()
        return None if remaining > _NO_DEADLINE_SECONDS else remaining


grpc.ServicerContext.register(CallContext)


def refuse(context: grpc.ServicerContext, status: grpc.Status) -> NoReturn:
    """Ends the call with ``status``; typed ``NoReturn`` so checkers know control stops here."""
    context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:53124`` -> ``ipv4:10.0.0.7``; ``ipv6:[::1]:5000`` -> ``ipv6:[::1]``."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rpartition(':')[0]}"
    return peer


def once(action: Callable[[], None]) -> Callable[[], None]:
    """``action`` made safe to call from several places and threads: it runs the first time only."""
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        action()

    return run


def on_stream_end(
    responses: Iterator[Any], on_end: Callable[[BaseException | None], None]
) -> Iterator[Any]:
    """Relays ``responses`` and calls ``on_end`` once when the stream is over.

    ``on_end`` gets the exception that ended the stream, or ``None`` when it completed. A stream
    that the client abandons is closed by the garbage collector (``GeneratorExit``); callers who
    need to act promptly then should also register ``context.add_callback``.
    """
    try:
        yield from responses
    except BaseException as exc:
        on_end(exc)
        raise
    on_end(None)


def _behavior_and_factory(
    handler: grpc.RpcMethodHandler,
) -> tuple[Behavior, Callable[..., grpc.RpcMethodHandler]]:
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


class Interceptor(grpc.ServerInterceptor, abc.ABC):
    """A server interceptor with one job, written as a single :meth:`intercept` method."""

    def applies_to(self, method: str) -> bool:
        """Whether this interceptor sees calls to ``method`` (``/package.Service/Method``)."""
        return True

    @abc.abstractmethod
    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        """Runs one call; typically checks something, then ``return method(request, context)``.

        To refuse the call, :func:`refuse` it with a status from :mod:`qwen_grpc.status`. For streaming responses the
        return value is an iterator of responses.
        """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method_name: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not self.applies_to(method_name):
            return handler
        behavior, factory = _behavior_and_factory(handler)
        if getattr(behavior, "experimental_non_blocking", False):
            # Callback-style handlers (the health Watch) cannot be wrapped as a plain call.
            return handler
        call = CallInfo(method_name, handler.request_streaming, handler.response_streaming)

        def intercepted(request: Any, context: grpc.ServicerContext) -> Any:
            return self.intercept(behavior, request, CallContext.of(context), call)

        return factory(
            intercepted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
