"""Decode attention microbenchmark: the paged KV cache's kernel against the dense two-bmm path.

Issue 12 asks that decode attention over the paged cache be as fast as the dense, padded
cache's two batched matmuls at equal lengths. ``python -m bench.kv_bench`` builds, per model
shape and length, 24 layers of distinct caches (batch 8, every row at that length) in both
forms, so a pass streams all of them from memory as a decode step does, and times full passes
of: ``paged_decode_attention`` over int8 pools (the q8 mode's cache) and over bf16 pools, its
torch fallback (2 threads only: it is slow), and the dense path the paged cache replaced (two
batched matmuls over ``[B, KVH, C, D]`` bf16 buffers, copied here so the comparison does not
move). The paged blocks of each row are scattered over the pool in a random order, as a long
running server leaves them. It also times ``quantize_kv`` (native and torch) for one new token
per row in every layer, the write side of an int8 cache. GB/s counts the cache bytes a pass
reads. Writes the ``decode_attention`` key of ``bench/results/kernels.json`` and
``kernels.md`` (see ``kernel_results``).
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
    kernel_path,
    kv_layout,
    paged_decode_attention,
    paged_reference,
    quantize_kv,
)
from qwen_grpc.engine.kv_cache import BLOCK_TOKENS

_LOGGER = logging.getLogger(__name__)

LAYERS = 24
BATCH = 8
# (heads, kv heads, head dim)
MODELS = {"Qwen1.5-0.5B": (16, 16, 64), "SmolLM2-135M": (9, 3, 64)}

Pass = Callable[[], None]
Pools = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


@dataclass
class Layer:
    """One layer's queries, its dense bf16 cache and the same tokens as int8 and bf16 pools."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    int8_pools: Pools
    bf16_pools: Pools


def attend_dense_bf16(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The dense cache's decode attention: two batched matmuls over bf16 buffers."""
    batch, heads, _, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale + bias
    probabilities = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probabilities, values).view(batch, heads, 1, head_dim)


def to_pool(dense: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[B, KVH, C, D]`` laid out as blocks ``[NB, KVH, BS, D]`` where ``table`` says."""
    batch, kv_heads, capacity, dim = dense.shape
    blocks = dense.view(batch, kv_heads, capacity // BLOCK_TOKENS, BLOCK_TOKENS, dim)
    pool = torch.empty(table.numel(), kv_heads, BLOCK_TOKENS, dim, dtype=dense.dtype)
    pool[table.flatten().long()] = blocks.permute(0, 2, 1, 3, 4).reshape(-1, *pool.shape[1:])
    return pool


def _pools(keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, int8: bool) -> Pools:
    if not int8:
        return to_pool(keys, table), None, to_pool(values, table), None
    (k, ks), (v, vs) = quantize_kv(keys), quantize_kv(values)
    return (
        to_pool(k, table),
        to_pool(ks.unsqueeze(-1), table).squeeze(-1),
        to_pool(v, table),
        to_pool(vs.unsqueeze(-1), table).squeeze(-1),
    )


def build_layers(
    shape: tuple[int, int, int], capacity: int, seed: int
) -> tuple[list[Layer], torch.Tensor]:
    """The layers and the block table they share (a random permutation of the pool)."""
    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(seed)
    blocks_per_row = capacity // BLOCK_TOKENS
    table = torch.randperm(BATCH * blocks_per_row, generator=generator).int()
    table = table.view(BATCH, blocks_per_row)
    layers = []
    for _ in range(LAYERS):
        queries = torch.randn(BATCH, heads, dim, generator=generator)
        keys = torch.randn(BATCH, kv_heads, capacity, dim, generator=generator).bfloat16()
        values = torch.randn(BATCH, kv_heads, capacity, dim, generator=generator).bfloat16()
        layers.append(
            Layer(
                queries,
                keys,
                values,
                _pools(keys, values, table, int8=True),
                _pools(keys, values, table, int8=False),
            )
        )
    return layers, table


def _paged_pass(
    layers: list[Layer], table: torch.Tensor, scale: float, int8: bool, native: bool
) -> Pass:
    attend = paged_decode_attention if native else paged_reference.paged_decode_attention
    lengths = torch.full((BATCH,), table.shape[1] * BLOCK_TOKENS, dtype=torch.int32)

    def run() -> None:
        for layer in layers:
            pools = layer.int8_pools if int8 else layer.bf16_pools
            attend(layer.queries, *pools, table, lengths, scale)

    return run


def _dense_pass(layers: list[Layer], capacity: int, scale: float) -> Pass:
    bias = torch.zeros(BATCH, 1, 1, capacity)
    queries = [layer.queries.bfloat16().unsqueeze(2) for layer in layers]

    def run() -> None:
        for q, layer in zip(queries, layers, strict=True):
            attend_dense_bf16(q, layer.keys, layer.values, bias, scale)

    return run


def _quantize_pass(shape: tuple[int, int, int], native: bool) -> Pass:
    _, kv_heads, dim = shape
    new = [torch.randn(BATCH, kv_heads, 1, dim).bfloat16() for _ in range(2 * LAYERS)]
    quantize = quantize_kv if native else kv_layout.quantize_kv

    def run() -> None:
        for states in new:
            quantize(states)

    return run


def _timing(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"ms_median": round(times[len(times) // 2] * 1e3, 3), "ms_min": round(times[0] * 1e3, 3)}


def _time(run: Pass, passes: int) -> dict[str, float]:
    return _time_interleaved({"run": run}, passes)["run"]


def _time_interleaved(runs: dict[str, Pass], passes: int) -> dict[str, dict[str, float]]:
    """Each pass runs every kernel once in turn, so a drift of the shared machine's memory
    speed hits all of them alike and their ratios hold."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(passes):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: _timing(samples) for name, samples in times.items()}


def run(capacities: list[int], passes: int, threads: list[int], seed: int) -> dict[str, Any]:
    """Every kernel at every model shape, length and thread count: the JSON-ready section."""
    info = machine_info()
    rows = []
    for model, shape in MODELS.items():
        _, kv_heads, dim = shape
        scale = 1 / math.sqrt(dim)
        for capacity in capacities:
            _LOGGER.info("building %s caches, %d tokens a row", model, capacity)
            layers, table = build_layers(shape, capacity, seed)
            cells = BATCH * kv_heads * capacity * LAYERS * 2
            kernels = {
                "paged_int8": (_paged_pass(layers, table, scale, True, True), cells * (dim + 4)),
                "paged_bf16": (_paged_pass(layers, table, scale, False, True), cells * dim * 2),
                "dense_bf16_two_bmm": (_dense_pass(layers, capacity, scale), cells * dim * 2),
                "paged_int8_fallback": (
                    _paged_pass(layers, table, scale, True, False),
                    cells * (dim + 4),
                ),
            }
            for count in threads:
                torch.set_num_threads(count)
                timed = {
                    name: attend
                    for name, (attend, _) in kernels.items()
                    if count == max(threads) or not name.endswith("_fallback")
                }
                _LOGGER.info("timing %s, %d threads, %d tokens a row", model, count, capacity)
                for name, timing in _time_interleaved(timed, passes).items():
                    nbytes = kernels[name][1]
                    rows.append(
                        {
                            "model": model,
                            "kernel": name,
                            "threads": count,
                            "capacity": capacity,
                            "bytes": nbytes,
                            "gb_per_s": round(nbytes / (timing["ms_median"] * 1e-3) / 1e9, 1),
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
    parser.add_argument(
        "--capacities",
        default="512,2048",
        help="comma-separated row lengths (multiples of the block size)",
    )
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
