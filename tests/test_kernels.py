"""The Q8_0 kernels: native against a de-quantized float reference and against the torch twin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_grpc.engine import kernels
from qwen_grpc.engine.kernels import layout, native, reference

needs_native = pytest.mark.skipif(
    not kernels.native_available(), reason=f"native path unavailable: {kernels.kernel_path()}"
)

SHAPES = [(16, 64), (48, 1024), (100, 1024), (3072, 1024), (1024, 2816)]
BATCHES = [*range(1, 17), 40]


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=generator)


def _inputs(m: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(m, k, generator=generator)


def _dequantized(q: kernels.Q8Weight) -> torch.Tensor:
    return reference.rows(q.packed, q.scales, torch.arange(q.out_features))


def _q8_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Q8_0 x Q8_0 written block by block in float64, independent of the packed layout."""
    wq, ws = layout.quantize_blocks(weight.float())
    xq, xs = layout.quantize_blocks(x.float())
    sums = torch.einsum("mbk,nbk->mnb", xq.double(), wq.double())
    out = (sums * xs.double()[:, None, :] * ws.double()[None, :, :]).sum(-1)
    return out if bias is None else out + bias.double()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def test_quantized_weight_rows_are_within_half_a_step_of_the_weight() -> None:
    weight = _weight(100, 64, 0)
    q = kernels.quantize_q8(weight)
    step = weight.view(100, 2, 32).abs().amax(-1, keepdim=True) / 127
    error = (_dequantized(q).view(100, 2, 32) - weight.view(100, 2, 32)).abs()
    assert bool((error <= step / 2 + 1e-6).all())
    assert q.out_features == 100 and q.in_features == 64
    assert q.nbytes == 7 * 2 * 512 + 7 * 2 * 16 * 4


