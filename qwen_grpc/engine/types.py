"""Plain domain types crossing the boundary between the servicer and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """Chat-template roles, spelled the way Hugging Face chat templates expect them."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of the conversation."""

    role: Role
    content: str


class FinishReason(enum.Enum):
    """Why a sequence stopped generating."""

    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CONTEXT_LENGTH = "context_length"


@dataclass(frozen=True)
class SamplingParams:
    """Fully resolved generation options: every field has a value, defaults already applied."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    greedy: bool = False

    @property
    def is_greedy(self) -> bool:
        """A temperature of zero means greedy too, the way most serving APIs read it."""
        return self.greedy or self.temperature == 0.0


@dataclass(frozen=True)
class Usage:
    """Token accounting for one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    """The next piece of the reply; always whole characters."""

    text: str


@dataclass(frozen=True)
class Completed:
    """The last event of a successful generation."""

    finish_reason: FinishReason
    usage: Usage


@dataclass
class Timings:
    """When one generation reached each stage, on the ``time.monotonic`` clock.

    The engine thread writes them as the request moves on; the call's trace reads them once the
    call has ended (its queue-wait, prefill and decode spans), so the engine keeps no spans.
    """

    submitted: float
    admitted: float | None = None
    """Given a batch slot and its KV blocks: the queue wait ends and the prefill begins."""
    first_token: float | None = None
    """The prompt is in the cache and its first token sampled: the decode begins."""
    finished: float | None = None
    """Completed, failed, cancelled or expired."""

    def stages(self, end: float) -> list[tuple[str, float, float]]:
        """``(name, start, end)`` of the stages the request reached, each cut at ``end`` (the
        call's end, also for a stage the engine had not closed when the call was over)."""
        marks = (self.submitted, self.admitted, self.first_token)
        starts = [
            (name, mark)
            for name, mark in zip(("queue_wait", "prefill", "decode"), marks, strict=True)
            if mark is not None
        ]
        stops = [mark for _, mark in starts[1:]] + [end if self.finished is None else self.finished]
        return [
            (name, min(start, end), min(stop, end))
            for (name, start), stop in zip(starts, stops, strict=True)
        ]


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt ready for the scheduler."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    deadline: float | None = None
    """Absolute ``time.monotonic()`` after which the sequence is dropped."""
    client: str = ""
    """Who asks (the identity rate limits use): clients take turns in the engine's queue."""
    tags: dict[str, str] = field(default_factory=dict)


Event = TextDelta | Completed
