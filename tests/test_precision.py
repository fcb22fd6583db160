"""Answers like float32: greedy conversations through ``auto``, next-token agreement per mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_grpc.engine.fidelity import greedy_answers, matching_answers
from qwen_grpc.engine.model import LoadedModel, load_model
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.scheduler import Engine, SchedulerLimits
from qwen_grpc.engine.sources import resolve_model
from qwen_grpc.engine.types import ChatMessage, Completed, GenerationRequest, Role, SamplingParams

TEXT = (
    "The history of Paris spans more than two thousand years. Founded by a Celtic tribe called "
    "the Parisii on an island in the Seine, the settlement grew into a Roman town named "
    "Lutetia. In the Middle Ages it became the capital of the kingdom of France and one of the "
    "largest cities in Europe, home to a famous university and a great cathedral. During the "
    "nineteenth century the city was rebuilt with wide boulevards, parks and sewers, and it "
    "hosted several world fairs, one of which left behind the Eiffel Tower. Today Paris is a "
    "centre of finance, fashion, science and the arts, and millions of visitors come each year "
    "to see its museums, its churches and the river that runs through its heart."
)


# Held out from the start-up calibration (``fidelity.CALIBRATION_CHATS``) but for the three
# conversations on which bf16 answered nonsense or ran to the length limit on an Intel AMX host.
CONVERSATIONS: tuple[tuple[ChatMessage, ...], ...] = (
    (ChatMessage(Role.USER, "What is the capital of France?"),),
    (
        ChatMessage(Role.SYSTEM, "You are a concise assistant."),
        ChatMessage(Role.USER, "What is the capital of France?"),
    ),
    (ChatMessage(Role.USER, "用一句话介绍北京。"),),
    (ChatMessage(Role.USER, "Name three primary colors."),),
    (ChatMessage(Role.USER, "Explain photosynthesis in two sentences."),),
    (
        ChatMessage(Role.SYSTEM, "You are a pirate."),
        ChatMessage(Role.USER, "How are you today?"),
    ),
    (ChatMessage(Role.USER, "What is 12 times 7?"),),
    (
        ChatMessage(Role.SYSTEM, "Answer in one short sentence."),
        ChatMessage(Role.USER, "Why is the sky blue?"),
    ),
)

# int8 is per-channel int8 of weights that the demo model ships as Q4_1 (4-bit, per group of
# 32): re-quantizing that grid per row costs it about 5 % of greedy choices. q8 quantizes every
# activation block, so a float32 rounding anywhere upstream can move one int8 step: two
# attention kernels agreeing to 1e-6 gave it 141 and 139 of this text's 147 choices (Intel
# Xeon, 2026-12-03); its bar sits below that spread. (make bench's fidelity section compares it
# with llama.cpp's Q8_0 over 588 positions: 566 each.)
MIN_AGREEMENT = {"bfloat16": 0.97, "q8": 0.94, "int8": 0.90}


@pytest.fixture(scope="module")
def demo_dir(cache_dir: Path) -> Path:
    return resolve_model("demo", None, cache_dir).path


def next_token_choices(model: LoadedModel) -> torch.Tensor:
    ids = model.tokenizer(TEXT)["input_ids"]
    return model.score(ids).argmax(dim=-1)


@pytest.fixture(scope="module")
def float32_choices(demo_dir: Path) -> torch.Tensor:
    return next_token_choices(load_model(demo_dir, "float32", threads=0))


def answer(model: LoadedModel, question: str) -> str:
    tokenizer = SharedTokenizer(model.tokenizer)
    engine = Engine(model, SchedulerLimits(), tokenizer)
    engine.start()
    try:
        prompt = tuple(tokenizer.encode_chat([ChatMessage(Role.USER, question)]))
        handle = engine.submit(
            GenerationRequest("q", prompt, SamplingParams(max_new_tokens=24, greedy=True))
        )
        return "".join(e.text for e in handle if not isinstance(e, Completed))
    finally:
        engine.stop()


@pytest.mark.parametrize("dtype", ["bfloat16", "q8", "int8"])
def test_reduced_precision_agrees_with_float32_next_token_by_next_token(
    demo_dir: Path, float32_choices: torch.Tensor, dtype: str
) -> None:
    model = load_model(demo_dir, dtype, threads=0)
    assert model.dtype == dtype
    choices = next_token_choices(model)
    agreement = float((choices == float32_choices).float().mean())
    assert agreement >= MIN_AGREEMENT[dtype], f"{dtype} agrees with float32 on {agreement:.1%}"


# q8 starts "The capital of France ..." with "L'Étoile, ..." on the demo model: its first token
# is a near-tie that Q8_0's rounding of already 4-bit weights tips; ``auto`` does not pick it
# there (the calibration chats include this question).
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_reduced_precision_still_knows_paris(demo_dir: Path, dtype: str) -> None:
    model = load_model(demo_dir, dtype, threads=0)
    assert "Paris" in answer(model, "What is the capital of France?")


ANSWER_TOKENS = 24
# float32 on another CPU kind sums in another order: last-bit differences, about 1e-4 logits
# here, against a narrowest float32 margin of 0.0016 logits along these answers (the "The" over
# "La" after "You are a concise assistant."). One conversation of slack covers a margin that
# thin; with bf16 residual adds, bf16 answered 2 of 8 like float32 on an AMD EPYC (now 5), q8 0.
MIN_MATCHING_CONVERSATIONS = len(CONVERSATIONS) - 1


def conversation_answers(model: LoadedModel) -> list[list[int]]:
    tokenizer = SharedTokenizer(model.tokenizer)
    prompts = [tokenizer.encode_chat(conversation) for conversation in CONVERSATIONS]
    return greedy_answers(model, prompts, ANSWER_TOKENS)


def test_auto_answers_held_out_conversations_like_float32(demo_dir: Path) -> None:
    reference = conversation_answers(load_model(demo_dir, "float32", threads=0))
    model = load_model(demo_dir, "auto", threads=0)
    matched = matching_answers(conversation_answers(model), reference)
    assert matched >= MIN_MATCHING_CONVERSATIONS, (
        f"auto chose {model.dtype}, which answers {matched} of {len(CONVERSATIONS)} "
        "conversations like float32"
    )
