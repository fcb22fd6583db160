"""Valid, varied requests for load and soak: the mix of conversations real callers send.

Variety matters more than realism of the words: prompts of different lengths batch with
different padding, multi-turn and system prompts take other template paths, sampled and
stop-sequence requests take other sampler and matcher paths, and non-ASCII text exercises the
delta detokenizer.
"""

from __future__ import annotations

import random

from qwen_grpc.v1 import chat_pb2

_PROMPTS = (
    "What is the capital of France?",
    "Tell me a long story about a lighthouse keeper.",
    "List five prime numbers and explain why each is prime.",
    "Translate 'good morning' into French, German and Spanish.",
    "用三句话介绍一下长城。",
    "Write a haiku about gRPC streams 🚀.",
    "Summarize the plot of Hamlet in one paragraph.",
    "Explain continuous batching to a new engineer.",
)
_SYSTEM = "You are a concise assistant for internal services."
_STOPS = (".", "\n", "the", "。")


def conversation(rng: random.Random) -> list[chat_pb2.Message]:
    """One of: a single question, a question under a system prompt, or a multi-turn chat."""
    question = chat_pb2.Message(role=chat_pb2.ROLE_USER, content=rng.choice(_PROMPTS))
    shape = rng.randrange(3)
    if shape == 0:
        return [question]
    if shape == 1:
        return [chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content=_SYSTEM), question]
    return [
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content=rng.choice(_PROMPTS)),
        chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT, content="Sure, here it is."),
        question,
    ]


def options(rng: random.Random, max_new_tokens: int) -> chat_pb2.GenerationOptions:
    """Greedy half the time, else seeded sampling; a stop sequence one time in four."""
    chosen = chat_pb2.GenerationOptions(max_new_tokens=max_new_tokens)
    if rng.random() < 0.5:
        chosen.greedy = True
    else:
        chosen.temperature = rng.choice((0.3, 0.7, 1.0))
        chosen.top_p = rng.choice((0.8, 0.95, 1.0))
        chosen.top_k = rng.choice((0, 20, 50))
        chosen.repetition_penalty = rng.choice((1.0, 1.1))
        chosen.seed = rng.randrange(2**32)
    if rng.random() < 0.25:
        chosen.stop.append(rng.choice(_STOPS))
    return chosen
