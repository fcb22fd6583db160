"""Hypothesis strategies for requests the server must refuse, one category per broken rule.

Every request breaks exactly the rule its category names and is valid otherwise (a valid
conversation, random valid options), so any status but INVALID_ARGUMENT or RESOURCE_EXHAUSTED
is the server's fault, and validation is exercised with every other field in play. Requests
travel as bytes: that is how the two categories the Python proto API cannot build (invalid
UTF-8 in a string field, a message cut short) reach the server, and it keeps one sending path.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from qwen_grpc.v1 import chat_pb2
from reliability.calls import CHAT, STREAM

COUNT_TOKENS = "CountTokens"
MAX_STOP_CHARS = 64  # the contract: each stop sequence 1 to 64 characters
MEGABYTE_CHARS = (1_100_000, 3_000_000)  # past the server's 1 MiB max_receive_message_bytes
INVALID_UTF8 = "invalid UTF-8 in a string"
CUT_SHORT = "message cut short"
_BLANKS = " \t\n\r\x0b\x0c\u3000\u2003"
_BAD_UTF8 = (b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf5\x80\x80\x80")
# Bounds are exact float32 values (hypothesis insists); 2**-10 keeps clear of rounding.
_EPSILON = 2.0**-10


@dataclass(frozen=True)
class Malformed:
    """One malformed request: the rule it breaks, the method it goes to, its wire bytes."""

    category: str
    method: str
    payload: bytes

    def __repr__(self) -> str:  # hypothesis prints examples; megabyte payloads would flood logs
        return f"Malformed({self.category}, {self.method}, {len(self.payload)} bytes)"


Conversation = list[chat_pb2.Message]
_text = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
    lambda text: text.strip() != ""
)
_stop = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=MAX_STOP_CHARS)


def _turn(role: int, text: str) -> chat_pb2.Message:
    return chat_pb2.Message(role=role, content=text)  # type: ignore[arg-type]


def _user(text: str) -> chat_pb2.Message:
    return _turn(chat_pb2.ROLE_USER, text)


@st.composite
def _conversation(draw: st.DrawFn) -> Conversation:
    """A valid conversation: an optional system turn, then user and assistant ending in user."""
    turns = [_turn(chat_pb2.ROLE_SYSTEM, draw(_text))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        turns += [_user(draw(_text)), _turn(chat_pb2.ROLE_ASSISTANT, draw(_text))]
    return [*turns, _user(draw(_text))]


def _valid_options(limits: chat_pb2.ModelLimits) -> st.SearchStrategy[chat_pb2.GenerationOptions]:
    return st.builds(
        chat_pb2.GenerationOptions,
        max_new_tokens=st.none() | st.integers(1, limits.max_new_tokens),
        temperature=st.none() | st.floats(0.0, 2.0, width=32),
        top_p=st.none() | st.floats(_EPSILON, 1.0, width=32),
        top_k=st.none() | st.integers(0, 1_000),
        repetition_penalty=st.none() | st.floats(1.0, 2.0, width=32),
        seed=st.none() | st.integers(0, 2**64 - 1),
        stop=st.lists(_stop, max_size=limits.max_stop_sequences),
        greedy=st.none() | st.booleans(),
    )


def _encode(messages: Conversation, options: chat_pb2.GenerationOptions) -> bytes:
    """Options first, messages last: the wire order is free, and a cut then lands in content."""
    return (
        chat_pb2.ChatRequest(options=options).SerializeToString()
        + chat_pb2.ChatRequest(messages=messages).SerializeToString()
    )


# -- conversations that break a rule (for Chat, StreamChat and CountTokens) -----------------


@st.composite
def _blank_content(draw: st.DrawFn) -> Conversation:
    turns = draw(_conversation())
    index = draw(st.integers(0, len(turns) - 1))
    turns[index] = _turn(turns[index].role, draw(st.text(alphabet=_BLANKS, max_size=20)))
    return turns


@st.composite
def _unknown_role(draw: st.DrawFn) -> Conversation:
    turns = draw(_conversation())
    role = draw(
        st.one_of(
            st.just(chat_pb2.ROLE_UNSPECIFIED),
            st.integers(4, 2**31 - 1),
            st.integers(-(2**31), -1),
        )
    )
    index = draw(st.integers(0, len(turns) - 1))
    turns[index] = _turn(role, turns[index].content)
    return turns


@st.composite
def _misplaced_system(draw: st.DrawFn) -> Conversation:
    turns = draw(_conversation())
    turns.insert(draw(st.integers(1, len(turns))), _turn(chat_pb2.ROLE_SYSTEM, draw(_text)))
    return turns


@st.composite
def _last_not_user(draw: st.DrawFn) -> Conversation:
    turns = draw(_conversation())
    return [*turns, _turn(chat_pb2.ROLE_ASSISTANT, draw(_text))]


def _conversations(limits: chat_pb2.ModelLimits) -> dict[str, st.SearchStrategy[Conversation]]:
    return {
        "no messages": st.just([]),
        "blank content": _blank_content(),
        "unknown role": _unknown_role(),
        "system turn not first": _misplaced_system(),
        "last turn not user": _last_not_user(),
        "thousands of messages": st.builds(
            lambda n, text: [_user(text)] * n, st.integers(limits.max_messages + 1, 5_000), _text
        ),
    }


# -- options that break a rule (Chat and StreamChat) ------------------------------------------

_NOT_FINITE_OR_NEGATIVE = st.one_of(
    st.sampled_from((math.nan, math.inf, -math.inf)),
    st.floats(max_value=-_EPSILON, width=32, allow_infinity=False),
)
_BAD_FLOATS: dict[str, st.SearchStrategy[float]] = {
    "temperature": st.one_of(
        _NOT_FINITE_OR_NEGATIVE, st.floats(min_value=2 + _EPSILON, width=32, allow_infinity=False)
    ),
    "top_p": st.one_of(
        _NOT_FINITE_OR_NEGATIVE,
        st.sampled_from((0.0, -0.0)),
        st.floats(min_value=1 + _EPSILON, width=32, allow_infinity=False),
    ),
    "repetition_penalty": st.one_of(
        _NOT_FINITE_OR_NEGATIVE,
        st.floats(min_value=0.0, max_value=1 - _EPSILON, width=32),
        st.floats(min_value=2 + _EPSILON, width=32, allow_infinity=False),
    ),
}


@st.composite
def _bad_floats(draw: st.DrawFn) -> chat_pb2.GenerationOptions:
    options = chat_pb2.GenerationOptions()
    for name in draw(st.lists(st.sampled_from(sorted(_BAD_FLOATS)), min_size=1, unique=True)):
        setattr(options, name, draw(_BAD_FLOATS[name]))
    return options


@st.composite
def _bad_stop_length(draw: st.DrawFn) -> chat_pb2.GenerationOptions:
    bad = draw(st.one_of(st.just(""), st.text(min_size=MAX_STOP_CHARS + 1, max_size=5_000)))
    return chat_pb2.GenerationOptions(stop=[bad])


def _bad_options(
    limits: chat_pb2.ModelLimits,
) -> dict[str, st.SearchStrategy[chat_pb2.GenerationOptions]]:
    """Only the broken fields; they are merged over valid options (repeated fields append)."""
    return {
        "NaN, infinite, negative or out-of-range float option": _bad_floats(),
        "max_new_tokens 0 or above the cap": st.builds(
            lambda n: chat_pb2.GenerationOptions(max_new_tokens=n),
            st.one_of(st.just(0), st.integers(limits.max_new_tokens + 1, 2**32 - 1)),
        ),
        "top_k above the vocabulary": st.builds(
            lambda k: chat_pb2.GenerationOptions(top_k=k), st.integers(10_000_000, 2**32 - 1)
        ),
        "too many stop sequences": st.builds(
            lambda stops: chat_pb2.GenerationOptions(stop=stops),
            st.lists(_stop, min_size=limits.max_stop_sequences + 1, max_size=200),
        ),
        "empty or over-long stop sequence": _bad_stop_length(),
    }


def _merged(
    valid: chat_pb2.GenerationOptions, bad: chat_pb2.GenerationOptions
) -> chat_pb2.GenerationOptions:
    valid.MergeFrom(bad)
    return valid


# -- sizes and encodings ----------------------------------------------------------------------


def _prompt_too_long(max_prompt_tokens: int) -> st.SearchStrategy[Conversation]:
    """Each space-led word is at least one token, so more words than the limit never fit."""
    word = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)
    words = st.integers(max_prompt_tokens + 1, min(40 * max_prompt_tokens, 100_000))
    return st.builds(lambda w, n: [_user((" " + w) * n)], word, words)


_megabyte_content = st.builds(
    lambda char, n: [_user(char * n)],
    st.sampled_from(("a", "é", "中", "🙂")),
    st.integers(*MEGABYTE_CHARS),
)


def _raw_user_turn(content: bytes) -> bytes:
    """``messages`` with one user turn whose content is raw bytes, bypassing UTF-8 checks."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def field(number: int, body: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(body)) + body

    return field(1, varint(1 << 3) + varint(chat_pb2.ROLE_USER) + field(2, content))


