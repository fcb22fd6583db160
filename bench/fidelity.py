"""Fidelity section: next-token agreement with float32, ours and llama.cpp's, on the demo model.

Speed ratios against llama.cpp only mean something if both sides compute the same model
equally well. So on the offline demo model (real weights: its choices are not noise), for a
few fixed texts, each engine is teacher-forced over the text and every position's argmax is
compared with float32's: our precision modes (every one in ``PRECISIONS``, so a new mode
joins by itself) and llama.cpp BF16 and Q8_0 on the same weights, all fed the same token ids.

``python -m bench.fidelity`` runs only this section and writes ``fidelity.{json,md}``;
``python -m bench.run`` runs it as part of the whole benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import llamacpp
from bench.fidelity_texts import FidelityText, encode_texts
from bench.isolate import run_isolated
from bench.llamacpp_build import build_info
from bench.machine import machine_info
from bench.ratios import fidelity_ratios

_LOGGER = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "float32"
LLAMACPP_OUTTYPES = {"bf16": "llamacpp_bf16", "q8_0": "llamacpp_q8_0"}


def engine_choices(
    model_dir: Path, precision: str, texts: Sequence[tuple[int, ...]], threads: int
) -> list[list[int]]:
    """Our engine's argmax at every position of each text, in ``precision``."""
    from qwen_grpc.engine.model import load_model

    model = load_model(model_dir, precision, threads)
    return [model.score(list(ids)).argmax(dim=-1).tolist() for ids in texts]


def llamacpp_choices(
    gguf_path: Path, texts: Sequence[tuple[int, ...]], threads: int
) -> list[list[int]]:
    """llama.cpp's argmax at every position: one ``eval`` of the whole text, all logits kept."""
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(ids) for ids in texts)
    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=longest + 8,
        n_batch=longest,
        n_ubatch=longest,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    choices: list[list[int]] = []
    for ids in texts:
        llm.reset()
        llm.eval(list(ids))
        choices.append(np.asarray(llm.scores[: len(ids)]).argmax(axis=-1).tolist())
    return choices


def agreement(
    texts: Sequence[FidelityText],
    choices: Sequence[Sequence[int]],
    reference: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Per text and pooled over all positions: the share whose argmax equals the reference's."""
    per_text: dict[str, dict[str, Any]] = {}
    for text, chosen, expected in zip(texts, choices, reference, strict=True):
        if len(chosen) != len(expected):
            raise ValueError(f"{text.name}: {len(chosen)} choices against {len(expected)}")
        agree = sum(a == b for a, b in zip(chosen, expected, strict=True))
        per_text[text.name] = {
            "positions": len(expected),
            "agree": agree,
            "agreement": round(agree / len(expected), 4),
        }
    positions = sum(row["positions"] for row in per_text.values())
    agree = sum(row["agree"] for row in per_text.values())
    return {
        "per_text": per_text,
        "pooled": {
            "positions": positions,
            "agree": agree,
            "agreement": round(agree / positions, 4),
        },
    }


def _attempt(what: str, step: Callable[[], list[list[int]]]) -> list[list[int]] | str:
    """The choices, or the error text: one failing engine must not lose the others."""
    started = time.perf_counter()
    try:
        result = step()
    except Exception as exc:
        _LOGGER.exception("fidelity: %s failed", what)
        return f"{type(exc).__name__}: {exc}"[:2000]
    _LOGGER.info("fidelity: %s done in %.0f s", what, time.perf_counter() - started)
    return result


def _engine_runs(
    model_dir: Path, models_dir: Path, texts: Sequence[FidelityText], threads: int
) -> dict[str, list[list[int]] | str]:
    """Every engine's choices (or its error), each engine in its own process."""
    from qwen_grpc.engine.precision import PRECISIONS

    ids = [text.token_ids for text in texts]
    runs: dict[str, list[list[int]] | str] = {}
    for precision in PRECISIONS:

        def ours(precision: str = precision) -> list[list[int]]:
            return run_isolated(engine_choices, model_dir, precision, ids, threads)

        runs[precision] = _attempt(precision, ours)
    version = llamacpp.installed_version()
    for outtype, name in LLAMACPP_OUTTYPES.items():
        if version is None:
            runs[name] = "llama-cpp-python is not installed (pip install -e '.[bench]')"
            continue

        def step(outtype: str = outtype, version: str = version) -> list[list[int]]:
            gguf = llamacpp.convert(model_dir, models_dir, outtype, version)
            return run_isolated(llamacpp_choices, gguf, ids, threads)

        runs[name] = _attempt(name, step)
    return runs


def measure_fidelity(model_dir: Path, models_dir: Path, threads: int) -> dict[str, Any]:
    """The whole section: texts, per-engine agreement with float32, ratios, llama.cpp's build.

    Args:
        model_dir: the demo model folder (``resolve_model("demo", ...)``).
        models_dir: where the GGUF conversions are cached.
        threads: torch and llama.cpp threads alike.
    """
    from transformers import AutoTokenizer

    texts = encode_texts(AutoTokenizer.from_pretrained(model_dir))
    runs = _engine_runs(model_dir, models_dir, texts, threads)
    reference = runs.get(REFERENCE)
    engines: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        if isinstance(run, str):
            engines[name] = {"error": run}
        elif isinstance(reference, str) or reference is None:
            engines[name] = {"error": f"no {REFERENCE} reference to compare with"}
        else:
            engines[name] = agreement(texts, run, reference)
    llamacpp_build: dict[str, Any]
    try:
        llamacpp_build = run_isolated(build_info)
    except Exception as exc:
        llamacpp_build = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {
        "model": {"name": "demo", "dir": str(model_dir)},
        "reference": REFERENCE,
        "threads": threads,
        "texts": [{"name": text.name, "tokens": len(text.token_ids)} for text in texts],
        "engines": engines,
        "ratios": fidelity_ratios(engines),
        "llamacpp_build": llamacpp_build,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cache = Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO_ROOT / ".cache"))
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=cache, help="holds wheels/ and models")
    parser.add_argument(
        "--out-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="for fidelity.*"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads per engine (default: 2)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.fidelity_report import render_fidelity
    from qwen_grpc.engine.sources import resolve_model

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    model_dir = resolve_model("demo", None, args.cache_dir).path
    results: dict[str, Any] = {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "fidelity": measure_fidelity(model_dir, args.cache_dir / "bench-models", args.threads),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "fidelity.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    machine = results["machine"]
    markdown = "\n".join(
        [
            "# qwen-grpc fidelity",
            "",
            f"{results['started_at']} · {machine['cpu_model']} · CPU flags: "
            f"{', '.join(machine['cpu_flags'])}",
            "",
            *render_fidelity(results["fidelity"]),
        ]
    )
    (args.out_dir / "fidelity.md").write_text(markdown, "utf-8")
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
