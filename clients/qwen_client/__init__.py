"""Python client for ``qwen.chat.v1``: :class:`ChatClient` and the ``qwen-grpc chat`` CLI.

Failed calls raise :class:`grpc.RpcError`; :func:`error_details` reads the ``google.rpc``
details (field violations, retry delay, request id) the server attaches.
"""

from qwen_client.client import (
    DEFAULT_TARGET,
    SERVICE_CONFIG,
    ChatClient,
    ChatResult,
    ErrorDetails,
    FieldViolation,
    GenerationKwargs,
    MessageLike,
    StreamEvent,
    StreamFinal,
    TextDelta,
    Usage,
    error_details,
    to_messages,
)

__all__ = [
    "DEFAULT_TARGET",
    "SERVICE_CONFIG",
    "ChatClient",
    "ChatResult",
    "ErrorDetails",
    "FieldViolation",
    "GenerationKwargs",
    "MessageLike",
    "StreamEvent",
    "StreamFinal",
    "TextDelta",
    "Usage",
    "error_details",
    "to_messages",
]
