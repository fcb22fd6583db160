"""Qwen's real tokenizer from the dashscope wheel, and random-weight Qwen2 checkpoints."""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from qwen_grpc.engine.sources import ModelSourceError
from qwen_grpc.engine.synthetic import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    QWEN_PRETOKENIZE_PATTERN,
    build_qwen_tokenizer,
    build_random_qwen,
    qwen_config,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB_WHEEL = "dashscope-2.0.2-py3-none-any.whl"

SAMPLES = [
    "Hello world",
    "你好，世界！今天天气怎么样？我想去北京看看天安门。",
    "Emoji: 👍🏽 🇨🇳 👨‍👩‍👧‍👦 😀😃🤖 — done.",
    "数字 12345 and English mixed 混合文本 with   spaces\n\n\ttabs",
    "def f(x):\n    return x ** 2  # 平方\n",
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский.",
]


@pytest.fixture(scope="module")
def wheel_cache() -> Path:
    """The cache `make models` filled (QWEN_GRPC_CACHE_DIR, default <repo>/.cache)."""
    cache = Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO_ROOT / ".cache"))
    if not (cache / "wheels" / VOCAB_WHEEL).is_file():
        pytest.skip(f"{cache / 'wheels' / VOCAB_WHEEL} missing: run `make models`")
    return cache


@pytest.fixture(scope="module")
def tokenizer(wheel_cache: Path) -> Any:
    return build_qwen_tokenizer(wheel_cache)


@pytest.fixture(scope="module")
def tiny_dir(wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    started = time.monotonic()
    path = build_random_qwen(out, wheel_cache, "tiny", seed=0)
    assert time.monotonic() - started < 30.0
    return path


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_chinese_and_emoji_span_several_tokens(tokenizer: Any) -> None:
    """Why streaming must buffer: one character can be several byte-level tokens."""
    ids = tokenizer.encode("👨‍👩‍👧‍👦", add_special_tokens=False)
    assert len(ids) > 1
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) != "👨‍👩‍👧‍👦"  # single tokens decode to replacement chars
    assert tokenizer.decode(ids) == "👨‍👩‍👧‍👦"


def test_known_qwen_token_ids(tokenizer: Any) -> None:
    """Reference ids from Qwen's published tokenizer (shared by Qwen1.5/2/2.5)."""
    assert tokenizer.encode("Hello", add_special_tokens=False) == [9707]
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tokenizer.encode("你好", add_special_tokens=False) == [108386]
    assert tokenizer.encode("What is the capital of France?", add_special_tokens=False) == [
        3838,
        374,
        279,
        6722,
        315,
        9625,
        30,
    ]
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert tokenizer.encode(prompt, add_special_tokens=False) == [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
    ]


def test_special_tokens(tokenizer: Any) -> None:
    assert len(tokenizer) == 151_646
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        ENDOFTEXT_ID,
        IM_START_ID,
        IM_END_ID,
    ]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == IM_END_ID
    assert tokenizer.pad_token_id == ENDOFTEXT_ID
    assert tokenizer.bos_token is None
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode(
        "hi", add_special_tokens=False
    )
    assert tokenizer.decode([9707, IM_END_ID], skip_special_tokens=True) == "Hello"


def test_matches_qwen_reference_tiktoken(
    tokenizer: Any, wheel_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen's original tokenizer *is* tiktoken over these ranks with this pattern."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # don't let tiktoken cache the temp file
    vocab_file = tmp_path / "qwen.tiktoken"
    with zipfile.ZipFile(wheel_cache / "wheels" / VOCAB_WHEEL) as archive:
        vocab_file.write_bytes(archive.read("dashscope/resources/qwen.tiktoken"))
    reference = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN_PRETOKENIZE_PATTERN,
        mergeable_ranks=tiktoken_load.load_tiktoken_bpe(str(vocab_file)),
        special_tokens={
            "<|endoftext|>": ENDOFTEXT_ID,
            "<|im_start|>": IM_START_ID,
            "<|im_end|>": IM_END_ID,
        },
    )
    text = "\n".join(SAMPLES) + "<|im_start|>user\nhi<|im_end|>\n"
    text += Path(__file__).read_text("utf-8")
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(
        text, allowed_special="all"
    )


def test_chat_template_is_qwen15_chatml(tokenizer: Any) -> None:
    user = [{"role": "user", "content": "你好"}]
    text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    text = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
    encoded = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)
    assert encoded["input_ids"][0] == IM_START_ID
    assert encoded["input_ids"][-3:] == [IM_START_ID, 77091, 198]  # "assistant", "\n"


def test_missing_vocab_wheel_names_make_models(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="make models"):
        build_qwen_tokenizer(tmp_path)


def test_altered_vocab_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / VOCAB_WHEEL).write_bytes(b"nope")
    with pytest.raises(ModelSourceError, match="sha256"):
        build_qwen_tokenizer(tmp_path)


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------


def test_tiny_model_loads_and_generates(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 151_936)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.max_position_embeddings == 2048
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generation = GenerationConfig.from_pretrained(tiny_dir)
    assert generation.eos_token_id == [IM_END_ID, ENDOFTEXT_ID]
    assert generation.pad_token_id == ENDOFTEXT_ID

    inputs: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "写一首诗 🌸"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 8
    assert all(0 <= int(t) < 151_936 for t in new_tokens)
    assert "<|im_start|>" in tokenizer.decode(output[0])


def test_tiny_build_is_reused_and_seeded(tiny_dir: Path, wheel_cache: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    assert build_random_qwen(tiny_dir, wheel_cache, "tiny", seed=0) == tiny_dir
    assert time.monotonic() - started < 1.0

    same_seed = build_random_qwen(tmp_path / "again", wheel_cache, "tiny", seed=0)
    other_seed = build_random_qwen(tmp_path / "other", wheel_cache, "tiny", seed=1)

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(same_seed) == digest(tiny_dir)
    assert digest(other_seed) != digest(tiny_dir)
    assert [p.name for p in tmp_path.iterdir() if ".build-" in p.name] == []


def test_existing_folder_of_another_build_is_not_overwritten(
    tiny_dir: Path, wheel_cache: Path
) -> None:
    with pytest.raises(FileExistsError):
        build_random_qwen(tiny_dir, wheel_cache, "tiny", seed=7)


def test_qwen15_shape_is_exact() -> None:
    """Qwen1.5-0.5B's architecture, checked without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    config = qwen_config("qwen1.5-0.5b")
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        1024,
        24,
        2816,
    )
    assert (config.num_attention_heads, config.num_key_value_heads) == (16, 16)
    assert config.vocab_size == 151_936
    assert config.tie_word_embeddings is True
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert config.max_position_embeddings == 32_768
    assert config.rms_norm_eps == 1e-6
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == 463_987_712  # Qwen1.5-0.5B's published parameter count


def test_unknown_shape_is_rejected(tmp_path: Path, wheel_cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        build_random_qwen(tmp_path / "x", wheel_cache, "huge", seed=0)  # type: ignore[arg-type]
