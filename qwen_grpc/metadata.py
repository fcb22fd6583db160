"""Metadata keys that the servicer and the interceptors both use, so neither imports the other."""

from __future__ import annotations

REQUEST_ID_KEY = "x-request-id"
CLIENT_ID_KEY = "x-client-id"
QUEUE_POSITION_KEY = "x-queue-position"
"""Response header of a stream that had to queue: its 1-based place in serving order."""
