"""The fixed texts of the fidelity section, and their token ids under the model's own tokenizer.

Next-token agreement depends on the text: a small model is sure of itself on plain English
prose and near ties are common in code, chat markup and Chinese. So the section scores four
kinds of text of about 150 tokens each. Every engine is fed the very same ids (ours), so a
disagreement is the arithmetic's, never the tokenizers'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# The text of tests/test_precision.py (the bench does not import tests).
PARIS_HISTORY = (
    "The history of Paris spans more than two thousand years. Founded by a Celtic tribe called "
    "the Parisii on an island in the Seine, the settlement grew into a Roman town named "
    "Lutetia. In the Middle Ages it became the capital of the kingdom of France and one of the "
    "largest cities in Europe, home to a famous university and a great cathedral. During the "
    "nineteenth century the city was rebuilt with wide boulevards, parks and sewers, and it "
    "hosted several world fairs, one of which left behind the Eiffel Tower. Today Paris is a "
    "centre of finance, fashion, science and the arts, and millions of visitors come each year "
    "to see its museums, its churches and the river that runs through its heart."
)

CODING_CHAT: tuple[dict[str, str], ...] = (
    {
        "role": "system",
        "content": "You are a careful Python assistant. Answer with short, working code.",
    },
    {"role": "user", "content": "Write a function that counts the words in a text file."},
    {
        "role": "assistant",
        "content": (
            "Here is a small function:\n\n```python\ndef count_words(path: str) -> int:\n"
            '    """Counts the whitespace-separated words in a file."""\n'
            '    with open(path, encoding="utf-8") as handle:\n'
            "        return sum(len(line.split()) for line in handle)\n```\n\n"
            "It reads the file line by line, so even a large file does not have to fit in "
            'memory. Call it as `count_words("notes.txt")`.'
        ),
    },
)

CHINESE = (
    "北京是中国的首都，有三千多年的历史。故宫曾是明清两代的皇宫，"
    "现在是一座博物馆。长城在城市的北边，每年都有很多游客去参观。"
    "北京的烤鸭和老胡同也很有名，秋天是最好的旅行季节。"
)

TRAVEL_CHAT: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "I have one free day in Rome. What should I see?"},
    {
        "role": "assistant",
        "content": (
            "Start early at the Colosseum and the Roman Forum, which are next to each other. "
            "After lunch, walk to the Pantheon and the Trevi Fountain. In the evening, cross "
            "the river to Trastevere for dinner in one of its small squares."
        ),
    },
    {"role": "user", "content": "Is it better to walk or to take the metro?"},
    {
        "role": "assistant",
        "content": (
            "Walk. The sights in the centre are close together, and the metro does not reach "
            "most of them."
        ),
    },
)


@dataclass(frozen=True)
class FidelityText:
    """One scored text: its name in the results and the token ids every engine is fed."""

    name: str
    token_ids: tuple[int, ...]


def _chat_ids(tokenizer: PreTrainedTokenizerBase, chat: tuple[dict[str, str], ...]) -> list[int]:
    """The whole conversation, assistant turns included, rendered with the chat template."""
    encoded: Any = tokenizer.apply_chat_template(list(chat), tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def encode_texts(tokenizer: PreTrainedTokenizerBase) -> list[FidelityText]:
    """The four texts as token ids of ``tokenizer`` (prose plain, chats through the template)."""
    return [
        FidelityText("paris_history", tuple(tokenizer(PARIS_HISTORY)["input_ids"])),
        FidelityText("coding_chat", tuple(_chat_ids(tokenizer, CODING_CHAT))),
        FidelityText("chinese", tuple(tokenizer(CHINESE)["input_ids"])),
        FidelityText("travel_chat", tuple(_chat_ids(tokenizer, TRAVEL_CHAT))),
    ]
