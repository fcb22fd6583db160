"""The int8 KV cache kernels: quantizer bounds, native against the torch twin and float64."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_grpc.engine import kernels
from qwen_grpc.engine.kernels import kv_layout, kv_reference

needs_native = pytest.mark.skipif(
    not kernels.native_available(), reason=f"native path unavailable: {kernels.kernel_path()}"
)

CASES = [
    # (batch, heads, kv_heads, capacity, head_dim)
    (1, 16, 16, 1, 64),
    (1, 9, 3, 17, 64),
    (2, 16, 16, 33, 64),
    (3, 9, 3, 100, 64),
    (4, 6, 2, 257, 64),
    (5, 4, 4, 15, 32),
    (8, 16, 16, 600, 64),
    (8, 9, 3, 511, 64),
    (6, 6, 2, 47, 128),
    (7, 3, 1, 64, 16),
]


def _cache(
    batch: int, heads: int, kv_heads: int, capacity: int, dim: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """Queries, a quantized cache and a bias with left padding and unwritten right columns."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, heads, dim, generator=generator) * 2
    keys, key_scales = kernels.quantize_kv(
        torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    )
    values, value_scales = kernels.quantize_kv(
        torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    )
    bias = torch.zeros(batch, capacity)
    for row in range(batch):
        filled = int(torch.randint(1, capacity + 1, (1,), generator=generator))
        padding = int(torch.randint(0, filled, (1,), generator=generator))
        bias[row, :padding] = float("-inf")
        bias[row, filled:] = float("-inf")
    return queries, keys, key_scales, values, value_scales, bias


def _float64_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor,
    values: torch.Tensor,
    value_scales: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Head by head in float64 over the visible columns only, independent of both paths."""
    batch, heads, dim = queries.shape
    group = heads // keys.shape[1]
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for row in range(batch):
        seen = ~bias[row].isneginf()
        for head in range(heads):
            kv = head // group
            k = keys[row, kv, seen].double() * key_scales[row, kv, seen].double()[:, None]
            v = values[row, kv, seen].double() * value_scales[row, kv, seen].double()[:, None]
            scores = k @ queries[row, head].double() * scale + bias[row, seen].double()
            out[row, head] = torch.softmax(scores, dim=0) @ v
    return out


def _garbage_in_hidden_columns(
    keys: torch.Tensor,
    key_scales: torch.Tensor,
    values: torch.Tensor,
    value_scales: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Copies with large finite values wherever the bias hides a column."""
    hidden = bias.isneginf()[:, None, :].expand_as(key_scales)
    garbage = torch.Generator().manual_seed(99)
    keys, values = keys.clone(), values.clone()
    keys[hidden] = torch.randint(-127, 128, keys[hidden].shape, generator=garbage).to(torch.int8)
    values[hidden] = torch.randint(-127, 128, values[hidden].shape, generator=garbage).to(
        torch.int8
    )
    key_scales = key_scales.masked_fill(hidden, 3e37)
    value_scales = value_scales.masked_fill(hidden, 3e37)
    return keys, key_scales, values, value_scales


def test_quantized_states_are_within_half_a_step() -> None:
    states = torch.randn(3, 4, 50, 64) * torch.rand(3, 4, 50, 1) * 10
    values, scales = kernels.quantize_kv(states)
    assert values.dtype == torch.int8 and scales.shape == (3, 4, 50)
    assert torch.allclose(scales, states.abs().amax(-1) / 127)
    error = (kernels.dequantize_kv(values, scales) - states).abs()
    assert bool((error <= scales.unsqueeze(-1) * (0.5 + 1e-5)).all())
    assert int(values.abs().max()) == 127


def test_quantize_accepts_bf16_and_maps_a_zero_token_to_zeros() -> None:
    states = torch.randn(2, 5, 64).bfloat16()
    states[1, 2] = 0
    values, scales = kernels.quantize_kv(states)
    assert float(scales[1, 2]) == 0.0 and not bool(values[1, 2].any())
    assert bool(torch.isfinite(kernels.dequantize_kv(values, scales)).all())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16, 1, 64), (1, 3, 200, 64), (2, 2, 5, 16), (4, 7, 128)])
def test_native_quantizer_matches_the_torch_one_bit_for_bit(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    states = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 30).to(dtype)
    states[0, 0] = 0
    states = states.transpose(-2, -3) if len(shape) == 4 else states
    values, scales = torch.ops.qwen_q8.quantize_kv(states.contiguous())
    twin_values, twin_scales = kv_layout.quantize_kv(states)
    assert torch.equal(values, twin_values) and torch.equal(scales, twin_scales)
    public_values, public_scales = kernels.quantize_kv(states)
    assert torch.equal(public_values, twin_values) and torch.equal(public_scales, twin_scales)


