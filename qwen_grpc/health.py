"""The standard ``grpc.health.v1`` service, whose open Watch streams a shutdown can end.

gRPC clients that check health client-side keep one Watch open on every connection. A Watch
never ends by itself, so a drain that waited for every call would wait the whole grace period
for them, and stopping the transport instead cuts them (the client sees UNAVAILABLE, "Cancelling
all calls"). :meth:`HealthService.end_watches` ends them the way a finished call ends: status
OK, right after the NOT_SERVING they have already been sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

SendResponse = Callable[[health_pb2.HealthCheckResponse | None], None]


class HealthService(health.HealthServicer):
    """grpc's health servicer (non-blocking Watch), plus a record of the Watch streams open."""

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)
        self._watches_lock = threading.Lock()
        self._watches: set[SendResponse] = set()

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: SendResponse | None = None,
    ) -> object:
        if send_response_callback is not None:
            send = send_response_callback
            with self._watches_lock:
                self._watches.add(send)
            context.add_callback(lambda: self._forget(send))
        return super().Watch(request, context, send_response_callback)

    def _forget(self, send: SendResponse) -> None:
        with self._watches_lock:
            self._watches.discard(send)

    def end_watches(self) -> int:
        """Ends every open Watch with status OK; returns how many there were."""
        with self._watches_lock:
            watches = list(self._watches)
            self._watches.clear()
        for send in watches:
            send(None)  # gRPC's non-blocking stream API: no more responses, status OK
        return len(watches)