def test_quantize_rejects_a_width_that_is_not_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quantize_q8(torch.randn(16, 48))


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_fallback_matches_q8_arithmetic_and_float_within_quantization_error(n: int, k: int) -> None:
    weight, bias = _weight(n, k, n + k), torch.randn(n)
    q = kernels.quantize_q8(weight, bias)
    x = _inputs(5, k, n)
    out = reference.linear(x, q.packed, q.scales, n, q.bias)
    exact = _q8_reference(x, weight, bias)
    assert (out.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    assert _relative_error(out, x @ weight.T + bias) < 0.02


@needs_native
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_matches_fallback_for_every_batch_size(n: int, k: int, dtype: torch.dtype) -> None:
    weight = _weight(n, k, n * k)
    bias = torch.randn(n) if n % 3 else None
    q = kernels.quantize_q8(weight, bias)
    for m in BATCHES:
        x = _inputs(m, k, m).to(dtype)
        out = torch.ops.qwen_q8.linear(x, q.packed, q.scales, n, q.bias)
        twin = reference.linear(x, q.packed, q.scales, n, q.bias)
        assert out.shape == (m, n) and out.dtype == torch.float32
        scale = float(twin.abs().max())
        assert float((out - twin).abs().max()) < 1e-5 * scale, (m, n, k)
        dense = x.float() @ weight.T + (0 if bias is None else bias)
        assert _relative_error(out, dense) < 0.02


@needs_native
def test_native_rows_of_a_batch_do_not_depend_on_their_neighbours() -> None:
    q = kernels.quantize_q8(_weight(100, 1024, 7))
    x = _inputs(40, 1024, 7)
    alone = torch.cat([q.linear(x[i : i + 1]) for i in range(40)])
    assert torch.equal(q.linear(x), alone)


def test_linear_keeps_leading_dims_and_accepts_bf16() -> None:
    q = kernels.quantize_q8(_weight(48, 64, 3))
    x = _inputs(6, 64, 3).view(2, 3, 64)
    out = q.linear(x.bfloat16())
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    twin = reference.linear(x.reshape(6, 64).bfloat16(), q.packed, q.scales, 48, None)
    assert torch.allclose(out.reshape(6, 48), twin, rtol=1e-5, atol=1e-5)


def test_rows_return_the_dequantized_rows_on_both_paths() -> None:
    weight = _weight(100, 64, 5)
    q = kernels.quantize_q8(weight)
    index = torch.tensor([[0, 99], [17, 17], [64, 3]])
    expected = _dequantized(q)[index]
    assert torch.equal(q.rows(index), expected)
    assert torch.equal(reference.rows(q.packed, q.scales, index.reshape(-1)), expected.view(6, 64))
    assert (expected - weight[index]).abs().max() < weight.abs().max() / 127


def test_rows_reject_an_index_in_the_tile_padding() -> None:
    q = kernels.quantize_q8(_weight(100, 64, 5))
    with pytest.raises(IndexError):
        q.rows(torch.tensor([100]))


def test_an_all_zero_block_gives_zero_not_nan() -> None:
    weight = _weight(16, 64, 9)
    weight[:, :32] = 0
    x = _inputs(2, 64, 9)
    x[0, 32:] = 0
    out = kernels.quantize_q8(weight).linear(x)
    assert bool(torch.isfinite(out).all())
    assert torch.allclose(out, _q8_reference(x, weight, None).float(), rtol=1e-5, atol=1e-5)


def test_forcing_a_path_selects_it_and_every_native_build_gives_the_same_bits(
    tmp_path: Path,
) -> None:
    """AVX2 and AVX512-VNNI (and AMX) sum the same integers with the same float steps: on a
    CPU that runs both, the AVX2 build must match the AVX-512 one bit for bit."""
    script = (
        "import torch\n"
        "from qwen_grpc.engine import kernels\n"
        "torch.manual_seed(0)\n"
        "q = kernels.quantize_q8(torch.randn(100, 1024), torch.randn(100))\n"
        "x = torch.randn(40, 1024)\n"
        "out = [q.linear(x[:m]) for m in (1, 3, 4, 8, 16, 17, 40)]\n"
        "torch.save({'native': kernels.native_available(), 'path': kernels.kernel_path(),"
        " 'out': out}, __import__('sys').argv[1])\n"
    )
    results = {}
    for mode in ("torch", "vnni", "avx2", "auto"):
        target = tmp_path / f"{mode}.pt"
        env = {**os.environ, native.FORCE_ENV: mode}
        # A build this process has not used yet compiles first.
        subprocess.run(
            [sys.executable, "-c", script, str(target)], check=True, env=env, timeout=600
        )
        results[mode] = torch.load(target)
    flags = native.cpu_flags()
    assert results["torch"]["native"] is False
    assert "torch fallback" in results["torch"]["path"]
    assert results["auto"]["native"] is kernels.native_available()
    for build in native.BUILDS:
        runs = not native.missing_cpu_features(flags, build)
        assert results[build.name]["native"] is runs
        assert (f"native {build.label} extension" in results[build.name]["path"]) is runs
        assert "AMX" not in results[build.name]["path"]
    # AMX tiles run batches where the CPU has them; same integers, same float steps, same bits.
    has_amx = {"amx_tile", "amx_int8"} <= flags
    assert ("AMX-INT8" in results["auto"]["path"]) is (has_amx and kernels.native_available())
    natives = [mode for mode in ("vnni", "avx2", "auto") if results[mode]["native"]]
    for index, fallback in enumerate(results["torch"]["out"]):
        for mode in natives:
            assert torch.equal(results[mode]["out"][index], results[natives[0]]["out"][index])
            out = results[mode]["out"][index]
            assert float((fallback - out).abs().max()) < 1e-5 * float(out.abs().max())


def test_each_cpu_gets_the_fastest_build_it_runs(tmp_path: Path) -> None:
    def flags(line: str) -> frozenset[str]:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {line}\n")
        return native.cpu_flags(cpuinfo)

    epyc_zen4 = flags("fpu sse avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni")
    epyc_zen3 = flags("fpu sse avx2 fma f16c")
    no_vnni = flags("fpu sse avx2 fma f16c avx512f avx512bw avx512vl")
    old = flags("fpu sse sse4_2 avx")
    assert native.pick_build(epyc_zen4, "auto") == (native.AVX512_VNNI, "")
    assert native.pick_build(epyc_zen4, "avx2") == (native.AVX2, "")
    assert native.pick_build(epyc_zen3, "auto") == (native.AVX2, "")
    assert native.pick_build(no_vnni, "auto") == (native.AVX2, "")
    assert native.pick_build(epyc_zen3, "vnni") == (
        None,
        "CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni for AVX512-VNNI",
    )
    assert native.pick_build(old, "auto") == (
        None,
        "CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni for AVX512-VNNI; "
        "avx2, fma, f16c for AVX2",
    )
    assert native.pick_build(epyc_zen4, "torch") == (None, "QWEN_GRPC_KERNELS=torch")
    assert native.pick_build(epyc_zen4, "sse") == (
        None,
        "unknown QWEN_GRPC_KERNELS='sse', expected one of auto, vnni, avx2, torch",
    )
    assert native.cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.skipif(
    not kernels.native_available(), reason=f"native path off: {kernels.kernel_path()}"
)
def test_a_built_library_loads_where_no_compiler_is_installed() -> None:
    """A runtime image has no compiler: it must load what the builder stage compiled."""
    script = "from qwen_grpc.engine import kernels\nprint(kernels.kernel_path())\n"
    env = {**os.environ, "CXX": "no-such-compiler", "PATH": str(Path(sys.executable).parent)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    build = native.choose().build
    assert build is not None
    assert f"native {build.label} extension" in done.stdout
    assert "(prebuilt in" in done.stdout


def test_building_for_an_image_fails_instead_of_falling_back() -> None:
    """The Dockerfile's builder must not ship an image whose kernels silently never built."""
    env = {**os.environ, "CXX": "no-such-compiler"}
    done = subprocess.run(
        [sys.executable, "-m", "qwen_grpc.engine.kernels", "--for-image"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "no compiler: no-such-compiler not found" in done.stderr


@needs_native
def test_a_build_names_the_directory_it_built_in() -> None:
    """torch's load() appends to the flag list it is given; the hash must not move with it."""
    script = (
        "from qwen_grpc.engine.kernels import native\n"
        "before = [native.build_directory(build) for build in native.BUILDS]\n"
        "libraries = native.build_for_image()\n"
        "assert libraries == [d / 'qwen_q8.so' for d in before], (before, libraries)\n"
        "assert all(library.exists() for library in libraries), libraries\n"
        "assert [native.build_directory(build) for build in native.BUILDS] == before\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
