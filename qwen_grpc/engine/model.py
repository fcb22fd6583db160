"""Loading a causal LM for CPU inference and running batched forward passes on it.

Only the engine thread calls :class:`LoadedModel`'s forward methods; loading happens before
that thread starts.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from qwen_grpc.engine.cpu import cpu_info
from qwen_grpc.engine.decoder import Decoder, LayerCallback, UnsupportedModelError, build_decoder
from qwen_grpc.engine.fidelity import CALIBRATION_CHATS, PrecisionChoice, choose_precision
from qwen_grpc.engine.head import LogitsHead
from qwen_grpc.engine.kv_cache import BLOCK_TOKENS, KVRow, PagedKVCache
from qwen_grpc.engine.memory import map_large_blocks, release_free_memory
from qwen_grpc.engine.precision import candidate_precisions, prepare_weights
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.step_plan import Segment, StepPlan, plan_step

_LOGGER = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer ready for batched generation."""

    decoder: Decoder
    tokenizer: PreTrainedTokenizerBase
    generation_config: GenerationConfig
    dtype: str
    context_length: int
    vocab_size: int
    stop_token_ids: frozenset[int]
    head: LogitsHead

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def new_cache(self, tokens: int) -> PagedKVCache:
        """A cache for ``tokens`` keys and values per layer, stored as the precision prescribes."""
        shape = self.decoder.shape
        return PagedKVCache(
            self.num_layers, shape.kv_heads, shape.head_dim, self.decoder.kv_dtype, tokens
        )

    @torch.inference_mode()
    def step(
        self, plan: StepPlan, cache: PagedKVCache, on_layer: LayerCallback | None = None
    ) -> torch.Tensor:
        """One forward pass over a planned batch: float32 logits ``[wanted tokens, vocab]``.

        The rows' lengths are the caller's to advance (:meth:`StepPlan.commit`) once it
        succeeded; ``on_layer`` is called after every layer.
        """
        return self.head(self.decoder(plan, cache, on_layer))

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits ``[len, vocab]`` for every position, computed the way generation does.

        For quality checks: compare next-token choices across precisions.
        """
        cache = self.new_cache(len(token_ids))
        segment = Segment(cache.open_row(len(token_ids)), token_ids, logits_from=0)
        return self.step(plan_step(cache, [segment]), cache)

    def prefill(
        self, prompts: list[list[int]], max_new_tokens: int
    ) -> tuple[torch.Tensor, PagedKVCache, list[KVRow]]:
        """Prompts in one pass, with room for ``max_new_tokens`` each to decode after them.

        For checks and profiles that drive generation by hand; the engine plans its own steps.
        Returns the next-token logits ``[len(prompts), vocab]``, the cache and its rows.
        """
        room = [len(p) + max_new_tokens for p in prompts]
        cache = self.new_cache(sum(PagedKVCache.blocks_for(n) * BLOCK_TOKENS for n in room))
        rows = [cache.open_row(n) for n in room]
        plan = plan_step(
            cache, [Segment.next_token(r, p) for r, p in zip(rows, prompts, strict=True)]
        )
        logits = self.step(plan, cache)
        plan.commit()
        return logits, cache, rows

    def decode(self, tokens: list[int], cache: PagedKVCache, rows: list[KVRow]) -> torch.Tensor:
        """One decode step of every row after :meth:`prefill`: logits ``[len(rows), vocab]``."""
        plan = plan_step(
            cache, [Segment.next_token(r, [t]) for r, t in zip(rows, tokens, strict=True)]
        )
        logits = self.step(plan, cache)
        plan.commit()
        return logits


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase, config: GenerationConfig) -> frozenset[int]:
    """End-of-turn ids from the generation config and the tokenizer; chat models often have two."""
    ids: set[int] = set()
    eos = config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


def _build(model: PreTrainedModel, precision: str, copy: bool = True) -> tuple[Decoder, LogitsHead]:
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or not isinstance(output, torch.nn.Linear):
        raise UnsupportedModelError("the model has no plain embedding table and output layer")
    if output.bias is not None:
        raise UnsupportedModelError("an output layer with a bias is not supported")
    weights = prepare_weights(embedding.weight.detach(), output.weight.detach(), precision, copy)
    decoder = build_decoder(
        model,
        weights.linear,
        weights.embedding,
        weights.compute_dtype,
        weights.kv_dtype,
        weights.residual_linear,
    )
    return decoder, weights.head


# bf16 and int8 are made from bf16 weights; auto needs float32's as its reference; q8
# quantizes the checkpoint's own values without a float32 copy of a bf16 checkpoint.
_LOAD_DTYPES: dict[str, torch.dtype | str] = {
    "auto": torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int8": torch.bfloat16,
    "q8": "auto",
}


def _loaded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    generation_config: GenerationConfig,
    precision: str,
    copy: bool = True,
) -> LoadedModel:
    decoder, head = _build(model, precision, copy)
    config = model.config
    return LoadedModel(
        decoder=decoder,
        tokenizer=tokenizer,
        generation_config=generation_config,
        dtype=precision,
        context_length=int(getattr(config, "max_position_embeddings", 2048)),
        vocab_size=int(config.vocab_size),
        stop_token_ids=_stop_token_ids(tokenizer, generation_config),
        head=head,
    )


def load_model(path: Path, dtype: str, threads: int) -> LoadedModel:
    """Loads weights with low peak memory in the requested precision (``auto``: see
    ``fidelity.py``)."""
    if threads > 0:
        torch.set_num_threads(threads)
    map_large_blocks()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = GenerationConfig()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_LOAD_DTYPES[dtype])

    loaded = functools.partial(_loaded, model, tokenizer, generation_config)
    cpu = cpu_info()
    if dtype == "auto":
        encoder = SharedTokenizer(tokenizer)
        result, choice = choose_precision(
            candidate_precisions(cpu),
            loaded,
            loaded("float32", copy=False),
            [encoder.encode_chat(chat) for chat in CALIBRATION_CHATS],
        )
    else:
        result, choice = loaded(dtype), PrecisionChoice(dtype, "as configured")
    # The decoder holds its own copies; dropping the model unmaps the checkpoint.
    del model, loaded
    release_free_memory()
    _LOGGER.info(
        "loaded %s in %.1f s (context %d, %d threads); CPU %s; precision %s: %s",
        path,
        time.perf_counter() - started,
        result.context_length,
        torch.get_num_threads(),
        cpu.describe(),
        choice.precision,
        choice.reason,
    )
    return result
