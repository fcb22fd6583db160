"""The forward pass of a Llama-family decoder (Llama, Qwen2), written for serving.

transformers' modules cost a small model's decode step milliseconds of Python per step (per
layer they dispatch through attention registries, build masks and check options) and run
decode attention through a CPU kernel built for long queries. On this project's 2-core CPU a
Qwen1.5-0.5B bf16 decode step took 25.9 ms through them and 18.6 ms here, with the same linear
kernels (``python -m bench.profile_step``). In float32 this is transformers' arithmetic (the
logits are bit-identical on the demo model). In a reduced precision it departs from
transformers where transformers loses accuracy: the residual stream, the norms, the rotary
embedding, the SiLU gate and the softmax stay float32, as in llama.cpp, and only a matmul's
input is rounded. Adding residuals in bf16 flipped greedy answers of the demo model. The q/k/v
and gate/up projections are fused into one matrix each, and nothing else runs per layer.

A pass takes a flattened, ragged batch (``step_plan.py``): decode tokens of running sequences
and chunks of prompts side by side, so every projection reads its weights once per step, and
attention alone sorts tokens by sequence over the paged cache (``kv_cache.py``). The weights
come from a loaded transformers model, which can then be released.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional
from transformers import PreTrainedModel

from qwen_grpc.engine.kernels import paged_chunk_attention, paged_decode_attention
from qwen_grpc.engine.kv_cache import LayerPool, PagedKVCache
from qwen_grpc.engine.step_plan import Chunk, StepPlan

LinearFactory = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
LayerCallback = Callable[[], None]
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2"})


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is outside what :class:`Decoder` computes."""


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def rotated_width(self) -> int:
        """Leading columns of the fused q/k/v projection that hold queries and keys (the rest
        are values): the part the rotary embedding turns."""
        return (self.heads + self.kv_heads) * self.head_dim


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv: nn.Module
    output: nn.Module
    post_norm: torch.Tensor
    gate_up: nn.Module
    down: nn.Module


class Rotary:
    """Rotary position embedding with transformers' formula, all in float32."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float) -> None:
        self._inv_freq = inv_freq.float()
        self._scaling = scaling

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[tokens, 1, head_dim]`` (broadcast over heads) for ``positions [tokens]``."""
        angles = positions.unsqueeze(-1).float() * self._inv_freq
        doubled = torch.cat((angles, angles), dim=-1).unsqueeze(1)
        return doubled.cos() * self._scaling, doubled.sin() * self._scaling


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


