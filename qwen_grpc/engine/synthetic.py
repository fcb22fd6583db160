"""Random-weight Qwen2 checkpoints with Qwen's real tokenizer, for tests and benchmarks.

Tests and CI reach only package registries, never a model hub, yet the engine
must be exercised with exactly the tokenizer production uses (byte-level BPE
over 151,643 tokens, ChatML special tokens, Chinese and emoji spanning several
tokens). The official ``dashscope`` wheel on PyPI ships Qwen's BPE ranks as
``dashscope/resources/qwen.tiktoken``; this module converts them into a
``Qwen2Tokenizer`` identical to the one ``transformers`` builds from
Qwen1.5-0.5B-Chat's own ``tokenizer.json``, and pairs it with random weights:

* ``"tiny"`` -- a 2-layer, 64-wide model (~10 M parameters, almost all in the
  151,936-row embedding): builds in a few seconds, for unit and server tests;
* ``"qwen1.5-0.5b"`` -- Qwen1.5-0.5B's exact config, so benchmarks pay the
  same compute and memory bandwidth as production; only the words are
  meaningless.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .sources import (
    ModelSourceError,
    _exclusive_lock,
    _fsync_tree,
    _publishable_permissions,
    _unique_build_dir,
    verify_model_dir,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config

__all__ = [
    "CHAT_TEMPLATE",
    "ENDOFTEXT",
    "ENDOFTEXT_ID",
    "IM_END",
    "IM_END_ID",
    "IM_START",
    "IM_START_ID",
    "QWEN_PRETOKENIZE_PATTERN",
    "SHAPES",
    "Shape",
    "ShapeSpec",
    "build_qwen_tokenizer",
    "build_random_qwen",
    "qwen_config",
]

_LOGGER = logging.getLogger(__name__)

Shape = Literal["tiny", "kv-heavy", "qwen1.5-0.5b"]

# The vocabulary wheel is pinned by version and content hash, like the Makefile.
_VOCAB_WHEEL = "dashscope-2.0.2-py3-none-any.whl"
_VOCAB_WHEEL_SHA256 = "0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258"
_VOCAB_MEMBER = "dashscope/resources/qwen.tiktoken"
_VOCAB_RANKS = 151_643
"""Regular (BPE) tokens in qwen.tiktoken: ids 0 .. 151642."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151_643, 151_644, 151_645
_SPECIAL_TOKENS = {ENDOFTEXT_ID: ENDOFTEXT, IM_START_ID: IM_START, IM_END_ID: IM_END}

# Qwen's pre-tokenizer: GPT-4-like, but digits are split one by one (\p{N}).
# Identical to transformers' qwen2 PRETOKENIZE_REGEX and Qwen's tiktoken PAT_STR.
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen1.5-Chat's ChatML template, verbatim from its tokenizer_config.json.

Note the default system prompt has no final period in Qwen1.5 (Qwen2 added
one); keeping it verbatim keeps prompt token counts equal to production.
"""

_MARKER_FILE = "qwen_grpc_synthetic.json"


@dataclass(frozen=True)
class ShapeSpec:
    """Architecture numbers; everything else is Qwen1.5-0.5B-Chat's config."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    save_dtype: str


