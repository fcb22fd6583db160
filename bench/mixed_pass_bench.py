"""``python -m bench.mixed_pass_bench``: what a prompt chunk adds to a pass of decoding rows.

Chunked prefill bounds the running streams' gap at ``prefill_step_factor`` decode steps, so a
long prompt's TTFT is at least its chunks' added work ``G`` times ``k / (k - 1)``, however the
chunks are cut (the README's mixed-load section derives it). Whether the TTFT target can be met
hangs on ``G`` against the one-pass prefill ``P``, and this measures both on the engine's own
forward pass (``LoadedModel.step``, no gRPC): passes of 7 decode rows alone and with chunks of
several sizes at several depths of a 2,000-token prompt, and the prompt's one-pass prefill.
Each pass runs every chunk size once in turn (a drift of the shared machine hits them alike),
and each figure is the fastest of ``--passes``. Writes ``bench/results/mixed_pass.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.inprocess import bench_model_dir, load_like_the_server, on_thread
from bench.kv_bench import Pass, _time, _time_interleaved
from bench.machine import machine_info
from qwen_grpc.engine.step_plan import Segment, plan_step

if TYPE_CHECKING:
    from qwen_grpc.engine.kv_cache import PagedKVCache
    from qwen_grpc.engine.model import LoadedModel

_LOGGER = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "mixed_pass"
DECODE_ROWS = 7
DECODE_HISTORY = 130
PROMPT_TOKENS = 2000
DEPTHS = (0, 1000, 1900)
CHUNKS = (16, 48, 96)


def _measure(model: LoadedModel, passes: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)

    def ids(count: int) -> list[int]:
        return torch.randint(100, 30000, (count,), generator=generator).tolist()

    cache = model.new_cache(4 * PROMPT_TOKENS)
    rows = [cache.open_row(DECODE_HISTORY + 64) for _ in range(DECODE_ROWS)]
    prompt = cache.open_row(PROMPT_TOKENS + 96)
    for row in rows:
        _run(model, cache, [Segment.next_token(row, ids(DECODE_HISTORY))], commit=True)

    def mixed(chunk: int) -> Pass:
        # Not committed: every pass writes the same slots, so rows stay where they are.
        segments = [Segment.next_token(row, ids(1)) for row in rows]
        if chunk:
            segments.append(Segment.inner(prompt, ids(chunk)))
        return lambda: _run(model, cache, segments, commit=False)

    depths: dict[str, Any] = {}
    for depth in DEPTHS:
        while prompt.length < depth:
            piece = ids(min(500, depth - prompt.length))
            _run(model, cache, [Segment.inner(prompt, piece)], commit=True)
        timed = _time_interleaved({str(c): mixed(c) for c in (0, *CHUNKS)}, passes)
        decode = timed["0"]["ms_min"]
        added = {str(c): round(timed[str(c)]["ms_min"] - decode, 2) for c in CHUNKS}
        depths[str(depth)] = {
            "decode_pass_ms": decode,
            "chunk_added_ms": added,
            "chunk_added_ms_per_token": {c: round(ms / int(c), 3) for c, ms in added.items()},
        }
    whole = ids(PROMPT_TOKENS)

    def one_pass() -> None:
        fresh = model.new_cache(PROMPT_TOKENS + 16)
        row = fresh.open_row(PROMPT_TOKENS + 1)
        _run(model, fresh, [Segment.next_token(row, whole)], commit=False)

    prefill = _time(one_pass, max(2, passes // 2))["ms_min"]
    return {
        "decode_rows": DECODE_ROWS,
        "prompt_tokens": PROMPT_TOKENS,
        "depths": depths,
        "one_pass_prefill_ms": prefill,
        "one_pass_prefill_ms_per_token": round(prefill / PROMPT_TOKENS, 3),
    }


def _run(model: LoadedModel, cache: PagedKVCache, segments: list[Segment], commit: bool) -> None:
    plan = plan_step(cache, segments)
    model.step(plan, cache)
    if commit:
        plan.commit()


def _markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        "# What a prompt chunk adds to a pass of decoding rows",
        "",
        f"{machine['cpu_model']}, {result['threads']} threads, precision `{result['dtype']}`, "
        f"{result['decode_rows']} decode rows of ~{DECODE_HISTORY} tokens; fastest of "
        f"{result['passes']} passes (`python -m bench.mixed_pass_bench`).",
        "",
        "| prompt depth | decode pass ms | "
        + " | ".join(f"+{c} tokens ms (per token)" for c in CHUNKS)
        + " |",
        "|---" * (2 + len(CHUNKS)) + "|",
    ]
    for depth, row in result["depths"].items():
        cells = [
            f"{row['chunk_added_ms'][str(c)]} ({row['chunk_added_ms_per_token'][str(c)]})"
            for c in CHUNKS
        ]
        lines.append(f"| {depth} | {row['decode_pass_ms']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"One-pass prefill of {result['prompt_tokens']} tokens: {result['one_pass_prefill_ms']} ms "
        f"({result['one_pass_prefill_ms_per_token']} ms a token).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_pass_bench", description=__doc__)
    parser.add_argument("--dtype", default="q8", help="precision mode (default: q8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=bench_model_dir(),
        help="model folder (default: the benchmark's Qwen-shaped model, built by make bench)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="path without suffix")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = load_like_the_server(args.model_dir, args.dtype, args.threads)
    result = {
        "machine": machine_info(),
        "dtype": model.dtype,
        "threads": args.threads,
        "passes": args.passes,
        **on_thread("qwen-engine", lambda: _measure(model, args.passes)),
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    _LOGGER.info("wrote %s.{json,md}", args.out)


if __name__ == "__main__":
    main()
