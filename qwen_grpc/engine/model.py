"""Loading a causal LM for CPU inference and running batched forward passes on it.

Only the engine thread calls :class:`LoadedModel`'s forward methods; loading happens before
that thread starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from qwen_grpc.engine.fast_linear import can_pack_bf16, pack_bf16_linears
from qwen_grpc.engine.head import LogitsHead, bf16_rows
from qwen_grpc.engine.kv_cache import BatchKVCache
from qwen_grpc.engine.quantize import Int8Linear, quantize_int8

_LOGGER = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """bf16 halves memory traffic, but only pays off where the CPU computes it natively."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> str:
    """``auto`` becomes the fastest precision this CPU runs without loss of answers."""
    if name != "auto":
        return name
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@dataclass
class LoadedModel:
    """A model and tokenizer ready for batched generation."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    generation_config: GenerationConfig
    dtype: str
    context_length: int
    vocab_size: int
    stop_token_ids: frozenset[int]
    head: LogitsHead

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits ``[len, vocab]`` for every position, computed the way generation does.

        For quality checks: compare next-token choices across precisions.
        """
        out = self.model.base_model(input_ids=torch.tensor([token_ids]), use_cache=False)
        return self.head(out.last_hidden_state[0])

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, BatchKVCache, torch.Tensor]:
        """Runs prompts left-padded in one pass.

        Returns the last position's logits (float32, ``[batch, vocab]``), the filled cache and
        the attention mask (``[batch, width]``) that the decode steps extend.
        """
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = BatchKVCache(self.num_layers)
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        return self.head(out.last_hidden_state[:, -1, :]), cache, mask

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, cache: BatchKVCache, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One decode step for every row; ``mask`` already includes the new column."""
        out = self.model.base_model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=mask,
            position_ids=positions.unsqueeze(-1),
            cache=cache,
            use_cache=True,
        )
        return self.head(out.last_hidden_state[:, -1, :])


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


def release_checkpoint_mapping(model: torch.nn.Module) -> None:
    """Copies the tensors still viewing the memory-mapped checkpoint, so it can be unmapped.

    transformers maps safetensors files and hands out zero-copy views; after packing, the few
    tensors left (embedding, norms) would otherwise keep every page of the file resident.
    """
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buffer.clone(), persistent=persistent)


def _build_head(model: PreTrainedModel, precision: str) -> LogitsHead:
    """Prepares the layers for the precision and returns the logits head to use.

    float32 is the reference and stays as transformers runs it. bfloat16 packs the linears
    for oneDNN; int8 quantizes them. Both rank the vocabulary with an int8 head and recompute
    the top candidates exactly from the model's rows (bf16 weights, or int8 in int8 mode).
    """
    if precision == "float32":
        return LogitsHead(model.get_output_embeddings())
    if precision == "int8":
        model = quantize_int8(model)
        head = model.get_output_embeddings()
        release_checkpoint_mapping(model)
        if isinstance(head, Int8Linear):
            return LogitsHead(head, exact_rows=head.rows)
        return LogitsHead(head, exact_rows=bf16_rows(head.weight))
    head = model.get_output_embeddings()
    if can_pack_bf16():
        pack_bf16_linears(model, skip=head)
    release_checkpoint_mapping(model)
    return LogitsHead(head, exact_rows=bf16_rows(head.weight))


def load_model(path: Path, dtype: str, threads: int) -> LoadedModel:
    """Loads weights with low peak memory in the requested precision."""
    if threads > 0:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    resolved = resolve_dtype(dtype)
    torch_dtype = torch.float32 if resolved == "float32" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, low_cpu_mem_usage=True)
    model.eval()
    head = _build_head(model, resolved)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = GenerationConfig()
    context_length = int(getattr(model.config, "max_position_embeddings", 2048))
    _LOGGER.info(
        "loaded %s as %s in %.1f s (context %d, %d threads)",
        path,
        resolved,
        time.perf_counter() - started,
        context_length,
        torch.get_num_threads(),
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        generation_config=generation_config,
        dtype=resolved,
        context_length=context_length,
        vocab_size=int(model.config.vocab_size),
        stop_token_ids=_stop_token_ids(tokenizer, generation_config),
        head=head,
    )
