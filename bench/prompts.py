"""Benchmark prompts of an exact token length, identical at every concurrency level.

TTFT and prefill numbers are only comparable between engines when every engine prefills the same
number of tokens, so each prompt is grown word by word until the chat-templated prompt is exactly
``prompt_tokens`` long. Prompts differ per stream (so a batch is not one sequence repeated) but the
list is deterministic, so concurrency 1 and 16 see the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_TOPICS = (
    "the history of the printing press",
    "how rivers shape valleys over time",
    "why bread dough needs to rest",
    "the life cycle of a star",
    "how a bicycle stays upright",
    "the way bees find flowers",
    "what makes a bridge strong",
    "how tides follow the moon",
)
_FILLER_TEXT = (
    "Please explain it clearly with simple examples and short sentences for a curious student "
    "who likes stories about people places tools weather animals music cities oceans forests "
    "mountains trains letters gardens markets lamps clocks boats maps roads"
)
_FILLER = tuple(_FILLER_TEXT.split())


@dataclass(frozen=True)
class BenchPrompt:
    """One user message and its chat-templated token ids."""

    text: str
    token_ids: tuple[int, ...]


def chat_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids exactly as the server builds them: chat template plus the assistant prompt."""
    encoded: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return list(encoded["input_ids"])


def _grow(tokenizer: PreTrainedTokenizerBase, head: str, words: Sequence[str], target: int) -> str:
    """Appends words (skipping ones that would overshoot) until the prompt has ``target`` ids."""
    text = head
    length = len(chat_ids(tokenizer, text))
    if length > target:
        raise ValueError(f"{target} prompt tokens is shorter than the chat template plus a topic")
    index = 0
    while length < target:
        if index >= 10 * len(words):
            raise ValueError(f"could not reach exactly {target} prompt tokens")
        candidate = f"{text} {words[index % len(words)]}"
        index += 1
        candidate_length = len(chat_ids(tokenizer, candidate))
        if candidate_length <= target:
            text, length = candidate, candidate_length
    return text


def build_prompts(
    tokenizer: PreTrainedTokenizerBase, count: int, prompt_tokens: int
) -> list[BenchPrompt]:
    """``count`` distinct prompts, each exactly ``prompt_tokens`` long after the chat template."""
    prompts: list[BenchPrompt] = []
    for index in range(count):
        topic = _TOPICS[index % len(_TOPICS)]
        head = f"Tell me about {topic}."
        if index >= len(_TOPICS):
            head = f"Part {index // len(_TOPICS) + 1}: {head}"
        rotation = index % len(_FILLER)
        words = (*_FILLER[rotation:], *_FILLER[:rotation])
        text = _grow(tokenizer, head, words, prompt_tokens)
        prompts.append(BenchPrompt(text=text, token_ids=tuple(chat_ids(tokenizer, text))))
    return prompts
