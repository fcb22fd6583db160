"""The tokenizer, shared safely between handler threads and the engine thread."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import cast

from transformers.tokenization_utils_base import BatchEncoding, PreTrainedTokenizerBase

from qwen_grpc.engine.types import ChatMessage


class SharedTokenizer:
    """Chat templating for handler threads and decoding for the engine thread, one at a time.

    Fast tokenizers are Rust objects that raise "Already borrowed" when two threads use one at
    once, so every call takes one lock; each call is microseconds next to a decode step.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt ids with the model's chat template and the assistant generation prompt."""
        conversation = [{"role": str(m.role), "content": m.content} for m in messages]
        with self._lock:
            # tokenize=True with return_dict=True returns a BatchEncoding; the stub is a union.
            encoded = cast(
                BatchEncoding,
                self._tokenizer.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=True, return_dict=True
                ),
            )
        return list(encoded["input_ids"])

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        with self._lock:
            return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))