class Decoder:
    """Hidden states for token ids, appending every layer's keys and values to a cache."""

    def __init__(
        self,
        embedding: nn.Module,
        layers: list[DecoderLayer],
        final_norm: torch.Tensor,
        rotary: Rotary,
        shape: AttentionShape,
        eps: float,
        compute_dtype: torch.dtype,
        kv_dtype: torch.dtype,
    ) -> None:
        self.embedding = embedding
        self.layers = layers
        self.final_norm = final_norm
        self.rotary = rotary
        self.shape = shape
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.kv_dtype = kv_dtype
        self._scale = 1.0 / math.sqrt(shape.head_dim)

    def __call__(
        self, plan: StepPlan, cache: PagedKVCache, on_layer: LayerCallback | None = None
    ) -> torch.Tensor:
        """Final hidden states ``[len(plan.logits_index), hidden]`` of the tokens whose logits
        are wanted; every token's keys and values are written to ``cache``. ``on_layer`` runs
        after each layer (the engine's watchdog tells a long prefill from a stuck one by it).
        """
        hidden = self.embedding(plan.input_ids).float()
        cos, sin = self.rotary.tables(plan.positions)
        last = len(self.layers) - 1
        for index, (layer, pool) in enumerate(zip(self.layers, cache.layers, strict=True)):
            hidden = hidden + self._attend(layer, pool, plan, hidden, cos, sin)
            if index == last:
                # Only the wanted tokens go on: the other tokens' keys and values are written.
                hidden = hidden[plan.logits_index]
            gate, up = (
                layer.gate_up(self._norm(hidden, layer.post_norm).to(self.compute_dtype))
                .float()
                .chunk(2, dim=-1)
            )
            hidden = hidden + layer.down((functional.silu(gate) * up).to(self.compute_dtype))
            if on_layer is not None:
                on_layer()
        return self._norm(hidden, self.final_norm)

    def _norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """float32 in and out: only a matmul's input is rounded to the compute dtype. The weight
        goes into torch's fused kernel, which gives the same bits as multiplying after it (and
        transformers' ``weight * normed``) in one operator instead of two."""
        return functional.rms_norm(hidden, (hidden.shape[-1],), weight, eps=self.eps)

    def _attend(
        self,
        layer: DecoderLayer,
        pool: LayerPool,
        plan: StepPlan,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        head_dim = self.shape.head_dim
        qkv = layer.qkv(self._norm(hidden, layer.input_norm).to(self.compute_dtype))
        width = self.shape.rotated_width
        # Queries and keys sit side by side in the fused projection: one rotation for both.
        rotated = _rotate(qkv[:, :width].float().view(tokens, -1, head_dim), cos, sin)
        queries, keys = rotated.split((self.shape.heads, self.shape.kv_heads), dim=1)
        values = qkv[:, width:].float().view(tokens, -1, head_dim)
        pool.write(plan.slots, keys, values)
        if plan.only_singles:
            attended = self._attend_singles(queries, pool, plan)
        else:
            attended = torch.empty_like(queries)
            if plan.single_index.numel():
                single = plan.single_index
                attended[single] = self._attend_singles(queries[single], pool, plan)
            for chunk in plan.chunks:
                span = slice(chunk.start, chunk.start + chunk.count)
                attended[span] = self._attend_chunk(
                    queries[span], keys[span], values[span], pool, chunk
                )
        return layer.output(attended.reshape(tokens, -1).to(self.compute_dtype))

    def _attend_singles(
        self, queries: torch.Tensor, pool: LayerPool, plan: StepPlan
    ) -> torch.Tensor:
        """One query per row over its blocks, the new token included: the paged decode kernel
        reads each row's own length (int8 or float pools), scores and softmax in float32."""
        keys, key_scales, values, value_scales = pool.operands()
        return paged_decode_attention(
            queries,
            keys,
            key_scales,
            values,
            value_scales,
            plan.single_table,
            plan.single_lengths,
            self._scale,
        )

    def _attend_chunk(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        pool: LayerPool,
        chunk: Chunk,
    ) -> torch.Tensor:
        """A chunk's queries ``[count, heads, head_dim]`` over the row's earlier tokens (in the
        cache) and the chunk's own float32 keys, causally, in float32 whatever the cache stores:
        a whole prompt in one chunk attends exactly as an unchunked prefill does."""
        pool_keys, key_scales, pool_values, value_scales = pool.operands()
        return paged_chunk_attention(
            queries,
            keys,
            values,
            pool_keys,
            key_scales,
            pool_values,
            value_scales,
            chunk.blocks,
            chunk.position,
            self._scale,
        )


def build_decoder(
    model: PreTrainedModel,
    linear: LinearFactory,
    embedding: nn.Module,
    compute_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    residual_linear: LinearFactory | None = None,
) -> Decoder:
    """Takes the weights out of a transformers Llama/Qwen2 model; ``linear`` picks the kernel,
    ``compute_dtype`` is what it expects as input, ``kv_dtype`` what the KV cache stores
    (``torch.int8``: quantized with a scale per token and head), and ``residual_linear``, if
    given, the kernel of the attention output and MLP down projections.

    Every projection is built from the model's weight as it is (fused with its siblings), so the
    caller can drop the transformers model afterwards.
    """
    config = model.config
    _check_supported(config)
    heads = int(config.num_attention_heads)
    shape = AttentionShape(
        heads=heads,
        kv_heads=int(config.num_key_value_heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    )
    blocks = model.get_submodule("model.layers")
    rotary = model.get_submodule("model.rotary_emb")
    inv_freq = rotary.get_buffer("inv_freq")
    return Decoder(
        embedding=embedding,
        layers=[
            _build_layer(block, linear, residual_linear or linear) for block in blocks.children()
        ],
        final_norm=_norm_weight(model, "model.norm"),
        rotary=Rotary(inv_freq, float(getattr(rotary, "attention_scaling", 1.0))),
        shape=shape,
        eps=float(config.rms_norm_eps),
        compute_dtype=compute_dtype,
        kv_dtype=kv_dtype,
    )


def _build_layer(
    block: nn.Module, linear: LinearFactory, residual_linear: LinearFactory
) -> DecoderLayer:
    projections = [_weight(block, f"self_attn.{name}_proj") for name in "qkv"]
    biases = [_bias(block, f"self_attn.{name}_proj") for name in "qkv"]
    qkv_bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
    gate_up = torch.cat([_weight(block, "mlp.gate_proj"), _weight(block, "mlp.up_proj")])
    return DecoderLayer(
        input_norm=_norm_weight(block, "input_layernorm"),
        qkv=linear(torch.cat(projections), qkv_bias),
        output=residual_linear(
            _weight(block, "self_attn.o_proj"), _bias(block, "self_attn.o_proj")
        ),
        post_norm=_norm_weight(block, "post_attention_layernorm"),
        gate_up=linear(gate_up, None),
        down=residual_linear(_weight(block, "mlp.down_proj"), None),
    )


def _weight(root: nn.Module, name: str) -> torch.Tensor:
    return root.get_parameter(f"{name}.weight").detach()


def _norm_weight(root: nn.Module, name: str) -> torch.Tensor:
    """A float32 copy: norms run on the float32 residual stream whatever the compute dtype."""
    return _weight(root, name).float().clone()


def _bias(root: nn.Module, name: str) -> torch.Tensor | None:
    bias = getattr(root.get_submodule(name), "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def _check_supported(config: object) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; expected one of "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("only SiLU-gated MLPs without bias are supported")
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise UnsupportedModelError("sliding-window attention is not supported")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = str(rope.get("rope_type", "default")) if isinstance(rope, dict) else "default"
    if rope_type in {"dynamic", "longrope"}:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} (position-dependent) is not supported"
        )
