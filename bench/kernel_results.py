"""``bench/results/kernels.{json,md}``: one file pair that several kernel benches fill in.

Each bench owns some top-level keys of the JSON record (``kernel_bench``: the q8 linears;
``kv_bench``: ``decode_attention``, the paged cache's kernel; ``chunk_bench``:
``chunk_attention``, a prompt chunk's) and replaces only those, so running one bench keeps the
others' last numbers; the Markdown is rendered from the merged record every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_results(out: Path, update: dict[str, Any]) -> str:
    """Merges ``update`` into ``out/kernels.json``, rewrites both files, returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "kernels.json"
    record = json.loads(target.read_text()) if target.exists() else {}
    record.update(update)
    target.write_text(json.dumps(record, indent=2) + "\n")
    markdown = render_markdown(record)
    (out / "kernels.md").write_text(markdown)
    return markdown


def render_markdown(record: dict[str, Any]) -> str:
    """The table view of every section the record holds."""
    sections = []
    if "results" in record:
        sections.append(_render_q8(record))
    if "decode_attention" in record:
        sections.append(_render_attention(record["decode_attention"]))
    if "chunk_attention" in record:
        sections.append(_render_chunk(record["chunk_attention"]))
    return "\n".join(sections)


def _render_chunk(section: dict[str, Any]) -> str:
    lines = [
        "# Prompt-chunk attention microbenchmark",
        "",
        _machine_line(section["machine"]),
        f"{section['kernel_path']}. One pass = one row's chunk attending over its history "
        f"(int8 pools, blocks in random order) and itself in all {section['layers']} layers, "
        "Qwen1.5-0.5B shape; median of the passes, the paths timed in turn. `native` is "
        "`chunk.cpp`; `sdpa_history_given` is torch's SDPA with the history already float32 "
        "(its copy not counted); `fallback` gathers the history, then SDPA. Position 0 is a "
        "one-pass prefill.",
        "",
        "| history tokens | chunk | kernel | threads | ms / pass (median) | ms (min) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for row in section["results"]:
        lines.append(
            f"| {row['position']} | {row['chunk']} | {row['kernel']} | {row['threads']} | "
            f"{row['ms_median']:.2f} | {row['ms_min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _machine_line(machine: dict[str, Any]) -> str:
    return (
        f"CPU: {machine['cpu_model']} ({', '.join(machine['cpu_flags'])}), "
        f"load average {machine['load_average_start']} → {machine['load_average_end']}."
    )


def _render_q8(record: dict[str, Any]) -> str:
    lines = [
        "# Q8_0 kernel microbenchmark",
        "",
        _machine_line(record["machine"]),
        f"{record['kernel_path']}. One pass = all {record['matrices']} linears of Qwen1.5-0.5B "
        "(distinct weights, cold); median of the passes.",
        "",
        "| kernel | threads | batch | ms / pass (median) | ms (min) | GB/s | MB read | lm_head ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["results"]:
        lines.append(
            f"| {row['kernel']} | {row['threads']} | {row['batch']} | {row['ms_median']:.2f} | "
            f"{row['ms_min']:.2f} | {row['gb_per_s']:.1f} | {row['weight_bytes'] / 1e6:.0f} | "
            f"{row['ms_by_kind']['lm_head']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _render_attention(section: dict[str, Any]) -> str:
    lines = [
        "# Decode attention microbenchmark",
        "",
        _machine_line(section["machine"]),
        f"{section['kernel_path']}. One pass = decode attention of one token per row in all "
        f"{section['layers']} layers (distinct caches, cold), batch {section['batch']}, every "
        "row `capacity` tokens long; median of the passes, the kernels of a row group timed in "
        "turn. `paged_*` read the paged pools (blocks of 32 tokens scattered over the pool); "
        "`dense_bf16_two_bmm` is the dense, padded cache's two batched matmuls they replaced; "
        "`quantize_kv` (native) and `quantize_kv_torch` are the per-step cost of quantizing "
        "the new keys and values (2 calls per layer).",
        "",
        "| model | kernel | threads | capacity | ms / pass (median) | ms (min) | GB/s | MB read |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in section["results"]:
        lines.append(
            f"| {row['model']} | {row['kernel']} | {row['threads']} | {row['capacity']} | "
            f"{row['ms_median']:.2f} | {row['ms_min']:.2f} | {row['gb_per_s']:.1f} | "
            f"{row['bytes'] / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"
