"""Optional bearer-token authentication: ``authorization: Bearer <token>`` or UNAUTHENTICATED.

Tokens come from a file or the environment as entries ``name:token`` (the name becomes the
caller's identity for rate limits and logs) or a bare ``token`` (identified by a hash prefix).
Presented tokens are compared with :func:`hmac.compare_digest` against every known token's
SHA-256, so neither the time taken nor an early exit tells an attacker how close a guess came.
Health checks are exempt: Kubernetes probes carry no credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qwen_grpc import status
from qwen_grpc.interceptors.base import (
    HEALTH_PREFIX,
    Behavior,
    CallContext,
    CallInfo,
    Interceptor,
    refuse,
)

_LOGGER = logging.getLogger(__name__)
AUTHORIZATION_KEY = "authorization"
_SCHEME = "bearer"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class BearerTokens:
    """Known tokens by SHA-256, each with the client name it authenticates."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._names: list[tuple[bytes, str]] = []
        for raw in entries:
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            name, separator, token = entry.partition(":")
            if not separator:
                name, token = "", entry
            token = token.strip()
            if not token or any(ch.isspace() for ch in token):
                raise ValueError("a bearer token must be non-empty and contain no whitespace")
            digest = _digest(token)
            self._names.append((digest, name.strip() or "token-" + digest.hex()[:8]))

    @classmethod
    def from_sources(cls, file: Path | None, inline: str | None) -> BearerTokens:
        """Reads a token file (one entry per line, ``#`` comments) and comma-separated entries."""
        entries: list[str] = []
        if file is not None:
            entries.extend(file.read_text(encoding="utf-8").splitlines())
        if inline:
            entries.extend(inline.split(","))
        tokens = cls(entries)
        if (file is not None or inline) and not tokens:
            raise ValueError("authentication is configured but no bearer token was found")
        return tokens

    def __len__(self) -> int:
        return len(self._names)

    def identify(self, token: str) -> str | None:
        """The name a token belongs to, or ``None``; checks every entry whatever matches."""
        presented = _digest(token)
        found: str | None = None
        for digest, name in self._names:
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found


class AuthInterceptor(Interceptor):
    """Admits calls with a known bearer token and records who made them."""

    def __init__(self, tokens: BearerTokens) -> None:
        self._tokens = tokens

    def applies_to(self, method: str) -> bool:
        return not method.startswith(HEALTH_PREFIX)

    def intercept(
        self, method: Behavior, request: Any, context: CallContext, call: CallInfo
    ) -> Any:
        header = context.metadata_value(AUTHORIZATION_KEY)
        if header is None:
            refuse(
                context,
                status.unauthenticated(
                    "missing credentials: send metadata 'authorization: Bearer <token>'",
                    "CREDENTIALS_MISSING",
                ),
            )
        scheme, _, token = header.strip().partition(" ")
        name = self._tokens.identify(token.strip()) if scheme.lower() == _SCHEME else None
        if name is None:
            _LOGGER.info("rejected credentials from %s for %s", context.peer(), call.method)
            refuse(context, status.unauthenticated("invalid bearer token", "CREDENTIALS_INVALID"))
        context.identity = name
        return method(request, context)
