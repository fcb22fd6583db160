"""Turning generated token ids into text deltas that are safe to send.

Byte-level BPE splits one Chinese character or emoji over several tokens, so decoding token by
token would emit half characters. Stop sequences can also straddle deltas, so text that might
begin one is held back until it is known not to.
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The slice of a Hugging Face tokenizer the detokenizer needs."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing list of ids into deltas of whole characters.

    The prefix/read offset scheme (as in TGI and vLLM) decodes only a short window each step, so
    the cost per token stays constant however long the reply grows.
    """

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly completed text, possibly empty."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :].rstrip(_REPLACEMENT)


class StopSequenceMatcher:
    """Finds stop sequences across delta boundaries without ever emitting part of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns the text that is safe to emit and whether a stop sequence was found."""
        if not self._stops:
            return delta, False
        text = self._pending + delta
        hits = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        held = self._longest_stop_prefix_suffix(text)
        self._pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """Held-back text that turned out not to start a stop sequence."""
        pending, self._pending = self._pending, ""
        return pending
