"""Q8_0 kernel microbenchmark: every linear of Qwen1.5-0.5B, cold, at batch 1, 8 and 56.

``python -m bench.kernel_bench`` builds the 97 matrices of the model (24 layers of fused qkv,
o, fused gate_up and down, plus the 151936-row tied head) with random weights, distinct per
layer so a pass streams ~0.5 GB (q8) or ~0.9 GB (bf16) from memory, as decode does, and times
full passes over them for the native q8 kernel, its torch fallback (batch 1 at the largest
thread count only: it is slow), oneDNN's packed bf16 linear (what
``fast_linear.PackedBf16Linear`` runs: bf16 in and out) and the native bf16-weight linear with
float32 activations and outputs (``bf16_fp32_out``, the same weight bytes as oneDNN's, computed
in float32). oneDNN packs bf16 only on AVX-512 or AVX-NE-CONVERT CPUs; elsewhere its column is
left out. On AMX hosts ``q8_native`` runs batches of 4+ rows on AMX tiles and ``q8_vnni`` is
the same kernel held on AVX512-VNNI. Batch 56 is a chunk step's pass: 7 decode tokens beside a
48-token prompt chunk and one more. GB/s counts the weight bytes a pass reads. Writes its
keys of ``bench/results/kernels.json`` and ``kernels.md`` (see ``kernel_results``).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.kernel_results import RESULTS, write_results
from bench.machine import load_average, machine_info
from qwen_grpc.engine.fast_linear import can_pack_bf16
from qwen_grpc.engine.kernels import (
    Bf16Weight,
    Q8Weight,
    kernel_path,
    native,
    native_available,
    pack_bf16,
    quantize_q8,
    reference,
)

_LOGGER = logging.getLogger(__name__)

HIDDEN = 1024
LAYERS = 24
VOCAB = 151936
LAYER_SHAPES = {"qkv": (3 * HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (5632, HIDDEN)}
DOWN = (HIDDEN, 2816)

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Matrix:
    """One weight of the model in every form under test."""

    kind: str
    q8: Q8Weight
    bf16: torch.Tensor | None
    bf16_fp32: Bf16Weight
    in_features: int


def _shapes() -> list[tuple[str, tuple[int, int]]]:
    layer = [*LAYER_SHAPES.items(), ("down", DOWN)]
    return [item for _ in range(LAYERS) for item in layer] + [("lm_head", (VOCAB, HIDDEN))]


def build_matrices(seed: int, onednn: bool) -> list[Matrix]:
    """Random bf16 weights (scaled like a trained model's) quantized and packed both ways;
    ``onednn`` False leaves oneDNN's packing out (the CPU cannot run it)."""
    generator = torch.Generator().manual_seed(seed)
    matrices = []
    for kind, (n, k) in _shapes():
        weight = (torch.randn(n, k, generator=generator) * 0.02).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if onednn else None
        matrices.append(Matrix(kind, quantize_q8(weight), packed, pack_bf16(weight), k))
    return matrices


def _q8_native(m: Matrix) -> Linear:
    return m.q8.linear


def _q8_fallback(m: Matrix) -> Linear:
    q = m.q8
    return lambda x: reference.linear(x, q.packed, q.scales, q.out_features, None)


def _onednn_bf16(m: Matrix) -> Linear:
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, m.bf16, None, "none", [], "")


def _bf16_fp32_out(m: Matrix) -> Linear:
    return m.bf16_fp32.linear


def _time_passes(
    matrices: list[Matrix],
    make: Callable[[Matrix], Linear],
    x: dict[int, torch.Tensor],
    passes: int,
) -> dict[str, Any]:
    """Times ``passes`` full sweeps; per kind times come from the median pass."""
    calls = [(m.kind, make(m), x[m.in_features]) for m in matrices]
    for _, call, inputs in calls[:8]:
        call(inputs)
    sweeps = []
    for _ in range(passes):
        by_kind: dict[str, float] = {}
        start = time.perf_counter()
        for kind, call, inputs in calls:
            t0 = time.perf_counter()
            call(inputs)
            by_kind[kind] = by_kind.get(kind, 0.0) + time.perf_counter() - t0
        sweeps.append((time.perf_counter() - start, by_kind))
    sweeps.sort(key=lambda sweep: sweep[0])
    median_total, median_kinds = sweeps[len(sweeps) // 2]
    return {
        "ms_median": round(median_total * 1e3, 2),
        "ms_min": round(sweeps[0][0] * 1e3, 2),
        "ms_by_kind": {kind: round(t * 1e3, 2) for kind, t in median_kinds.items()},
    }


def _bytes(matrices: list[Matrix], kernel: str) -> int:
    if kernel == "onednn_bf16":
        return sum(m.q8.out_features * m.in_features * 2 for m in matrices)
    if kernel == "bf16_fp32_out":
        return sum(m.bf16_fp32.nbytes for m in matrices)
    return sum(m.q8.nbytes for m in matrices)


def run(batches: list[int], passes: int, threads: list[int], seed: int) -> dict[str, Any]:
    """Measures every kernel at every thread count and batch size: the JSON-ready record.

    One thread is the steadier number on a shared machine: with two, a pass waits for
    whichever thread another process has pre-empted.
    """
    info = machine_info()
    _LOGGER.info("building %d matrices", len(_shapes()))
    onednn = can_pack_bf16()
    matrices = build_matrices(seed, onednn)
    kernels: dict[str, Callable[[Matrix], Linear]] = {}
    if onednn:
        kernels["onednn_bf16"] = _onednn_bf16
    if native_available():
        kernels["q8_native"] = _q8_native
        if native.choose().amx:
            kernels["q8_vnni"] = _q8_native
        kernels["bf16_fp32_out"] = _bf16_fp32_out
    kernels["q8_fallback"] = _q8_fallback
    rows = []
    for count, batch in ((t, b) for t in threads for b in batches):
        torch.set_num_threads(count)
        x = {
            k: torch.randn(batch, k, generator=torch.Generator().manual_seed(batch))
            for k in (HIDDEN, DOWN[1])
        }
        for name, make in kernels.items():
            if name == "q8_fallback" and (batch != 1 or count != max(threads)):
                continue
            inputs = {k: v.bfloat16() for k, v in x.items()} if name == "onednn_bf16" else x
            _LOGGER.info("timing %s, %d threads, batch %d", name, count, batch)
            if name in ("q8_native", "q8_vnni"):
                torch.ops.qwen_q8.use_amx(name == "q8_native" and native.choose().amx)
            timing = _time_passes(matrices, make, inputs, 2 if name == "q8_fallback" else passes)
            nbytes = _bytes(matrices, name)
            gbps = nbytes / (timing["ms_median"] * 1e-3) / 1e9
            rows.append(
                {
                    "kernel": name,
                    "threads": count,
                    "batch": batch,
                    "weight_bytes": nbytes,
                    "gb_per_s": round(gbps, 1),
                    **timing,
                }
            )
    if native_available():
        torch.ops.qwen_q8.use_amx(native.choose().amx)
    info["load_average_end"] = load_average()
    return {
        "machine": info,
        "kernel_path": kernel_path(),
        "matrices": len(matrices),
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,56", help="comma-separated batch sizes")
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = run(
        [int(b) for b in args.batches.split(",")],
        args.passes,
        [int(t) for t in args.threads.split(",")],
        args.seed,
    )
    _LOGGER.info("%s", write_results(args.out, record))


if __name__ == "__main__":
    main()
