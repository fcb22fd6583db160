"""The last line of the error model: no exception leaves the server as UNKNOWN.

The servicer maps the failures it expects through :mod:`qwen_grpc.status`. Anything else, a bug
in a handler or an interceptor, would reach the caller as UNKNOWN with the exception's text.
This interceptor turns it into INTERNAL quoting the request id (and logs the traceback here,
never sending it), also when the exception is raised halfway through a stream.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NoReturn

from qwen_grpc import status
from qwen_grpc.interceptors.base import Behavior, CallContext, CallInfo, Interceptor, refuse

_LOGGER = logging.getLogger(__name__)


class ErrorInterceptor(Interceptor):
    """Maps stray exceptions to INTERNAL with the request id; leaves aborted calls alone."""

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        try:
            responses = method(request, context)
        except Exception as exc:
            _abort_unless_aborted(exc, context)
        if call.response_streaming:
            return _guarded(responses, context)
        return responses


def _guarded(responses: Iterator[Any], context: CallContext) -> Iterator[Any]:
    try:
        yield from responses
    except Exception as exc:
        _abort_unless_aborted(exc, context)


def _abort_unless_aborted(exc: Exception, context: CallContext) -> NoReturn:
    """``context.abort`` raises a bare exception after setting the code: let that one through."""
    if context.code() is not None:
        raise exc
    refuse(context, status.from_exception(exc, context.request_id))
