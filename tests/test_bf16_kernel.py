"""The bf16-weight float32 linear: native against float64, the torch twin, and bf16 activations."""

from __future__ import annotations

import pytest
import torch

from qwen_grpc.engine import kernels
from qwen_grpc.engine.kernels import bf16_layout

needs_native = pytest.mark.skipif(
    not kernels.native_available(), reason=f"native path unavailable: {kernels.kernel_path()}"
)

# Tiny test model, demo model (SmolLM2-135M) and Qwen1.5-0.5B widths; N = 100 and 960 leave a
# partial tile.
SHAPES = [(16, 64), (100, 128), (960, 576), (576, 1536), (3072, 1024), (1024, 2816)]
BATCHES = [*range(1, 17), 40]
# float32 summation of K products against float64: ~1e-7 observed; bf16 activations give ~2e-3.
TOLERANCE = 2e-6


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _inputs(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The float64 product with the bf16-rounded weight: what float32 arithmetic approximates."""
    return x.double() @ weight.bfloat16().double().T + bias.double()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def test_packing_keeps_the_bf16_values_and_pads_the_last_tile_with_zeros() -> None:
    weight = _weight(100, 64, 0)
    w = kernels.pack_bf16(weight)
    rows = bf16_layout.unpack(w.packed)
    assert torch.equal(rows[:100], weight.bfloat16())
    assert not bool(rows[100:].any())
    assert (w.out_features, w.in_features, w.nbytes) == (100, 64, 112 * 64 * 2)


def test_pack_rejects_a_width_that_is_not_a_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.pack_bf16(torch.randn(16, 40))


@needs_native
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_native_is_float64_exact_up_to_float32_summation(n: int, k: int) -> None:
    weight, bias = _weight(n, k, n + k), torch.randn(n)
    w = kernels.pack_bf16(weight, bias)
    for m in BATCHES:
        x = _inputs(m, k, m)
        out = torch.ops.qwen_q8.bf16_linear(x, w.packed, w.bias, n)
        assert out.shape == (m, n) and out.dtype == torch.float32
        exact = _exact(x, weight, bias)
        assert _relative_error(out, exact) < TOLERANCE, (m, n, k)
        twin = bf16_layout.linear(x, w.packed, w.bias, n)
        assert float((out - twin).abs().max()) < 1e-5 * float(twin.abs().max()), (m, n, k)


@pytest.mark.parametrize(("n", "k"), SHAPES[:3])
def test_fallback_is_float64_exact_up_to_float32_summation(n: int, k: int) -> None:
    weight, bias = _weight(n, k, n), torch.randn(n)
    w = kernels.pack_bf16(weight, bias)
    x = _inputs(5, k, n)
    out = bf16_layout.linear(x, w.packed, w.bias, n)
    assert _relative_error(out, _exact(x, weight, bias)) < TOLERANCE


def test_the_tolerance_catches_activations_rounded_to_bf16() -> None:
    """oneDNN's path rounds activations to bf16: that error must be far outside the tolerance."""
    weight, bias = _weight(960, 576, 1), torch.randn(960)
    w = kernels.pack_bf16(weight, bias)
    x = _inputs(4, 576, 1)
    rounded = w.linear(x.bfloat16())
    assert _relative_error(rounded, _exact(x, weight, bias)) > 100 * TOLERANCE
    assert _relative_error(w.linear(x), _exact(x, weight, bias)) < TOLERANCE


def test_linear_keeps_leading_dims_and_widens_bf16_inputs() -> None:
    w = kernels.pack_bf16(_weight(48, 64, 3))
    x = _inputs(6, 64, 3).bfloat16()
    out = w.linear(x.view(2, 3, 64))
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    twin = bf16_layout.linear(x.float(), w.packed, None, 48)
    assert torch.allclose(out.reshape(6, 48), twin, rtol=1e-5, atol=1e-5)


@needs_native
def test_native_rows_give_the_same_bits_alone_or_batched() -> None:
    w = kernels.pack_bf16(_weight(100, 1024, 7), torch.randn(100))
    x = _inputs(40, 1024, 7)
    alone = torch.cat([w.linear(x[i : i + 1]) for i in range(40)])
    assert torch.equal(w.linear(x), alone)
