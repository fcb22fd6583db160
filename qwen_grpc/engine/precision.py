"""Weights in the form each precision computes with: linear kernels, embedding table, head.

* ``float32``: plain ``F.linear``, exact logits. The reference the others are measured against.
* ``bfloat16``: linears packed for oneDNN (bit-identical to ``F.linear``, 3-4x faster GEMV on
  AVX512-BF16); an int8 head ranks the vocabulary and the top logits are recomputed from the
  bf16 rows (see ``head.py``).
* ``int8``: per-channel int8 weights (``quantize.py``) for every linear and the embedding; a
  tied head ranks with the same int8 table it recomputes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from qwen_grpc.engine.decoder import LinearFactory
from qwen_grpc.engine.fast_linear import DenseLinear, PackedBf16Linear, can_pack_bf16
from qwen_grpc.engine.head import ExactHead, LogitsHead, RankedHead
from qwen_grpc.engine.quantize import Int8Linear, Int8Table, int8_kernel_fits, int8_rows


class DenseTable(nn.Module):
    """An embedding table in the model's dtype, also the exact rows of a tied head."""

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


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Copies, so nothing keeps the memory-mapped checkpoint alive once the model is dropped."""
    return DenseLinear(weight.clone(), None if bias is None else bias.clone())


def _packed_bf16(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    return PackedBf16Linear(weight, None if bias is None else bias.clone())


def _int8(dtype: torch.dtype) -> LinearFactory:
    def build(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if int8_kernel_fits(weight):
            return Int8Linear(weight, bias, dtype)
        return _dense(weight, bias)

    return build


def prepare_weights(
    embedding_weight: torch.Tensor, head_weight: torch.Tensor, precision: str
) -> PreparedWeights:
    """Builds the embedding and head once, sharing one table when the model ties them."""
    tied = head_weight.data_ptr() == embedding_weight.data_ptr()
    dtype = embedding_weight.dtype
    if precision == "int8":
        table = Int8Table(embedding_weight, dtype)
        head_table = table if tied else Int8Table(head_weight, dtype)
        return PreparedWeights(
            _int8(dtype), table, RankedHead(head_table.values, head_table.scales, head_table.rows)
        )
    dense = DenseTable(embedding_weight.clone())
    head_dense = dense if tied else DenseTable(head_weight.clone())
    if precision == "float32":
        return PreparedWeights(_dense, dense, ExactHead(head_dense.weight))
    linear: LinearFactory = _packed_bf16 if can_pack_bf16() else _dense
    return PreparedWeights(
        linear, dense, RankedHead(*int8_rows(head_dense.weight), head_dense.rows)
    )
