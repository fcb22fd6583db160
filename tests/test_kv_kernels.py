"""The int8 KV cache's quantizer: its bounds, and the native one against the torch twin."""

from __future__ import annotations

import pytest
import torch

from qwen_grpc.engine import kernels
from qwen_grpc.engine.kernels import kv_layout

needs_native = pytest.mark.skipif(
    not kernels.native_available(), reason=f"native path unavailable: {kernels.kernel_path()}"
)


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