def test_quantize_rejects_integer_states() -> None:
    with pytest.raises(TypeError):
        kernels.quantize_kv(torch.zeros(2, 64, dtype=torch.int32))


@pytest.mark.parametrize("case", CASES)
def test_fallback_matches_a_float64_reference(case: tuple[int, int, int, int, int]) -> None:
    inputs = _cache(*case, seed=sum(case))
    scale = 1 / math.sqrt(case[-1])
    out = kv_reference.decode_attention(*inputs, scale)
    expected = _float64_reference(*inputs, scale)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert float((out.double() - expected).abs().max()) < 1e-5


@needs_native
@pytest.mark.parametrize("case", CASES)
def test_native_matches_the_fallback_and_float64(case: tuple[int, int, int, int, int]) -> None:
    inputs = _cache(*case, seed=sum(case))
    scale = 1 / math.sqrt(case[-1])
    out = torch.ops.qwen_q8.decode_attention(*inputs, scale)
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    assert float((out - kv_reference.decode_attention(*inputs, scale)).abs().max()) < 2e-6
    assert float((out.double() - _float64_reference(*inputs, scale)).abs().max()) < 2e-6


@pytest.mark.parametrize("case", CASES[2:4] + CASES[6:8])
def test_hidden_columns_never_reach_the_output(case: tuple[int, int, int, int, int]) -> None:
    queries, keys, key_scales, values, value_scales, bias = _cache(*case, seed=7)
    clean = kernels.decode_attention(queries, keys, key_scales, values, value_scales, bias, 0.125)
    dirty_inputs = _garbage_in_hidden_columns(keys, key_scales, values, value_scales, bias)
    k, ks, v, vs = dirty_inputs
    dirty = kernels.decode_attention(queries, k, ks, v, vs, bias, 0.125)
    fallback = kv_reference.decode_attention(queries, k, ks, v, vs, bias, 0.125)
    assert torch.equal(dirty, clean)
    assert float((fallback - clean).abs().max()) < 2e-6


def test_the_garbage_would_be_seen_if_the_columns_were_visible() -> None:
    """Guards the test above: the same garbage with a zero bias changes the output."""
    queries, keys, key_scales, values, value_scales, bias = _cache(2, 16, 16, 33, 64, seed=7)
    clean = kernels.decode_attention(queries, keys, key_scales, values, value_scales, bias, 0.125)
    k, ks, v, vs = _garbage_in_hidden_columns(keys, key_scales, values, value_scales, bias)
    visible = torch.zeros_like(bias)
    dirty = kernels.decode_attention(queries, k, ks / 1e36, v, vs / 1e36, visible, 0.125)
    assert not torch.allclose(dirty, clean, atol=1e-3)


def test_a_row_with_no_visible_column_gives_zeros_on_both_paths() -> None:
    queries, keys, key_scales, values, value_scales, bias = _cache(3, 4, 4, 20, 64, seed=3)
    bias[1] = float("-inf")
    out = kernels.decode_attention(queries, keys, key_scales, values, value_scales, bias, 0.125)
    twin = kv_reference.decode_attention(
        queries, keys, key_scales, values, value_scales, bias, 0.125
    )
    assert not bool(out[1].any()) and not bool(twin[1].any())
    assert bool(out[0].any()) and bool(out[2].any())


def test_an_unsupported_head_dim_runs_on_the_fallback() -> None:
    inputs = _cache(2, 6, 2, 30, 40, seed=5)
    out = kernels.decode_attention(*inputs, 0.15)
    assert float((out.double() - _float64_reference(*inputs, 0.15)).abs().max()) < 1e-5


def test_int8_attention_stays_close_to_unquantized_attention() -> None:
    generator = torch.Generator().manual_seed(11)
    queries = torch.randn(4, 16, 64, generator=generator)
    keys, values = torch.randn(2, 4, 16, 200, 64, generator=generator)
    scores = torch.einsum("bhd,bhcd->bhc", queries, keys) * 0.125
    exact = torch.einsum("bhc,bhcd->bhd", torch.softmax(scores, dim=-1), values)
    out = kernels.decode_attention(
        queries,
        *kernels.quantize_kv(keys),
        *kernels.quantize_kv(values),
        torch.zeros(4, 200),
        0.125,
    )
    assert float((out - exact).norm() / exact.norm()) < 0.02


def test_mismatched_heads_are_rejected() -> None:
    queries, keys, key_scales, values, value_scales, bias = _cache(1, 9, 3, 8, 64, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        kernels.decode_attention(queries[:, :8], keys, key_scales, values, value_scales, bias, 1.0)
