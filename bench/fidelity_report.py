"""The fidelity section as Markdown: agreement per engine and text, the ratios, llama.cpp's build.

Shared by ``latest.md`` (the whole benchmark) and ``fidelity.md`` (``python -m bench.fidelity``).
"""

from __future__ import annotations

from typing import Any

ENGINE_LABELS = {
    "llamacpp_bf16": "llama.cpp BF16",
    "llamacpp_q8_0": "llama.cpp Q8_0",
}
RATIO_LABELS = {
    "fidelity_bf16_vs_llamacpp_bf16": "our bfloat16 pooled agreement ÷ llama.cpp BF16's",
    "fidelity_vs_llamacpp_q8": "our q8 pooled agreement ÷ llama.cpp Q8_0's",
}


def _label(engine: str) -> str:
    return ENGINE_LABELS.get(engine, f"qwen-grpc `{engine}`")


def _ratio(value: float | str | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else value


def render_fidelity(fidelity: dict[str, Any]) -> list[str]:
    """Markdown lines of the section (a heading, three small tables, notes)."""
    names = [text["name"] for text in fidelity["texts"]]
    header = " | ".join(f"{text['name']} ({text['tokens']})" for text in fidelity["texts"])
    lines = [
        f"## Fidelity: next-token agreement with {fidelity['reference']} (demo model)",
        "",
        f"Teacher-forced over each text (token count in brackets), every engine fed the same "
        f"token ids; the share of positions whose argmax equals {fidelity['reference']}'s. "
        f"{fidelity['threads']} threads per engine.",
        "",
        f"| engine | {header} | pooled |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for engine, run in fidelity["engines"].items():
        if "error" in run:
            lines.append(f"| {_label(engine)} | failed: {run['error'][:200]} |")
            continue
        cells = [f"{run['per_text'][name]['agreement']:.4f}" for name in names]
        pooled = run["pooled"]
        lines.append(
            f"| {_label(engine)} | {' | '.join(cells)} | **{pooled['agreement']:.4f}** "
            f"({pooled['agree']}/{pooled['positions']}) |"
        )
    lines += ["", "| ratio | measured |", "|---|---|"]
    for key, value in fidelity["ratios"].items():
        lines.append(f"| `{key}`: {RATIO_LABELS[key]} | {_ratio(value)} |")
    lines += ["", *build_lines(fidelity.get("llamacpp_build", {}))]
    lines.append("")
    return lines


def build_lines(build: dict[str, Any]) -> list[str]:
    """llama.cpp's build options, compiled-in CPU features and AMX state (``llamacpp_build``)."""
    if "error" in build:
        return [f"llama.cpp build: unknown ({build['error']})"]
    options = "unknown" if build["cmake_args"] is None else f"`{build['cmake_args']}`"
    return [
        "llama.cpp build:",
        f"* CMake options: {options} ({build['cmake_args_source']})",
        f"* system info: `{build['system_info']}`",
        f"* **{build['amx_note']}**",
    ]
