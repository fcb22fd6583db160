"""What the mixed-load section sends: its sizes, and its prompts of exact token lengths.

Every prompt is built once, up front, from the benchmark's own tokenizer, so the server, the
in-process prefill and llama.cpp all see the same token ids. Long prompts use the reliability
suite's one-token-per-word text (:func:`reliability.long_prompt.prompt_of`): growing a 4,000-token
prompt word by word, as :mod:`bench.prompts` does for short ones, would take minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bench.prompts import BenchPrompt, chat_ids
from bench.quiet import Quiet
from reliability.long_prompt import prompt_of


@dataclass(frozen=True)
class MixedPlan:
    """Sizes of the four server scenarios; the defaults are the issue's."""

    streams: int = 7
    """Streams decoding when a long prompt joins."""
    short_prompt_tokens: int = 128
    """Prompt length of every short request (streams, heavy and light clients)."""
    short_new_tokens: int = 512
    """The streams' token cap: they are cancelled once the long prompt's answer is whole."""
    steady_steps: int = 32
    """Engine decode steps between the last stream's first token and the long prompt."""
    join_prompt_tokens: int = 2000
    join_new_tokens: int = 16
    rss_prompt_tokens: int = 4000
    rss_new_tokens: int = 32
    queued: int = 40
    """Heavy requests kept waiting beyond the full batch."""
    heavy_new_tokens: int = 16
    """Few tokens per heavy request, so batch slots turn over every few steps."""
    light_requests: int = 4
    deadline_probes: int = 3
    queued_after_steps: int = 16
    """Decode steps with a long prompt still in the queue after which the server is taken
    to hold it back (its KV budget, say) rather than being about to start it."""
    call_timeout_s: float = 600.0
    quiet: Quiet = field(default_factory=Quiet)
    """Each scenario starts in a quiet moment and is redone once if the machine was busy."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MixedPrompts:
    """One prompt per request slot, distinct so that no cache of prefixes can share work."""

    streams: tuple[BenchPrompt, ...]
    join: BenchPrompt
    rss: BenchPrompt
    heavy: tuple[BenchPrompt, ...]
    light: tuple[BenchPrompt, ...]


def _exact(tokenizer: PreTrainedTokenizerBase, tokens: int, head: str) -> BenchPrompt:
    text = prompt_of(lambda candidate: len(chat_ids(tokenizer, candidate)), tokens, head)
    return BenchPrompt(text=text, token_ids=tuple(chat_ids(tokenizer, text)))


def build_mixed_prompts(
    tokenizer: PreTrainedTokenizerBase, plan: MixedPlan, max_batch_size: int
) -> MixedPrompts:
    """Prompts for ``plan``; the heavy client needs one per call it keeps in flight."""

    def shorts(kind: str, count: int) -> tuple[BenchPrompt, ...]:
        return tuple(
            _exact(tokenizer, plan.short_prompt_tokens, f"{kind} {i + 1}: tell me a long story.")
            for i in range(count)
        )

    return MixedPrompts(
        streams=shorts("Stream", plan.streams),
        join=_exact(tokenizer, plan.join_prompt_tokens, "Summarize these notes in one sentence:"),
        rss=_exact(tokenizer, plan.rss_prompt_tokens, "List the nouns of these notes:"),
        heavy=shorts("Heavy", max_batch_size + plan.queued),
        light=shorts("Light", plan.light_requests),
    )
