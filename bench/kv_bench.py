"""Decode attention microbenchmark: int8 KV cache kernels against today's bf16 two-bmm path.

``python -m bench.kv_bench`` builds, per model shape and capacity, 24 layers of distinct caches
(batch 8, every column visible) in both forms, so a pass streams all of them from memory as a
decode step does, and times full passes of: the native int8 ``decode_attention``, its torch
fallback (2 threads only: it is slow) and ``Decoder._attend_one`` on bf16 buffers (copied
here, so the comparison does not move when the decoder does). It also times ``quantize_kv``
(native and torch) for one new token per row in every layer, the write side of an int8 cache. GB/s counts the
cache bytes a pass reads. Writes the ``decode_attention`` key of
``bench/results/kernels.json`` and ``kernels.md`` (see ``kernel_results``).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.kernel_results import RESULTS, write_results
from bench.machine import load_average, machine_info
from qwen_grpc.engine.kernels import (
    decode_attention,
    kernel_path,
    kv_layout,
    kv_reference,
    quantize_kv,
)

_LOGGER = logging.getLogger(__name__)

LAYERS = 24
BATCH = 8
# (heads, kv heads, head dim)
MODELS = {"Qwen1.5-0.5B": (16, 16, 64), "SmolLM2-135M": (9, 3, 64)}

Pass = Callable[[], None]


@dataclass
class Layer:
    """One layer's query and cache, int8 and bf16."""

    queries: torch.Tensor
    int8: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    keys_bf16: torch.Tensor
    values_bf16: torch.Tensor


def attend_one_bf16(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``Decoder._attend_one`` as of this bench: two batched matmuls over bf16 buffers."""
    batch, heads, _, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale + bias
    probabilities = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probabilities, values).view(batch, heads, 1, head_dim)


def build_layers(shape: tuple[int, int, int], capacity: int, seed: int) -> list[Layer]:
    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        queries = torch.randn(BATCH, heads, dim, generator=generator)
        keys = torch.randn(BATCH, kv_heads, capacity, dim, generator=generator).bfloat16()
        values = torch.randn(BATCH, kv_heads, capacity, dim, generator=generator).bfloat16()
        layers.append(Layer(queries, (*quantize_kv(keys), *quantize_kv(values)), keys, values))
    return layers


def _int8_pass(layers: list[Layer], bias: torch.Tensor, scale: float, native: bool) -> Pass:
    attend = decode_attention if native else kv_reference.decode_attention

    def run() -> None:
        for layer in layers:
            attend(layer.queries, *layer.int8, bias, scale)

    return run


def _bf16_pass(layers: list[Layer], bias: torch.Tensor, scale: float) -> Pass:
    wide_bias = bias[:, None, None, :]
    queries = [layer.queries.bfloat16().unsqueeze(2) for layer in layers]

    def run() -> None:
        for q, layer in zip(queries, layers, strict=True):
            attend_one_bf16(q, layer.keys_bf16, layer.values_bf16, wide_bias, scale)

    return run


def _quantize_pass(shape: tuple[int, int, int], native: bool) -> Pass:
    _, kv_heads, dim = shape
    new = [torch.randn(BATCH, kv_heads, 1, dim).bfloat16() for _ in range(2 * LAYERS)]
    quantize = quantize_kv if native else kv_layout.quantize_kv

    def run() -> None:
        for states in new:
            quantize(states)

    return run


def _time(run: Pass, passes: int) -> dict[str, float]:
    run()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"ms_median": round(times[len(times) // 2] * 1e3, 3), "ms_min": round(times[0] * 1e3, 3)}


def run(capacities: list[int], passes: int, threads: list[int], seed: int) -> dict[str, Any]:
    """Every kernel at every model shape, capacity and thread count: the JSON-ready section."""
    info = machine_info()
    rows = []
    for model, shape in MODELS.items():
        _, kv_heads, dim = shape
        scale = 1 / math.sqrt(dim)
        for capacity in capacities:
            _LOGGER.info("building %s caches, capacity %d", model, capacity)
            layers = build_layers(shape, capacity, seed)
            bias = torch.zeros(BATCH, capacity)
            cells = BATCH * kv_heads * capacity * LAYERS * 2
            kernels = {
                "int8_native": (_int8_pass(layers, bias, scale, True), cells * (dim + 4)),
                "int8_fallback": (_int8_pass(layers, bias, scale, False), cells * (dim + 4)),
                "bf16_two_bmm": (_bf16_pass(layers, bias, scale), cells * dim * 2),
            }
            for count in threads:
                torch.set_num_threads(count)
                for name, (attend, nbytes) in kernels.items():
                    if name == "int8_fallback" and count != max(threads):
                        continue
                    _LOGGER.info("timing %s %s, %d threads, C=%d", model, name, count, capacity)
                    timing = _time(attend, passes)
                    gbps = nbytes / (timing["ms_median"] * 1e-3) / 1e9
                    rows.append(
                        {
                            "model": model,
                            "kernel": name,
                            "threads": count,
                            "capacity": capacity,
                            "bytes": nbytes,
                            "gb_per_s": round(gbps, 1),
                            **timing,
                        }
                    )
            del layers
        for count, native in ((t, n) for t in threads for n in (True, False)):
            torch.set_num_threads(count)
            timing = _time(_quantize_pass(shape, native), passes)
            rows.append(
                {
                    "model": model,
                    "kernel": "quantize_kv" if native else "quantize_kv_torch",
                    "threads": count,
                    "capacity": 1,
                    "bytes": BATCH * kv_heads * dim * 2 * 2 * LAYERS,
                    "gb_per_s": 0.0,
                    **timing,
                }
            )
    info["load_average_end"] = load_average()
    return {
        "machine": info,
        "kernel_path": kernel_path(),
        "layers": LAYERS,
        "batch": BATCH,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", default="512,2048", help="comma-separated cache widths")
    parser.add_argument("--passes", type=int, default=9)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    section = run(
        [int(c) for c in args.capacities.split(",")],
        args.passes,
        [int(t) for t in args.threads.split(",")],
        args.seed,
    )
    _LOGGER.info("%s", write_results(args.out, {"decode_attention": section}))


if __name__ == "__main__":
    main()
