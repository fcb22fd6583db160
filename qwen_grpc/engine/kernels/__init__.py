"""Q8_0 weights (llama.cpp's block int8 format) and their linear and row gather.

Decode on CPU is memory-bandwidth bound: Q8_0 reads 1.125 bytes per weight instead of bf16's
2, and with activations quantized per block of 32 the products are exact int8 dot products,
so the error is llama.cpp's Q8_0 error and nothing more. On CPUs with AVX512-VNNI or AVX2 a
C++ extension (``q8.cpp``) runs the matmul (batches of 4+ rows on AMX-INT8 tiles where the CPU
has them; every build gives the same bits); elsewhere, or when ``QWEN_GRPC_KERNELS=torch``, a
torch implementation of the same arithmetic does (``reference.py``). Both read one packed format
(``layout.py``), so a weight quantized once works on either path.

One :class:`Q8Weight` can back both a tied LM head (:meth:`Q8Weight.linear`) and the embedding
(:meth:`Q8Weight.rows`): one int8 copy instead of two.

The int8 KV cache has its quantizer (:func:`quantize_kv`): ``kv.cpp`` natively, ``kv_layout.py``
otherwise, built into the same extension under the same path decision.

:func:`paged_decode_attention` is decode attention over a paged cache: pools of fixed-size
blocks (int8 with scales, float32 or bfloat16) and a block table per row, so rows of any
length share one pool without a dense ``[B, KVH, C, D]`` buffer sized for the longest.
``paged.cpp`` natively, ``paged_reference.py`` (the spec) otherwise.
:func:`paged_chunk_attention` is a prompt chunk's causal attention over its row's history in
such pools and its own keys: ``chunk.cpp`` natively, the reference (SDPA) otherwise.

:class:`Bf16Weight` (:func:`pack_bf16`) keeps a weight in bf16, the bytes decode streams, but
computes in float32: each weight converted exactly, float32 activations, accumulation and
output. It is more faithful to a float32 model than bf16 activations and outputs (oneDNN's bf16
path) at the same memory traffic: ``bf16.cpp`` natively, ``bf16_layout.py`` otherwise.
"""

from __future__ import annotations

import torch

from qwen_grpc.engine.kernels import (
    bf16_layout,
    kv_layout,
    layout,
    native,
    paged_reference,
    reference,
)
from qwen_grpc.engine.kernels.kv_layout import dequantize_kv

__all__ = [
    "Bf16Weight",
    "Q8Weight",
    "dequantize_kv",
    "kernel_path",
    "native_available",
    "pack_bf16",
    "paged_chunk_attention",
    "paged_decode_attention",
    "quantize_kv",
    "quantize_q8",
]

_NATIVE_HEAD_DIM_STEP = 16
_NATIVE_MAX_HEAD_DIM = 256
_POOL_DTYPES = (torch.int8, torch.float32, torch.bfloat16)


def native_available() -> bool:
    """True when this process runs the native extension, AVX512-VNNI or AVX2 (decided, and
    built, once)."""
    return native.choose().native


def kernel_path() -> str:
    """A sentence naming the path in use and why, e.g. for a startup log or a bench report."""
    return native.choose().description


class Q8Weight:
    """A ``[out_features, in_features]`` weight in Q8_0, with an optional float32 bias."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        self.packed = packed
        self.scales = scales
        self.out_features = out_features
        self.in_features = packed.shape[1] * layout.BLOCK
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: int8 values and fp32 scales (tile padding included)."""
        return self.packed.nbytes + self.scales.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for float32 or bfloat16 ``x [..., in_features]``, in float32."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected in_features={self.in_features}, got {x.shape[-1]}")
        flat = x.reshape(-1, self.in_features)
        if flat.dtype not in (torch.float32, torch.bfloat16):
            flat = flat.float()
        flat = flat.contiguous()
        if native_available():
            out = torch.ops.qwen_q8.linear(
                flat, self.packed, self.scales, self.out_features, self.bias
            )
        else:
            out = reference.linear(flat, self.packed, self.scales, self.out_features, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any shape) de-quantized to float32 ``[*index.shape, in_features]``."""
        flat = index.reshape(-1).long().contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.out_features):
            raise IndexError(f"row index out of range for {self.out_features} rows")
        if native_available():
            out = torch.ops.qwen_q8.rows(self.packed, self.scales, self.out_features, flat)
        else:
            out = reference.rows(self.packed, self.scales, flat)
        return out.reshape(*index.shape, self.in_features)


def quantize_q8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Q8Weight:
    """Q8_0 of a bf16/fp32 ``[N, K]`` weight (K a multiple of 32), quantized in row chunks."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        packed, scales = layout.pack(weight.detach())
    return Q8Weight(packed, scales, weight.shape[0], bias)


