"""Engine failures, one class per way a caller must be answered differently.

The servicer maps each class to one gRPC status code; the engine never imports grpc.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every failure the engine reports to a caller."""


class InvalidRequestError(EngineError):
    """The request can never succeed as sent (e.g. the prompt does not fit the context)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class OverloadedError(EngineError):
    """No room right now (queue or KV budget full); retrying later can succeed."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class UnavailableError(EngineError):
    """The engine is not accepting work: loading, draining, stopped or dead."""


class CancelledError(EngineError):
    """The caller went away; nobody is waiting for the rest."""


class DeadlineExceededError(EngineError):
    """The request's deadline passed before or during generation."""


class GenerationFailedError(EngineError):
    """Generation broke for this request; details are logged, not sent."""
