"""Server interceptors: auth, logging, rate limiting and deadlines, one job each.

:func:`build_interceptors` composes them from the settings, outermost first:

1. request id: echoed with the first response message and in the trailers, never before the
   handler answered, so an UNAVAILABLE answer stays retryable (gRFC A6);
   access log: sees every outcome, including the refusals of the interceptors below it, and
   (with a tracer) gives each call its span, ended with the same facts as its log line;
2. errors: no stray exception reaches the caller as UNKNOWN;
   malformed: bytes that do not parse are INVALID_ARGUMENT, not gRPC's INTERNAL;
   drain (when given one): chat calls during a shutdown are UNAVAILABLE, so clients retry;
3. auth (when tokens are configured): who is calling, before anything is spent on them;
4. deadlines: a hopeless call is refused before it takes a rate-limit token or a slot;
5. rate limit: per-client token bucket and the global cap on concurrent generations.
"""

from __future__ import annotations

import grpc

from qwen_grpc.config import Settings
from qwen_grpc.interceptors.access_log import AccessLogInterceptor, CallObserver, CallTracer
from qwen_grpc.interceptors.auth import AuthInterceptor, BearerTokens
from qwen_grpc.interceptors.deadlines import DeadlineInterceptor
from qwen_grpc.interceptors.drain import Drain, DrainInterceptor
from qwen_grpc.interceptors.errors import ErrorInterceptor
from qwen_grpc.interceptors.malformed import MalformedRequestInterceptor
from qwen_grpc.interceptors.rate_limit import RateLimitInterceptor, TokenBuckets
from qwen_grpc.interceptors.request_id import RequestIdInterceptor

__all__ = ["build_interceptors"]


def build_interceptors(
    settings: Settings,
    observer: CallObserver | None = None,
    drain: Drain | None = None,
    tracer: CallTracer | None = None,
) -> list[grpc.ServerInterceptor]:
    """The interceptor chain the settings ask for, in the order above."""
    chain: list[grpc.ServerInterceptor] = [
        RequestIdInterceptor(),
        AccessLogInterceptor(settings.log_content, settings.log_health_checks, observer, tracer),
        ErrorInterceptor(),
        MalformedRequestInterceptor(),
    ]
    if drain is not None:
        chain.append(DrainInterceptor(drain))
    tokens = BearerTokens.from_sources(settings.auth_tokens_file, settings.auth_tokens)
    if tokens:
        chain.append(AuthInterceptor(tokens))
    chain.append(
        DeadlineInterceptor(
            settings.default_deadline_seconds,
            settings.max_deadline_seconds,
            settings.min_deadline_seconds,
        )
    )
    buckets = (
        TokenBuckets(settings.rate_limit_per_second, settings.rate_limit_burst)
        if settings.rate_limit_per_second > 0
        else None
    )
    chain.append(RateLimitInterceptor(buckets, settings.max_concurrent_generations))
    return chain
