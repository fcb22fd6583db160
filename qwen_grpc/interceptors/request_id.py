"""The request id goes back to the caller without committing the call.

Each call's id (the caller's ``x-request-id``, else a fresh one; see :class:`CallContext`) is
sent in the response headers together with the first response message, and in the trailers of
every call, failed ones included. Never earlier: under gRPC's retry design (gRFC A6) response
headers commit a call, and a committed call is not retried, so headers sent before the handler
ran would turn every UNAVAILABLE answer (model loading, engine stuck) into a final failure.
A refusal therefore carries the id only in its trailers, where ``grpcurl -v`` shows it as well.
The one exception is the servicer's: a stream that has to queue gets its headers (its
``x-queue-position`` and the id) once the engine has accepted it, when no refusal is left to retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from qwen_grpc.interceptors.base import REQUEST_ID_KEY, Behavior, CallContext, CallInfo, Interceptor


def _send_headers(context: CallContext) -> None:
    """Headers with the id, unless the servicer sent them already (a queued stream's position,
    see :mod:`qwen_grpc.service`) or the call failed (then trailers alone carry the id)."""
    if context.headers_sent or context.code() not in (None, grpc.StatusCode.OK):
        return
    try:
        context.send_initial_metadata(())
    except grpc.RpcError:  # the client went away in the meantime: nobody is left to tell
        return


def _add_trailer(context: CallContext) -> None:
    """Adds the id to the trailers, keeping what is there (``abort_with_status`` sets details)."""
    trailers = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata((*trailers, (REQUEST_ID_KEY, context.request_id)))


class RequestIdInterceptor(Interceptor):
    """Echoes the request id in the headers of the first message and in the trailers."""

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        try:
            response = method(request, context)
        except BaseException:
            _add_trailer(context)
            raise
        if call.response_streaming:
            return _echoed(response, context)
        _send_headers(context)
        _add_trailer(context)
        return response


def _echoed(responses: Iterator[Any], context: CallContext) -> Iterator[Any]:
    first = True
    try:
        for response in responses:
            if first:
                _send_headers(context)
                first = False
            yield response
    finally:
        _add_trailer(context)
