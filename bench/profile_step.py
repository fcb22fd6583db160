"""``python -m bench.profile_step``: where one decode step's time goes, by torch operator.

When a target is missed, the benchmark's step timers say *whether* the model forward pass or
the service around it is slow; this says *which* part of the forward pass (linear layers,
attention, the logits head, cache copies) takes the time, at the batch sizes the bench uses.
It drives the same ``LoadedModel.prefill``/``decode`` the engine calls, without gRPC.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerActivity, profile

from bench.inprocess import bench_model_dir, load_like_the_server, on_thread
from bench.prompts import build_prompts

if TYPE_CHECKING:
    from qwen_grpc.engine.model import LoadedModel

_LOGGER = logging.getLogger(__name__)


def profile_decode(loaded: LoadedModel, batch: int, steps: int, top: int, skip: int = 0) -> str:
    """Prefills ``batch`` 64-token prompts, decodes ``skip`` steps, profiles ``steps`` more.

    ``skip`` moves the profile late into long answers (the memory run's 512 tokens), where the
    KV cache, not the weights, may dominate a step.
    """
    prompts = build_prompts(loaded.tokenizer, batch, 64)
    logits, cache, rows = loaded.prefill([list(p.token_ids) for p in prompts], 2 * steps + 3 + skip)
    tokens = logits.argmax(-1).tolist()

    def step() -> None:
        nonlocal tokens
        tokens = loaded.decode(tokens, cache, rows).argmax(-1).tolist()

    for _ in range(3 + skip):  # warm-up, then move along the answer
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = 1000 * (time.perf_counter() - started) / steps
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return (
        f"{loaded.dtype}, batch {batch}, context {64 + 3 + skip}: {step_ms:.1f} ms per decode "
        f"step ({batch * 1000 / step_ms:.1f} tok/s aggregate, {torch.get_num_threads()} "
        f"threads)\n{table}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    parser.add_argument("--dtype", default="auto", help="precision mode (default: auto)")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=16, help="decode steps to time and profile")
    parser.add_argument("--top", type=int, default=15, help="operators to list")
    parser.add_argument(
        "--skip-steps", type=int, default=0, help="decode steps to run before profiling"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=bench_model_dir(),
        help="model folder (default: the benchmark's Qwen-shaped model)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # Loaded on a helper thread and run on another, exactly like the server: which threads
    # load and run the model changes step times here (see bench.inprocess).
    loaded = load_like_the_server(args.model_dir, args.dtype, 0)

    def profile_all() -> None:
        for batch in (int(b) for b in args.batch.split(",")):
            report = profile_decode(loaded, batch, args.steps, args.top, args.skip_steps)
            sys.stdout.write(report + "\n")

    # As the engine runs the model: on its own thread (see bench.inprocess).
    on_thread("qwen-engine", profile_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