SHAPES: dict[str, ShapeSpec] = {
    # ~10 M parameters (9.7 M of them the embedding), float32, ~40 MB.
    "tiny": ShapeSpec(64, 2, 4, 2, 128, 2048, "float32"),
    # KV memory out of proportion to compute (16 KB of float32 keys and values per token, 5 %
    # of Qwen1.5-0.5B's compute per token): memory tests see the cache in RSS within seconds.
    "kv-heavy": ShapeSpec(512, 4, 8, 8, 128, 8192, "float32"),
    # Qwen1.5-0.5B: 464 M parameters, bfloat16 like the published checkpoint, ~0.93 GB.
    "qwen1.5-0.5b": ShapeSpec(1024, 24, 16, 16, 2816, 32768, "bfloat16"),
}


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def build_qwen_tokenizer(cache_dir: Path) -> PreTrainedTokenizerFast:
    """Build Qwen1.5-Chat's tokenizer from ``qwen.tiktoken`` in the dashscope wheel.

    The wheel is read in place (``zipfile``); nothing is installed. The BPE
    ranks are turned into a vocabulary and merge list by transformers'
    ``TikTokenConverter`` and handed to ``Qwen2Tokenizer`` -- the class
    transformers 5.x itself rebuilds production's ``tokenizer.json`` into --
    with Qwen1.5-Chat's tokenizer_config (special tokens at 151643-151645,
    eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk, NFC normalization,
    ChatML template). Encodings match Qwen's reference tiktoken implementation.

    Args:
        cache_dir: The service cache; the wheel is ``cache_dir/wheels/dashscope-2.0.2-...whl``
            (fetched by ``make models``).

    Raises:
        ModelSourceError: the wheel is missing or is not the pinned file.
    """
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    started = time.monotonic()
    ranks = _load_qwen_ranks(Path(cache_dir).expanduser() / "wheels" / _VOCAB_WHEEL)

    class _RanksConverter(TikTokenConverter):
        """TikTokenConverter fed from memory instead of a file path.

        ``tiktoken.load.load_tiktoken_bpe`` caches every file it reads under
        ``$TMPDIR/data-gym-cache`` keyed by *path*, so reading from a temporary
        file would leak a 2.5 MB copy per call (and could serve stale bytes
        for a reused path). The ranks are parsed exactly as tiktoken does.
        """

        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    converter = _RanksConverter(
        vocab_file=_VOCAB_MEMBER,
        pattern=QWEN_PRETOKENIZE_PATTERN,
        extra_special_tokens=list(_SPECIAL_TOKENS.values()),
    )
    vocab, merges = converter.extract_vocab_merges_from_model(_VOCAB_MEMBER)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder={
            token_id: AddedToken(text, special=True, normalized=False)
            for token_id, text in _SPECIAL_TOKENS.items()
        },
        extra_special_tokens=[IM_START, IM_END],
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,  # type: ignore[arg-type]  # Qwen1.5 has no unk token
        bos_token=None,
        model_max_length=SHAPES["qwen1.5-0.5b"].max_position_embeddings,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids(list(_SPECIAL_TOKENS.values()))
    if ids != list(_SPECIAL_TOKENS) or len(tokenizer) != _VOCAB_RANKS + len(_SPECIAL_TOKENS):
        raise RuntimeError(f"Qwen tokenizer special tokens landed at {ids}, len {len(tokenizer)}")
    _LOGGER.debug("built Qwen tokenizer in %.2f s", time.monotonic() - started)
    return tokenizer


def _load_qwen_ranks(wheel: Path) -> dict[bytes, int]:
    """Read and check ``qwen.tiktoken`` (base64 token, space, rank per line)."""
    if not wheel.is_file():
        raise ModelSourceError(
            f"Qwen's tokenizer vocabulary needs {wheel}, which is missing. Run `make models` "
            f"(pip download --no-deps dashscope==2.0.2 into {wheel.parent}), or set "
            "QWEN_GRPC_CACHE_DIR to the cache folder that holds wheels/."
        )
    payload = wheel.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != _VOCAB_WHEEL_SHA256:
        raise ModelSourceError(
            f"{wheel} has sha256 {digest}, expected {_VOCAB_WHEEL_SHA256}: not the pinned "
            "dashscope 2.0.2 wheel. Delete it and run `make models`."
        )
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        contents = archive.read(_VOCAB_MEMBER)
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in contents.splitlines() if line)
    }
    if sorted(ranks.values()) != list(range(_VOCAB_RANKS)):
        raise ModelSourceError(f"{_VOCAB_MEMBER} in {wheel} is not Qwen's 151,643-token vocabulary")
    return ranks


# --------------------------------------------------------------------------
# Random-weight checkpoints
# --------------------------------------------------------------------------


