"""Prompt-chunk attention microbenchmark: the native kernel against torch's SDPA.

A chunk of a joining prompt attends over its row's history in the paged cache and over its own
tokens. ``python -m bench.chunk_bench`` builds, for the Qwen1.5-0.5B shape, 24 layers of int8
pools holding one row's history (blocks in a random order) and times full passes of:
``paged_chunk_attention`` natively (``native``); torch's SDPA over a history already widened
to float32 (``sdpa_history_given``: the floor of any path that materializes the history, its
copy not counted); and the torch fallback, which gathers and widens the history, then runs
SDPA (``fallback``). Position 0 is a prompt's one-pass prefill. Writes the
``chunk_attention`` key of ``bench/results/kernels.json`` and ``kernels.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional

from bench.kernel_results import RESULTS, write_results
from bench.kv_bench import Pass, _time_interleaved
from bench.machine import load_average, machine_info
from qwen_grpc.engine.kernels import (
    kernel_path,
    paged_chunk_attention,
    paged_reference,
    quantize_kv,
)
from qwen_grpc.engine.kv_cache import BLOCK_TOKENS

_LOGGER = logging.getLogger(__name__)

LAYERS = 24
HEADS, KV_HEADS, DIM = 16, 16, 64
# (history tokens, chunk tokens): a 48-token chunk mid-prompt and near the end of a
# 2,000-token prompt, and the whole prompt in one pass.
CASES = ((1000, 48), (1952, 48), (0, 2000))


@dataclass
class ChunkLayer:
    """One layer's chunk, its int8 pools holding the row's history, the row's block ids, and
    the same history widened to float32 ``[KVH, position, D]``."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    pools: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    blocks: torch.Tensor
    history_keys: torch.Tensor
    history_values: torch.Tensor


def _layer(position: int, count: int, generator: torch.Generator) -> ChunkLayer:
    blocks = max(1, -(-position // BLOCK_TOKENS))
    states = torch.randn(2, blocks, KV_HEADS, BLOCK_TOKENS, DIM, generator=generator)
    (keys, key_scales), (values, value_scales) = quantize_kv(states[0]), quantize_kv(states[1])
    ids = torch.randperm(blocks, generator=generator).int()
    used = paged_reference.used_blocks(ids, max(position, 1), BLOCK_TOKENS, blocks, 0)
    history = [
        paged_reference.gather_tokens(pool, scales, used, position)
        for pool, scales in ((keys, key_scales), (values, value_scales))
    ]
    chunk = torch.randn(3, count, HEADS, DIM, generator=generator)
    pools = (keys, key_scales, values, value_scales)
    return ChunkLayer(chunk[0], chunk[1], chunk[2], pools, ids, history[0], history[1])


def _passes(position: int, count: int, seed: int) -> dict[str, Pass]:
    generator = torch.Generator().manual_seed(seed)
    layers = [_layer(position, count, generator) for _ in range(LAYERS)]
    scale = 1 / math.sqrt(DIM)
    mask = torch.arange(position + count) <= torch.arange(position, position + count)[:, None]

    def native() -> None:
        for layer in layers:
            paged_chunk_attention(
                layer.queries, layer.keys, layer.values, *layer.pools, layer.blocks, position, scale
            )

    def fallback() -> None:
        for layer in layers:
            paged_reference.chunk_attention(
                layer.queries, layer.keys, layer.values, *layer.pools, layer.blocks, position, scale
            )

    def sdpa_history_given() -> None:
        for layer in layers:
            functional.scaled_dot_product_attention(
                layer.queries.transpose(0, 1).unsqueeze(0),
                torch.cat([layer.history_keys, layer.keys.transpose(0, 1)], dim=1).unsqueeze(0),
                torch.cat([layer.history_values, layer.values.transpose(0, 1)], dim=1).unsqueeze(0),
                attn_mask=mask if position else None,
                is_causal=not position,
                scale=scale,
            )

    return {"native": native, "sdpa_history_given": sdpa_history_given, "fallback": fallback}


def run(passes: int, threads: list[int], seed: int) -> dict[str, Any]:
    """Every path at every case and thread count: the JSON-ready section."""
    info = machine_info()
    rows = []
    for position, count in CASES:
        _LOGGER.info(
            "building %d layers: %d tokens of history, chunk of %d", LAYERS, position, count
        )
        runs = _passes(position, count, seed)
        for threads_now in threads:
            torch.set_num_threads(threads_now)
            for name, timing in _time_interleaved(runs, passes).items():
                rows.append(
                    {"position": position, "chunk": count, "kernel": name, "threads": threads_now}
                    | timing
                )
    info["load_average_end"] = load_average()
    return {"machine": info, "kernel_path": kernel_path(), "layers": LAYERS, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    section = run(args.passes, [int(t) for t in args.threads.split(",")], args.seed)
    _LOGGER.info("%s", write_results(args.out, {"chunk_attention": section}))


if __name__ == "__main__":
    main()
