"""Requests that are not valid protobuf get INVALID_ARGUMENT, not gRPC's INTERNAL.

grpcio answers a request its deserializer cannot parse (invalid UTF-8 in a string field, a
truncated message) with INTERNAL, which tells the caller the server broke. The deserializer is
wrapped so a parse failure becomes a marker, and the call is refused as the caller's mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from qwen_grpc import status
from qwen_grpc.interceptors.base import (
    CHAT_SERVICE_PREFIX,
    Behavior,
    CallContext,
    CallInfo,
    Interceptor,
    refuse,
)
from qwen_grpc.validation import FieldViolation


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    reason: str


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(payload: bytes) -> Any:
        try:
            return deserializer(payload)
        except (DecodeError, UnicodeDecodeError, ValueError) as error:
            return MalformedRequest(str(error) or type(error).__name__)

    return deserialize


class MalformedRequestInterceptor(Interceptor):
    """Refuses unparseable chat requests with INVALID_ARGUMENT and a BadRequest detail."""

    def applies_to(self, method: str) -> bool:
        return method.startswith(CHAT_SERVICE_PREFIX)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = super().intercept_service(continuation, handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or handler.request_deserializer is None or not self.applies_to(method):
            return handler
        return handler._replace(  # type: ignore[attr-defined, no-any-return]
            request_deserializer=_tolerant(handler.request_deserializer)
        )

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        if isinstance(request, MalformedRequest):
            refuse(
                context,
                status.bad_request(
                    [FieldViolation("request", f"not a valid protobuf message: {request.reason}")]
                ),
            )
        return method(request, context)
