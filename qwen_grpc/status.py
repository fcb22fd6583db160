"""The one mapping from failures to gRPC status codes with ``google.rpc`` details (AIP-193)."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from qwen_grpc.engine.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
)
from qwen_grpc.validation import FieldViolation, ValidationError

_LOGGER = logging.getLogger(__name__)
ERROR_DOMAIN = "qwen-grpc"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _status(code: grpc.StatusCode, message: str, *details: object) -> grpc.Status:
    proto = status_pb2.Status(
        code=code.value[0], message=message, details=[_pack(d) for d in details]
    )
    return rpc_status.to_status(proto)


def bad_request(violations: list[FieldViolation]) -> grpc.Status:
    """INVALID_ARGUMENT naming each field and why, as ``google.rpc.BadRequest``."""
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )
    message = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return _status(grpc.StatusCode.INVALID_ARGUMENT, message, detail)


def resource_exhausted(message: str, retry_after_seconds: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED with ``google.rpc.RetryInfo`` telling the caller when to retry."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_seconds * 1e9))
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, error_details_pb2.RetryInfo(retry_delay=delay)
    )


def unauthenticated(message: str, reason: str) -> grpc.Status:
    """UNAUTHENTICATED with ``google.rpc.ErrorInfo``: were credentials missing, or wrong?"""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    return _status(grpc.StatusCode.UNAUTHENTICATED, message, info)


def deadline_exceeded(message: str) -> grpc.Status:
    """DEADLINE_EXCEEDED; raised by the server when too little time is left to start."""
    return _status(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def internal(request_id: str) -> grpc.Status:
    """INTERNAL with the request id to quote in a bug report, never a traceback."""
    info = error_details_pb2.ErrorInfo(
        reason="GENERATION_FAILED", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
    )
    return _status(grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id}", info)


def from_exception(exc: BaseException, request_id: str) -> grpc.Status:
    """Maps any failure to the status a caller should see."""
    if isinstance(exc, ValidationError):
        return bad_request(exc.violations)
    if isinstance(exc, InvalidRequestError):
        return bad_request([FieldViolation(exc.field, exc.description)])
    if isinstance(exc, OverloadedError):
        return resource_exhausted(str(exc), exc.retry_after_seconds)
    if isinstance(exc, DeadlineExceededError):
        return _status(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, CancelledError):
        return _status(grpc.StatusCode.CANCELLED, str(exc))
    if isinstance(exc, UnavailableError):
        return _status(grpc.StatusCode.UNAVAILABLE, str(exc))
    if not isinstance(exc, EngineError):
        _LOGGER.error("unexpected error in request %s", request_id, exc_info=exc)
    return internal(request_id)
