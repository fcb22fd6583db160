"""The fidelity section's arithmetic and view, without models or llama-cpp-python (seconds)."""

from __future__ import annotations

from bench.fidelity import agreement
from bench.fidelity_report import render_fidelity
from bench.fidelity_texts import FidelityText
from bench.llamacpp_build import amx_note, system_features
from bench.ratios import FIDELITY_RATIO_KEYS, NO_Q8_MODE, fidelity_ratios
from qwen_grpc.engine.precision import PRECISIONS

TEXTS = [FidelityText("a", (1, 2, 3, 4)), FidelityText("b", (5, 6))]
REFERENCE = [[1, 2, 3, 4], [5, 6]]


def test_agreement_counts_matching_argmax_per_text_and_pooled() -> None:
    result = agreement(TEXTS, [[1, 2, 0, 4], [0, 6]], REFERENCE)

    assert result["per_text"]["a"] == {"positions": 4, "agree": 3, "agreement": 0.75}
    assert result["per_text"]["b"]["agreement"] == 0.5
    assert result["pooled"] == {"positions": 6, "agree": 4, "agreement": 0.6667}


def test_fidelity_ratios_divide_pooled_agreement_and_never_invent_q8() -> None:
    engines = {
        name: agreement(TEXTS, REFERENCE, REFERENCE)
        for name in (*PRECISIONS, "llamacpp_bf16", "llamacpp_q8_0")
    }
    engines["bfloat16"] = agreement(TEXTS, [[1, 2, 3, 4], [5, 0]], REFERENCE)

    ratios = fidelity_ratios(engines)

    assert tuple(ratios) == FIDELITY_RATIO_KEYS
    assert ratios["fidelity_bf16_vs_llamacpp_bf16"] == round(5 / 6, 4)
    if "q8" in PRECISIONS:
        assert ratios["fidelity_vs_llamacpp_q8"] == 1.0
    else:
        assert ratios["fidelity_vs_llamacpp_q8"] == NO_Q8_MODE


def test_system_info_parsing_tells_whether_amx_is_in_the_library() -> None:
    with_amx = system_features("CPU : AVX2 = 1 | AMX_INT8 = 1 | OPENMP = 1 |")
    without = system_features("CPU : AVX2 = 1 | AVX512_VNNI = 1 |")

    assert with_amx == {"AVX2": "1", "AMX_INT8": "1", "OPENMP": "1"}
    assert "ENABLED" in amx_note(with_amx)
    assert "not enabled" in amx_note(without)


def test_fidelity_markdown_has_a_row_per_engine_and_both_ratios() -> None:
    engines = {"float32": agreement(TEXTS, REFERENCE, REFERENCE), "llamacpp_bf16": {"error": "x"}}
    fidelity = {
        "reference": "float32",
        "threads": 2,
        "texts": [{"name": "a", "tokens": 4}, {"name": "b", "tokens": 2}],
        "engines": engines,
        "ratios": fidelity_ratios(engines),
        "llamacpp_build": {"error": "not installed"},
    }

    markdown = "\n".join(render_fidelity(fidelity))

    assert "| qwen-grpc `float32` | 1.0000 | 1.0000 | **1.0000** (6/6) |" in markdown
    assert "| llama.cpp BF16 | failed: x |" in markdown
    for key in FIDELITY_RATIO_KEYS:
        assert f"`{key}`" in markdown
