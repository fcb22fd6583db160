"""Request validation in one place: proto in, domain types out, or every violation at once.

Callers get all of their mistakes in one ``google.rpc.BadRequest`` rather than one per retry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import GenerationConfig

from qwen_grpc.engine.types import ChatMessage, Role, SamplingParams
from qwen_grpc.v1 import chat_pb2

MAX_STOP_SEQUENCE_CHARS = 64
_ROLES = {
    chat_pb2.ROLE_SYSTEM: Role.SYSTEM,
    chat_pb2.ROLE_USER: Role.USER,
    chat_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
}


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field, named by its path in the request."""

    field: str
    description: str


class ValidationError(Exception):
    """The request is invalid as sent; carries every violation found."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


@dataclass(frozen=True)
class RequestLimits:
    """What a request may ask for, derived from the model and the settings."""

    max_messages: int
    max_stop_sequences: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_prompt_tokens: int
    vocab_size: int
    control_tokens: tuple[str, ...] = ()
    """The tokenizer's special tokens: message text containing one could forge chat turns."""


def default_sampling(config: GenerationConfig, limits: RequestLimits) -> SamplingParams:
    """The model's own generation defaults, used for every option a request leaves unset."""
    return SamplingParams(
        max_new_tokens=limits.default_max_new_tokens,
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_p=float(config.top_p if config.top_p is not None else 1.0),
        top_k=int(config.top_k or 0),
        repetition_penalty=float(config.repetition_penalty or 1.0),
        greedy=not bool(config.do_sample),
    )


def to_messages(messages: Iterable[chat_pb2.Message], limits: RequestLimits) -> list[ChatMessage]:
    """Validates the conversation; raises :class:`ValidationError`."""
    proto_messages = list(messages)
    violations: list[FieldViolation] = []
    if not proto_messages:
        violations.append(FieldViolation("messages", "at least one message is required"))
    if len(proto_messages) > limits.max_messages:
        violations.append(
            FieldViolation("messages", f"at most {limits.max_messages} messages are allowed")
        )
    result: list[ChatMessage] = []
    for index, message in enumerate(proto_messages[: limits.max_messages]):
        where = f"messages[{index}]"
        role = _ROLES.get(message.role)
        if role is None:
            violations.append(
                FieldViolation(f"{where}.role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
            )
        elif role is Role.SYSTEM and index != 0:
            violations.append(
                FieldViolation(f"{where}.role", "a system message is allowed only first")
            )
        if not message.content.strip():
            violations.append(FieldViolation(f"{where}.content", "must not be empty"))
        forged = next((token for token in limits.control_tokens if token in message.content), None)
        if forged is not None:
            violations.append(
                FieldViolation(f"{where}.content", f"must not contain the control token {forged}")
            )
        if role is not None:
            result.append(ChatMessage(role, message.content))
    if result and not violations and result[-1].role is not Role.USER:
        violations.append(
            FieldViolation(
                f"messages[{len(result) - 1}].role", "the last message must be ROLE_USER"
            )
        )
    if violations:
        raise ValidationError(violations)
    return result


def _check_range(
    violations: list[FieldViolation],
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
) -> None:
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        violations.append(
            FieldViolation(f"options.{name}", f"must be a number in {bracket}{low:g}, {high:g}]")
        )


def to_sampling_params(
    options: chat_pb2.GenerationOptions, defaults: SamplingParams, limits: RequestLimits
) -> SamplingParams:
    """Resolves the request's options over the defaults; raises :class:`ValidationError`."""
    violations: list[FieldViolation] = []
    values = {
        "max_new_tokens": defaults.max_new_tokens,
        "temperature": defaults.temperature,
        "top_p": defaults.top_p,
        "top_k": defaults.top_k,
        "repetition_penalty": defaults.repetition_penalty,
    }
    if options.HasField("max_new_tokens"):
        _check_range(violations, "max_new_tokens", options.max_new_tokens, 1, limits.max_new_tokens)
        values["max_new_tokens"] = options.max_new_tokens
    if options.HasField("temperature"):
        _check_range(violations, "temperature", options.temperature, 0.0, 2.0)
        values["temperature"] = options.temperature
    if options.HasField("top_p"):
        _check_range(violations, "top_p", options.top_p, 0.0, 1.0, low_open=True)
        values["top_p"] = options.top_p
    if options.HasField("top_k"):
        _check_range(violations, "top_k", options.top_k, 0, limits.vocab_size)
        values["top_k"] = options.top_k
    if options.HasField("repetition_penalty"):
        _check_range(violations, "repetition_penalty", options.repetition_penalty, 1.0, 2.0)
        values["repetition_penalty"] = options.repetition_penalty
    stops = tuple(options.stop)
    if len(stops) > limits.max_stop_sequences:
        violations.append(
            FieldViolation("options.stop", f"at most {limits.max_stop_sequences} stop sequences")
        )
    for index, stop in enumerate(stops):
        if not 1 <= len(stop) <= MAX_STOP_SEQUENCE_CHARS:
            violations.append(
                FieldViolation(
                    f"options.stop[{index}]", f"must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters"
                )
            )
    if violations:
        raise ValidationError(violations)
    if options.HasField("greedy"):
        greedy = options.greedy
    elif options.HasField("temperature"):
        greedy = options.temperature == 0.0
    else:
        greedy = defaults.greedy
    return SamplingParams(
        max_new_tokens=int(values["max_new_tokens"]),
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        top_k=int(values["top_k"]),
        repetition_penalty=float(values["repetition_penalty"]),
        seed=options.seed if options.HasField("seed") else None,
        stop=stops,
        greedy=greedy,
    )


def check_prompt_length(prompt_tokens: int, limits: RequestLimits) -> None:
    """A prompt that leaves no room in the context window can never be answered."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise ValidationError(
            [
                FieldViolation(
                    "messages",
                    f"the prompt is {prompt_tokens} tokens after the chat template; "
                    f"at most {limits.max_prompt_tokens} fit",
                )
            ]
        )
