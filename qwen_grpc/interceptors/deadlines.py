"""Server-side deadlines: a default for calls without one, a maximum, and a minimum to start.

A caller that sets no deadline would otherwise hold a batch slot for as long as generation
takes; one that sets a year-long deadline likewise. The effective deadline is handed to the
servicer through ``context.time_remaining()``, so the engine drops the sequence within one
decode step when it passes (DEADLINE_EXCEEDED from the server). A call with less time left than
the minimum cannot produce anything useful: it is refused before it queues, costing nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from qwen_grpc import status
from qwen_grpc.interceptors.base import (
    CHAT_SERVICE_PREFIX,
    Behavior,
    CallContext,
    CallInfo,
    Interceptor,
    refuse,
)

_LOGGER = logging.getLogger(__name__)


class DeadlineInterceptor(Interceptor):
    """Applies default and maximum deadlines to chat calls and refuses hopeless ones."""

    def __init__(
        self, default_seconds: float, maximum_seconds: float, minimum_seconds: float
    ) -> None:
        """Zero turns the default or the maximum off."""
        self._default = default_seconds
        self._maximum = maximum_seconds
        self._minimum = minimum_seconds

    def applies_to(self, method: str) -> bool:
        return method.startswith(CHAT_SERVICE_PREFIX)

    def effective_timeout(self, client_remaining: float | None) -> float | None:
        """Seconds the call may take: the caller's, else the default, capped at the maximum."""
        remaining = client_remaining
        if remaining is None and self._default > 0:
            remaining = self._default
        if self._maximum > 0:
            remaining = self._maximum if remaining is None else min(remaining, self._maximum)
        return remaining

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        client_remaining = context.client_deadline_remaining()
        remaining = self.effective_timeout(client_remaining)
        if remaining is not None and remaining != client_remaining:
            context.deadline = time.monotonic() + remaining
        if remaining is not None and remaining < self._minimum:
            refuse(
                context,
                status.deadline_exceeded(
                    f"only {remaining:.3f} s of the deadline were left when the call arrived; "
                    f"the server needs at least {self._minimum:g} s to start"
                ),
            )
        return method(request, context)