class Bf16Weight:
    """A ``[out_features, in_features]`` bf16 weight in the tiled layout, with a float32 bias."""

    def __init__(
        self, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
    ) -> None:
        self.packed = packed
        self.out_features = out_features
        self.in_features = packed.shape[1] * 2
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: two per weight (tile padding included)."""
        return self.packed.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` in float32 for ``x [..., in_features]`` (bf16 ``x`` is widened)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected in_features={self.in_features}, got {x.shape[-1]}")
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if native_available():
            out = torch.ops.qwen_q8.bf16_linear(flat, self.packed, self.bias, self.out_features)
        else:
            out = bf16_layout.linear(flat, self.packed, self.bias, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_bf16(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Bf16Weight:
    """A bf16/fp32 ``[N, K]`` weight (K a multiple of 16) rounded to bf16 and tiled."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    with torch.no_grad():
        packed = bf16_layout.pack(weight.detach())
    return Bf16Weight(packed, weight.shape[0], bias)


def _native_head_dim(head_dim: int) -> bool:
    return (
        native_available()
        and head_dim % _NATIVE_HEAD_DIM_STEP == 0
        and head_dim <= _NATIVE_MAX_HEAD_DIM
    )


def quantize_kv(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values of ``states [..., tokens, head_dim]`` and float32 scales ``[..., tokens]``.

    Symmetric per token and head: ``scale = max|x| / 127``, values rounded to nearest (even),
    so each de-quantized element is within ``scale / 2``. An all-zero token has scale 0.
    Native for float32/bf16 when ``head_dim`` is a multiple of 16; identical results on both
    paths (see ``kv_layout``).
    """
    if (
        states.dtype in (torch.float32, torch.bfloat16)
        and states.dim() >= 2
        and _native_head_dim(states.shape[-1])
    ):
        values, scales = torch.ops.qwen_q8.quantize_kv(states.contiguous())
        return values, scales
    return kv_layout.quantize_kv(states)


def paged_decode_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    values: torch.Tensor,
    value_scales: torch.Tensor | None,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per row over a paged KV cache, in float32.

    Args:
        queries: ``[B, H, D]`` (float32; bf16 is converted).
        keys: the key pool ``[NB, KVH, BS, D]``, int8 (from :func:`quantize_kv`), float32 or
            bfloat16.
        key_scales: float32 ``[NB, KVH, BS]`` for an int8 pool, None for a float one.
        values: the value pool, shaped and typed like ``keys``.
        value_scales: as ``key_scales``, for ``values``.
        block_table: int32 ``[B, MB]``: row ``b``'s token ``t`` is in block
            ``block_table[b, t // BS]`` at offset ``t % BS``. Entries past a row's
            ``ceil(length / BS)`` are never read (they may hold -1).
        lengths: int32 ``[B]``: row ``b`` attends over its first ``lengths[b]`` tokens, the
            new one already written.
        scale: the softmax scale, usually ``1 / sqrt(D)``.

    Returns:
        float32 ``[B, H, D]``. Query head ``h`` reads kv head ``h // (H // KVH)``; a row of
        length 0 gives zeros; a row's result does not depend on the other rows of the batch.
        Native when the extension runs and ``D`` is a multiple of 16 up to 256, the torch
        fallback otherwise.

    Raises:
        ValueError: for shapes or dtypes that do not fit together, a length beyond the table
            or a used block id outside the pool.
    """
    _check_paged(queries, keys, key_scales, values, value_scales, block_table, lengths)
    queries = queries.float().contiguous()
    if _native_head_dim(queries.shape[-1]):
        return torch.ops.qwen_q8.paged_decode_attention(
            queries,
            keys.contiguous(),
            None if key_scales is None else key_scales.contiguous(),
            values.contiguous(),
            None if value_scales is None else value_scales.contiguous(),
            block_table.contiguous(),
            lengths.contiguous(),
            float(scale),
        )
    return paged_reference.paged_decode_attention(
        queries, keys, key_scales, values, value_scales, block_table, lengths, scale
    )


def paged_chunk_attention(
    queries: torch.Tensor,
    own_keys: torch.Tensor,
    own_values: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    values: torch.Tensor,
    value_scales: torch.Tensor | None,
    blocks: torch.Tensor,
    position: int,
    scale: float,
) -> torch.Tensor:
    """Attention of a prompt chunk of one row over the row's history and itself, in float32.

    Args:
        queries: float32 ``[C, H, D]``, the chunk's queries at positions ``position ..
            position + C - 1``.
        own_keys: float32 ``[C, KVH, D]``, the chunk's own keys, exact (not read back from the
            pools, so a whole prompt in one chunk attends as an unchunked prefill does).
        own_values: as ``own_keys``.
        keys, key_scales, values, value_scales: the pools, as :func:`paged_decode_attention`
            takes them.
        blocks: int32, the row's block ids in order, covering at least ``position`` tokens.
        position: the row's length before the chunk: its history, read from the pools.
        scale: the softmax scale.

    Returns:
        float32 ``[C, H, D]``: query ``i`` over the history and the chunk's tokens ``0..i``.
        Native when the extension runs and ``D`` is a multiple of 16 up to 256 (the history is
        widened in cache per kv head, never materialized), torch's SDPA over the gathered
        history otherwise.
    """
    native = _native_head_dim(queries.shape[-1]) and keys.dtype in _POOL_DTYPES
    attend = torch.ops.qwen_q8.paged_chunk_attention if native else paged_reference.chunk_attention
    return attend(
        queries.float().contiguous(),
        own_keys.float().contiguous(),
        own_values.float().contiguous(),
        keys,
        key_scales,
        values,
        value_scales,
        blocks.contiguous(),
        position,
        float(scale),
    )


def _check_paged(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    values: torch.Tensor,
    value_scales: torch.Tensor | None,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """Shapes and dtypes only, so it costs no tensor op; lengths and block ids are checked
    where they are read (``paged.cpp``, ``paged_reference``), also as ValueError."""
    if queries.dim() != 3 or keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(
            f"expected queries [B, H, D] and key and value pools [NB, KVH, BS, D], got "
            f"{tuple(queries.shape)}, {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    batch, heads, head_dim = queries.shape
    _, kv_heads, block_size, pool_dim = keys.shape
    if kv_heads == 0 or heads % kv_heads or block_size == 0 or pool_dim != head_dim:
        raise ValueError(
            f"expected H a multiple of KVH, BS >= 1 and the pools' D equal to the queries' "
            f"{head_dim}, got queries {tuple(queries.shape)} and pools {tuple(keys.shape)}"
        )
    if keys.dtype not in _POOL_DTYPES or values.dtype != keys.dtype:
        raise ValueError(
            f"expected int8, float32 or bfloat16 pools of one dtype, got {keys.dtype} keys "
            f"and {values.dtype} values"
        )
    for name, scales in (("key_scales", key_scales), ("value_scales", value_scales)):
        _check_scales(name, scales, keys)
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(
            f"expected an int32 block_table [{batch}, MB], got {block_table.dtype} "
            f"{tuple(block_table.shape)}"
        )
    if lengths.shape != (batch,) or lengths.dtype != torch.int32:
        raise ValueError(
            f"expected int32 lengths [{batch}], got {lengths.dtype} {tuple(lengths.shape)}"
        )


def _check_scales(name: str, scales: torch.Tensor | None, pool: torch.Tensor) -> None:
    """An int8 pool needs float32 scales per token and head; a float pool has none."""
    if pool.dtype != torch.int8:
        if scales is not None:
            raise ValueError(f"{name} must be None for a {pool.dtype} pool")
        return
    if scales is None or scales.shape != pool.shape[:3] or scales.dtype != torch.float32:
        got = "None" if scales is None else f"{scales.dtype} {tuple(scales.shape)}"
        raise ValueError(
            f"an int8 pool needs float32 {name} {tuple(pool.shape[:3])} [NB, KVH, BS], got {got}"
        )
