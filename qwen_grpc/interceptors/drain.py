"""The drain: chat calls that arrive while the server shuts down are refused as UNAVAILABLE.

gRPC's own ``server.stop(grace)`` rejects new calls too, but most of those that race it end
CANCELLED (measured with grpcio: about 2 in 3), which a client's retry policy does not retry. So
the drain happens here first: from :meth:`Drain.close` on, new chat calls get UNAVAILABLE with a
message, which clients retry on another replica, and the server waits for the chat calls in
flight. Only then does it end the open health watches (with OK, see :mod:`qwen_grpc.health`) and
stop the transport, so idle streams never hold the shutdown for the whole grace period.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from qwen_grpc.engine.errors import UnavailableError
from qwen_grpc.interceptors.base import (
    CHAT_SERVICE_PREFIX,
    Behavior,
    CallContext,
    CallInfo,
    Interceptor,
)

DRAINING_MESSAGE = "the server is shutting down; retry, another replica will answer"


class Drain:
    """Counts the chat calls in flight and, once closed, admits no more."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_flight = 0
        self._closed = False

    def enter(self) -> bool:
        """Admits one call; ``False`` once the drain has begun."""
        with self._changed:
            if self._closed:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def close(self, timeout: float | None) -> bool:
        """Refuses new calls, then waits up to ``timeout`` seconds (``None``: no limit) for the
        calls in flight; ``True`` if they all ended."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            self._closed = True
            while self._in_flight > 0:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True


class DrainInterceptor(Interceptor):
    """Lets chat calls through the :class:`Drain` and refuses them once it is closed."""

    def __init__(self, drain: Drain) -> None:
        self._drain = drain

    def applies_to(self, method: str) -> bool:
        return method.startswith(CHAT_SERVICE_PREFIX)

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        if not self._drain.enter():
            raise UnavailableError(DRAINING_MESSAGE)
        # On termination, not at the end of the handler: by then the status has been sent, so
        # stopping the transport once every call has left cuts nobody's last message.
        if not context.add_callback(self._drain.leave):
            self._drain.leave()
        return method(request, context)