def build_random_qwen(out_dir: Path, cache_dir: Path, shape: Shape, seed: int = 0) -> Path:
    """Write a random-weight Qwen2 checkpoint with Qwen's tokenizer to ``out_dir``.

    Building happens in a temporary sibling folder that is renamed into place,
    so ``out_dir`` is either absent or complete; an existing complete build of
    the same shape and seed is returned as is (the same seed always gives the
    same weights, so a cached folder is as good as a rebuild).

    Args:
        out_dir: Destination folder (created; its parent too).
        cache_dir: The service cache holding ``wheels/`` (for the tokenizer).
        shape: ``"tiny"`` (float32, a few seconds) or ``"qwen1.5-0.5b"``
            (Qwen1.5-0.5B's exact architecture, saved in bfloat16, ~0.93 GB).
        seed: Seeds the weight initialisation.

    Raises:
        ValueError: unknown shape.
        FileExistsError: ``out_dir`` exists but is not a complete build of this shape and seed.
        ModelSourceError: the vocabulary wheel is missing or wrong.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; choose from {sorted(SHAPES)}")
    out_dir = Path(out_dir).expanduser().absolute()
    marker = {"shape": shape, "seed": seed, "vocab_wheel_sha256": _VOCAB_WHEEL_SHA256}
    if _is_complete(out_dir, marker):
        _LOGGER.info("reusing synthetic %s model at %s", shape, out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if _is_complete(out_dir, marker):  # built by another process while we waited
            return out_dir
        if out_dir.exists():
            raise FileExistsError(
                f"{out_dir} exists but is not a complete synthetic {shape} build with seed "
                f"{seed}; delete it or choose another folder"
            )
        for stale in out_dir.parent.glob(f".{out_dir.name}.build-*"):
            _LOGGER.warning("removing unfinished synthetic build %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        build = _unique_build_dir(out_dir)
        try:
            _write_checkpoint(build, cache_dir, shape, seed)
            (build / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", "utf-8")
            verify_model_dir(build, hint="The synthetic build wrote an incomplete folder.")
            _publishable_permissions(build, like=build / _MARKER_FILE)
            _fsync_tree(build)
            build.rename(out_dir)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    _LOGGER.info(
        "built synthetic %s model at %s in %.1f s", shape, out_dir, time.monotonic() - started
    )
    return out_dir


def _is_complete(out_dir: Path, marker: dict[str, Any]) -> bool:
    """An existing folder counts only if it is our build of the same shape and seed."""
    try:
        recorded = json.loads((out_dir / _MARKER_FILE).read_text("utf-8"))
        verify_model_dir(out_dir)
    except (OSError, ValueError, ModelSourceError):
        return False
    return bool(recorded == marker)


def qwen_config(shape: Shape) -> Qwen2Config:
    """Qwen1.5-0.5B-Chat's config.json with ``shape``'s architecture numbers."""
    from transformers import Qwen2Config

    spec = SHAPES[shape]
    return Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=151_936,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,
        sliding_window=spec.max_position_embeddings,
        max_window_layers=21,
        attention_dropout=0.0,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        dtype=spec.save_dtype,
    )


def _write_checkpoint(folder: Path, cache_dir: Path, shape: Shape, seed: int) -> None:
    """Create the model with seeded random weights and save it with its tokenizer.

    The model is created on the meta device (no memory, no transformers
    initialisation pass in float32) and materialised directly in the save
    dtype, then every tensor is filled from one seeded generator. For the
    0.5B shape that keeps the peak near one bfloat16 copy of the weights
    instead of a float32 model plus a bfloat16 copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = SHAPES[shape]
    config = qwen_config(shape)
    dtype = getattr(torch, spec.save_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    _init_weights(model, seed, std=config.initializer_range)
    model.tie_weights()
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
    )
    model.save_pretrained(folder)  # safetensors; tied lm_head is not written twice
    del model

    tokenizer = build_qwen_tokenizer(cache_dir)
    tokenizer.model_max_length = spec.max_position_embeddings
    tokenizer.save_pretrained(folder)


def _init_weights(model: torch.nn.Module, seed: int, *, std: float) -> None:
    """Deterministic init: N(0, std) matrices and embeddings, ones for norms, zeros for biases.

    Done by hand because parameters materialised by ``to_empty`` hold garbage
    and transformers' own initialisation differs between versions; one
    explicit generator makes a seed mean the same weights everywhere.
    Non-persistent buffers (RoPE ``inv_freq``) are left alone: they are not
    saved, and ``from_pretrained`` recomputes them.
    """
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
