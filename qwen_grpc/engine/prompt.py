"""The tokenizer, shared between handler threads (prompts) and the engine thread (text)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from transformers.tokenization_utils_base import BatchEncoding, PreTrainedTokenizerBase

from qwen_grpc.engine.types import ChatMessage


class SharedTokenizer:
    """Chat templating for handler threads and decoding for the engine thread, concurrently.

    A fast tokenizer is a Rust object behind a runtime borrow flag: any number of threads may
    read through it at once (encode, decode), but a call that changes its settings (truncation,
    padding) while another one runs fails with "Already borrowed". Nothing here asks for
    truncation or padding, so once the settings a checkpoint may ship are cleared, every call is
    a read and needs no lock. A lock made every stream's detokenization wait for the longest
    prompt being tokenized (0.1-0.4 s for a megabyte); encoding runs with the GIL released.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            if backend.truncation is not None:
                backend.no_truncation()
            if backend.padding is not None:
                backend.no_padding()

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt ids with the model's chat template and the assistant generation prompt."""
        conversation = [{"role": str(m.role), "content": m.content} for m in messages]
        # tokenize=True with return_dict=True returns a BatchEncoding; the stub is a union.
        encoded = cast(
            BatchEncoding,
            self._tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            ),
        )
        return list(encoded["input_ids"])

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))
