"""llama.cpp's own batched decode: 8 sequences in one ``llama_decode`` per step.

Our aggregate at 8 streams was only ever compared with llama.cpp's *single* stream, which
flatters any batching engine: llama.cpp batches too. This drives llama-cpp-python's low-level
API the way llama.cpp's ``batched`` example does: one context with ``n_seq_max`` sequences,
all prompts prefilled in one batch (each token tagged with its sequence id), then one batch of
one token per sequence per step, greedy. Aggregate decode tok/s counts the tokens after each
sequence's first over the time of the decode steps, as the gRPC aggregate does.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.quiet import Quiet, measure_quietly


def measure_batched(
    gguf_path: Path,
    prompts: Sequence[tuple[int, ...]],
    max_new_tokens: int,
    repeats: int,
    n_threads: int,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """Greedy generation of ``max_new_tokens`` for every prompt at once, timed ``repeats`` times.

    Meant to run in its own process (:mod:`bench.isolate`).
    """
    import llama_cpp as lib
    import numpy as np

    # llama-cpp-python routes llama.cpp's log through this logger; its INFO is pages per load.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    sequences = len(prompts)
    prefill_tokens = sum(len(prompt) for prompt in prompts)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(
        str(gguf_path).encode(), lib.llama_model_default_params()
    )
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    params = lib.llama_context_default_params()
    params.n_seq_max = sequences
    # Each sequence gets n_ctx / n_seq_max cells, in llama.cpp's padding of 256.
    per_sequence = -(-(max(len(prompt) for prompt in prompts) + max_new_tokens + 8) // 256) * 256
    params.n_ctx = sequences * per_sequence
    params.n_batch = params.n_ubatch = max(prefill_tokens, sequences)
    params.n_threads = params.n_threads_batch = n_threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    batch = lib.llama_batch_init(params.n_batch, 0, sequences)

    def decode(entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        for index, (token, position, sequence, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits
        batch.n_tokens = len(entries)
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(index: int) -> int:
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), (n_vocab,))
        return int(logits.argmax())

    def run(new_tokens: int) -> tuple[float, float]:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        entries: list[tuple[int, int, int, bool]] = []
        last: list[int] = []
        for sequence, prompt in enumerate(prompts):
            for position, token in enumerate(prompt):
                entries.append((token, position, sequence, position == len(prompt) - 1))
            last.append(len(entries) - 1)
        start = time.perf_counter()
        decode(entries)
        tokens = [argmax(index) for index in last]
        first = time.perf_counter()
        for step in range(new_tokens - 1):
            decode(
                [
                    (token, len(prompts[sequence]) + step, sequence, True)
                    for sequence, token in enumerate(tokens)
                ]
            )
            tokens = [argmax(index) for index in range(sequences)]
        end = time.perf_counter()
        return first - start, end - first

    try:
        run(8)  # warm-up: first-touch of the weights, thread pool start
        measured = [
            measure_quietly(
                f"llama.cpp {gguf_path.stem} batched {sequences}",
                functools.partial(run, max_new_tokens),
                quiet or Quiet(),
            )
            for _ in range(repeats)
        ]
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    rates = [sequences * (max_new_tokens - 1) / m.value[1] for m in measured]
    return {
        "gguf": str(gguf_path),
        "n_threads": n_threads,
        "sequences": sequences,
        "kv_unified": bool(params.kv_unified),
        "prompt_tokens": [len(prompt) for prompt in prompts],
        "max_new_tokens": max_new_tokens,
        "aggregate_decode_tok_s": round(statistics.median(rates), 3),
        "aggregate_decode_tok_s_runs": [round(rate, 3) for rate in rates],
        "prefill_ms": round(statistics.median(m.value[0] * 1000 for m in measured), 3),
        "cpu_stall_shares": [m.stall_share for m in measured],
        "attempts": [m.attempts for m in measured],
        "waited_for_quiet_s": [m.waited_s for m in measured],
    }
