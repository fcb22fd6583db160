"""llama.cpp on the long-prompt-joins-streams scenario, batched the way its server batches.

llama.cpp's server fills each ``llama_decode`` batch with the sampled token of every generating
slot first, then with the next tokens of a pending prompt up to ``n_batch`` tokens in all, so a
long prompt is prefilled over several calls, each of which also advances every running
sequence by one token. This drives llama-cpp-python's low-level API the same way: the streams
prefilled and decoding, then after ``steady_steps`` steps the long prompt arrives and joins in
chunks. Every stream gets one token per call, so a stream's gap is the time from one call's
end to the next one's (sampling included), as a client of that server would see it.
An anchor beside our server's figures; it runs in its own process (:mod:`bench.isolate`).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.quiet import Quiet, measure_quietly
from bench.stats import percentile

Entry = tuple[int, int, int, bool]
"""A batch entry: token, position, sequence, whether its logits are wanted."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def measure_join(
    gguf_path: Path,
    streams: Sequence[tuple[int, ...]],
    long: tuple[int, ...],
    n_batch: int,
    steady_steps: int,
    long_new_tokens: int,
    n_threads: int,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """Greedy streams with ``long`` joining them; its TTFT and the streams' gaps."""
    if n_batch <= len(streams):
        raise ValueError(f"n_batch {n_batch} leaves no room beside {len(streams)} decode tokens")
    import llama_cpp as lib
    import numpy as np

    # llama-cpp-python routes llama.cpp's log through this logger; its INFO is pages per load.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    long_seq = len(streams)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(
        str(gguf_path).encode(), lib.llama_model_default_params()
    )
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    params = lib.llama_context_default_params()
    params.n_seq_max = len(streams) + 1
    chunks = -(-len(long) // max(1, n_batch - len(streams)))
    longest = max(
        max(len(s) for s in streams) + steady_steps + chunks + long_new_tokens,
        len(long) + long_new_tokens,
    )
    # Each sequence gets n_ctx / n_seq_max cells, in llama.cpp's padding of 256.
    params.n_ctx = params.n_seq_max * -(-(longest + 8) // 256) * 256
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    batch = lib.llama_batch_init(n_batch, 0, 1)

    def decode(entries: Sequence[Entry]) -> dict[int, int]:
        """One ``llama_decode``; the greedy next token of every entry that wants logits."""
        for index, (token, position, sequence, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = logits
        batch.n_tokens = len(entries)
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        sampled: dict[int, int] = {}
        for index, (_, _, sequence, logits) in enumerate(entries):
            if logits:
                row = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), (n_vocab,))
                sampled[sequence] = int(row.argmax())
        return sampled

    def run(prompt: tuple[int, ...], steady: int, new_tokens: int) -> dict[str, Any]:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        entries = [
            (token, position, sequence, position == len(s) - 1)
            for sequence, s in enumerate(streams)
            for position, token in enumerate(s)
        ]
        tokens: dict[int, int] = {}
        for start in range(0, len(entries), n_batch):
            tokens.update(decode(entries[start : start + n_batch]))
        positions = {sequence: len(s) for sequence, s in enumerate(streams)}
        ends = [time.perf_counter()]

        def step(extra: Sequence[Entry]) -> dict[int, int]:
            running = [(tokens[q], positions[q], q, True) for q in sorted(positions)]
            sampled = decode([*running, *extra])
            for sequence in positions:
                tokens[sequence] = sampled[sequence]
                positions[sequence] += 1
            ends.append(time.perf_counter())
            return sampled

        for _ in range(steady):
            step(())
        arrival = time.perf_counter()
        room = n_batch - len(positions)
        for start in range(0, len(prompt), room):
            chunk = [
                (token, position, long_seq, position == len(prompt) - 1)
                for position, token in enumerate(prompt[start : start + room], start)
            ]
            sampled = step(chunk)
        first = ends[-1]
        tokens[long_seq], positions[long_seq] = sampled[long_seq], len(prompt)
        for _ in range(new_tokens - 1):
            step(())
        gaps = [(later - earlier, later) for earlier, later in itertools.pairwise(ends)]
        inside = [gap for gap, end in gaps if arrival < end <= first]
        outside = [gap for gap, end in gaps if not arrival < end <= first]
        return {
            "ttft_ms": _ms(first - arrival),
            "calls_in_window": len(inside),
            "gap_ms_in_window": {
                "count": len(inside),
                "p50": _ms(percentile(inside, 50)),
                "p99": _ms(percentile(inside, 99)),
                "max": _ms(max(inside, default=None)),
            },
            "median_step_ms": _ms(statistics.median(outside)) if outside else None,
        }

    try:
        run(long[: 2 * n_batch], 4, 2)  # warm-up: first-touch of the weights, thread pool start
        measured = measure_quietly(
            f"llama.cpp {gguf_path.stem} join",
            lambda: run(long, steady_steps, long_new_tokens),
            quiet or Quiet(),
        )
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    return {
        "gguf": str(gguf_path),
        "n_threads": n_threads,
        "n_batch": n_batch,
        "kv_unified": bool(params.kv_unified),
        "streams": len(streams),
        "stream_prompt_tokens": max(len(s) for s in streams),
        "long_prompt_tokens": len(long),
        **measured.value,
        "cpu_stall_share": measured.stall_share,
        "attempts": measured.attempts,
    }