@st.composite
def _invalid_utf8(draw: st.DrawFn, options: st.SearchStrategy[chat_pb2.GenerationOptions]) -> bytes:
    content = draw(st.text(max_size=10)).encode() + draw(st.sampled_from(_BAD_UTF8))
    content += draw(st.text(max_size=10)).encode()
    return draw(options).SerializeToString() + _raw_user_turn(content)


@st.composite
def _cut_short(draw: st.DrawFn, options: st.SearchStrategy[chat_pb2.GenerationOptions]) -> bytes:
    """A valid request cut inside the content of its last turn, the last thing encoded."""
    messages = draw(_conversation())
    whole = _encode(messages, draw(options))
    return whole[: len(whole) - draw(st.integers(1, len(messages[-1].content.encode())))]


def malformed_requests(limits: chat_pb2.ModelLimits) -> dict[str, st.SearchStrategy[Malformed]]:
    """One strategy per category; each request goes to every method its rule applies to."""
    options = _valid_options(limits)
    generation = st.sampled_from((CHAT, STREAM))
    every_method = st.sampled_from((CHAT, STREAM, COUNT_TOKENS))

    def request(
        category: str,
        methods: st.SearchStrategy[str],
        messages: st.SearchStrategy[Conversation],
        opts: st.SearchStrategy[chat_pb2.GenerationOptions] = options,
    ) -> st.SearchStrategy[Malformed]:
        return st.builds(Malformed, st.just(category), methods, st.builds(_encode, messages, opts))

    def raw(
        category: str,
        payload: Callable[
            [st.SearchStrategy[chat_pb2.GenerationOptions]], st.SearchStrategy[bytes]
        ],
    ) -> st.SearchStrategy[Malformed]:
        return st.builds(Malformed, st.just(category), every_method, payload(options))

    strategies = {
        name: request(name, every_method, conversation)
        for name, conversation in _conversations(limits).items()
    }
    strategies |= {
        name: request(name, generation, _conversation(), st.builds(_merged, options, bad))
        for name, bad in _bad_options(limits).items()
    }
    strategies["prompt longer than the context"] = request(
        "prompt longer than the context", generation, _prompt_too_long(limits.max_prompt_tokens)
    )
    strategies["megabyte content"] = request("megabyte content", every_method, _megabyte_content)
    strategies[INVALID_UTF8] = raw(INVALID_UTF8, _invalid_utf8)
    strategies[CUT_SHORT] = raw(CUT_SHORT, _cut_short)
    return strategies
