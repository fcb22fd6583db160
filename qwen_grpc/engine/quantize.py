"""int8 weights for CPU decode: per-output-channel int8 linears with dynamic activations.

Decode is memory-bandwidth bound; fbgemm's int8 dynamic linear streams weights about three times
faster than torch's fp32/bf16 GEMV on this class of CPU, so int8 is the single-stream lever.

Memory stays low because the model is loaded in bf16 and each linear is widened to fp32 only
for the moment it is quantized; the embedding table (a third of Qwen1.5-0.5B) stays bf16 and
widens just the rows it looks up.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torch.ao.quantization import per_channel_dynamic_qconfig
from transformers import PreTrainedModel

_LOGGER = logging.getLogger(__name__)


class WideningEmbedding(nn.Module):
    """A bf16 embedding table whose lookups come out in fp32 for the quantized layers."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(table.to(torch.bfloat16), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight).float()


def _quantized(linear: nn.Linear) -> nn.Module:
    widened = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    widened.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
    if linear.bias is not None:
        widened.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    widened.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
    return quantized_dynamic.Linear.from_float(widened)


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Quantizes every linear layer, ``lm_head`` included, one at a time, in place.

    ``lm_head`` is tied to the embedding in Qwen1.5-0.5B; it gets its own int8 copy while the
    embedding keeps full-precision rows for lookups.
    """
    torch.backends.quantized.engine = "fbgemm"
    embedding = model.get_input_embeddings()
    table = embedding.weight.detach()
    linears = [
        (name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)
    ]
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(linear))
    model.set_input_embeddings(WideningEmbedding(table))
    model.config.tie_word_embeddings = False
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            if parameter is not model.get_input_embeddings().weight:
                parameter.data = parameter.data.float()
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            parent_name, _, child = name.rpartition(".")
            owner = model.get_submodule(parent_name) if parent_name else model
            setattr(owner, child, buffer.float())
    _LOGGER.info("quantized %d linear layers to int8 (fbgemm, per output channel)", len(linears))
    return model
