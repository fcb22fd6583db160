"""Weights in the form each precision computes with: linear kernels, embedding table, head.

Every precision keeps the residual stream, norms, rotary embedding and softmax in float32
(as llama.cpp does); the precision is what a matmul reads: its weights and its input.

* ``float32``: plain ``F.linear``, exact logits. The reference the others are measured against.
* ``bfloat16``: linears packed for oneDNN (bit-identical to ``F.linear``, 3-4x faster GEMV on
  AVX512-BF16); an int8 head ranks the vocabulary and the top logits are recomputed from the
  bf16 rows (see ``head.py``).
* ``q8``: llama.cpp's Q8_0 (int8 weights and activations in blocks of 32) for every linear,
  the head and the embedding, through the native kernel (see ``q8.py``), and an int8 KV
  cache with a scale per token and head.
* ``int8``: per-channel int8 weights (``quantize.py``) for every linear and the embedding; a
  tied head ranks with the same int8 table it recomputes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from qwen_grpc.engine.cpu import CpuInfo
from qwen_grpc.engine.decoder import LinearFactory
from qwen_grpc.engine.fast_linear import DenseLinear, PackedBf16Linear, can_pack_bf16
from qwen_grpc.engine.head import ExactHead, LogitsHead, RankedHead
from qwen_grpc.engine.kernels import native_available, pack_bf16, quantize_q8
from qwen_grpc.engine.q8 import Q8Head, Q8Linear, Q8Table, q8_fits
from qwen_grpc.engine.quantize import Int8Linear, Int8Table, int8_kernel_fits, int8_rows

PRECISIONS = ("float32", "bfloat16", "q8", "int8")


class DenseTable(nn.Module):
    """An embedding table in the compute dtype, also the exact rows of a tied head."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.weight[index].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return functional.embedding(input_ids, self.weight)


@dataclass
class PreparedWeights:
    """What :func:`build_decoder` and the logits head need, in one precision."""

    linear: LinearFactory
    embedding: nn.Module
    head: LogitsHead
    compute_dtype: torch.dtype
    """What a linear reads as input."""
    kv_dtype: torch.dtype
    """What the KV cache stores; ``torch.int8`` with a scale per token and head (q8)."""
    residual_linear: LinearFactory | None = None
    """The kernel of the projections whose output is added to the residual stream (attention
    output, MLP down), where it differs from ``linear``."""


def _dense(copy: bool) -> LinearFactory:
    """Copies unless asked not to, so nothing keeps the memory-mapped checkpoint alive once the
    model is dropped; a short-lived reference (see ``fidelity.py``) shares the model's tensors."""

    def build(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if not copy:
            return DenseLinear(weight, bias)
        return DenseLinear(weight.clone(), None if bias is None else bias.clone())

    return build


class Bf16Fp32Linear(nn.Module):
    """bf16 weights times float32 activations, float32 out (``kernels.pack_bf16``).

    oneDNN's bf16 linear rounds its output to bf16, and added to the residual stream that
    rounding cost the demo model 8 of 588 greedy choices against llama.cpp BF16's 6; with
    this kernel on the two projections that write the residual stream, 4. It is 2.6x slower
    than oneDNN at 8 rows, so the other projections keep oneDNN.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = pack_bf16(weight.to(torch.bfloat16), None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x)


def _bf16_fp32_out(other: LinearFactory) -> LinearFactory:
    def build(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if weight.shape[1] % 16:  # the kernel's K granularity
            return other(weight, bias)
        return Bf16Fp32Linear(weight, bias)

    return build


def _packed_bf16(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return PackedBf16Linear(weight, None if bias is None else bias.clone())


def _int8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if int8_kernel_fits(weight):
        return Int8Linear(weight, bias, torch.bfloat16)
    return DenseLinear(weight.to(torch.bfloat16, copy=True), _converted(bias, torch.bfloat16))


def _q8(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if q8_fits(weight):
        return Q8Linear(weight, bias)
    return DenseLinear(weight.float().clone(), None if bias is None else bias.float().clone())


def _converted(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype, copy=True)


def candidate_precisions(cpu: CpuInfo) -> list[str]:
    """The precisions ``auto`` may pick on this CPU, fastest first; float32 is always last."""
    faster = ["q8"] if native_available() else []
    if cpu.native_bf16:
        faster.append("bfloat16")
    return [*faster, "float32"]


def prepare_weights(
    embedding_weight: torch.Tensor, head_weight: torch.Tensor, precision: str, copy: bool = True
) -> PreparedWeights:
    """Builds the embedding and head once, sharing one table when the model ties them."""
    tied = head_weight.data_ptr() == embedding_weight.data_ptr()
    if precision == "int8":
        table = Int8Table(embedding_weight, torch.bfloat16)
        head_table = table if tied else Int8Table(head_weight, torch.bfloat16)
        head = RankedHead(head_table.values, head_table.scales, head_table.rows)
        return PreparedWeights(_int8, table, head, torch.bfloat16, torch.bfloat16)
    if precision == "q8":
        if not q8_fits(embedding_weight):
            raise ValueError("q8 needs a hidden size that is a multiple of 32")
        q8_table = quantize_q8(embedding_weight)
        q8_head = q8_table if tied else quantize_q8(head_weight)
        return PreparedWeights(_q8, Q8Table(q8_table), Q8Head(q8_head), torch.float32, torch.int8)
    if precision == "float32":
        dense = DenseTable(embedding_weight.float().clone() if copy else embedding_weight.float())
        head_dense = dense if tied else DenseTable(head_weight.float().clone())
        return PreparedWeights(
            _dense(copy), dense, ExactHead(head_dense.weight), torch.float32, torch.float32
        )
    if precision != "bfloat16":
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    dense = DenseTable(embedding_weight.to(torch.bfloat16, copy=True))
    head_dense = dense if tied else DenseTable(head_weight.to(torch.bfloat16, copy=True))
    linear: LinearFactory = _packed_bf16 if can_pack_bf16() else _dense_bf16
    residual = _bf16_fp32_out(linear) if native_available() else linear
    head = RankedHead(*int8_rows(head_dense.weight), head_dense.rows)
    return PreparedWeights(linear, dense, head, torch.bfloat16, torch.bfloat16, residual)


def _dense_bf16(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return DenseLinear(weight.to(torch.bfloat16, copy=True), _converted(bias, torch.bfloat16))
