"""int8 weights for CPU decode: per-output-channel int8 linears with dynamic activations.

Decode is memory-bandwidth bound; fbgemm's int8 dynamic linear streams weights about three times
faster than torch's fp32/bf16 GEMV on this class of CPU, so int8 is the single-stream lever.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

_LOGGER = logging.getLogger(__name__)


def _untie_lm_head(model: PreTrainedModel) -> None:
    """Gives ``lm_head`` its own weight so quantizing it leaves the embedding table intact."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embedding.weight.data_ptr():
        return
    untied = nn.Linear(head.in_features, head.out_features, bias=False)
    untied.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.set_output_embeddings(untied)
    model.config.tie_word_embeddings = False


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Quantizes every linear layer, ``lm_head`` included, in place."""
    model = model.float()
    _untie_lm_head(model)
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        quantized = torch.ao.quantization.quantize_dynamic(
            model,
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
    _LOGGER.info("quantized linear layers to int8 (fbgemm, per output channel)")
    return quantized
