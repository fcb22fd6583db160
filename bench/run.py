"""``python -m bench.run``: the whole benchmark of issue 3 in one command (``make bench``).

Steps: build (or reuse) the Qwen-shaped random-weight model; for each precision mode start the
real server and drive it over gRPC, then time the engine in process on the same weights; time
transformers eager ``generate`` in float32 (the seed's way); convert the weights to GGUF bf16 and
Q8_0 and time llama.cpp, single stream and its own batched decode of 8 sequences, recording how
it was built; measure next-token agreement with float32 on the demo model (``bench/fidelity.py``);
run the mixed-load scenarios through the server (``bench/mixed_load.py``: a long prompt joining
running streams, short and long conversations' peak memory, fair and deadline-aware admission)
with their in-process and llama.cpp anchors; compute the ratios; write
``bench/results/latest.{json,md,png}``. ``--only mixed`` (or any section) runs that alone.
Every baseline runs in its own process, one after another, so none competes for the two cores.
A failing peer is recorded as an error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import llamacpp
from bench.fidelity import measure_fidelity
from bench.grpc_bench import LoadPlan, bench_server, rss_run
from bench.inprocess import engine_prefill, engine_single_stream, transformers_eager
from bench.isolate import run_isolated
from bench.llamacpp_batched import measure_batched
from bench.llamacpp_build import build_info
from bench.llamacpp_mixed import measure_join
from bench.machine import cpu_pressure, load_average, machine_info
from bench.mixed_load import MixedServers, bench_mixed, serving_settings
from bench.mixed_plan import MixedPlan, MixedPrompts, build_mixed_prompts
from bench.prompts import BenchPrompt, build_prompts
from bench.quiet import Quiet, cpu_stall_us
from bench.ratios import MIXED_TARGETS, TARGETS, check_targets, compute_ratios, mixed_ratios
from bench.report import write_results
from bench.stats import summarize

_LOGGER = logging.getLogger("bench")
REPO_ROOT = Path(__file__).resolve().parent.parent
BATCHED_SEQUENCES = 8
DTYPES = ("float32", "bfloat16", "int8")
SECTIONS = ("grpc", "engine", "transformers", "llamacpp", "fidelity", "mixed")
LLAMACPP_N_BATCH = 512
"""llama-cpp-python's default n_batch, and llama.cpp server's default n_ubatch."""


def _csv_ints(raw: str) -> tuple[int, ...]:
    return tuple(int(part) for part in raw.split(",") if part.strip())


def _csv_dtypes(raw: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    for name in names:
        if name not in (*DTYPES, "default"):
            raise argparse.ArgumentTypeError(f"{name!r}: choose from default, {', '.join(DTYPES)}")
    return names


def _sections(raw: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {SECTIONS}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cache = Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO_ROOT / ".cache"))
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    add = parser.add_argument
    add(
        "--dtypes",
        type=_csv_dtypes,
        default=("default",),
        help="precision modes to serve, comma-separated; 'default' is the server's own default; "
        "the first one gives the ratios (default: default)",
    )
    add(
        "--concurrency",
        type=_csv_ints,
        default=(1, 2, 4, 8, 16),
        help="concurrent streams per level (default: 1,2,4,8,16)",
    )
    add(
        "--min-requests",
        type=int,
        default=8,
        help="requests per level at least; each stream sends ceil(this / concurrency) (default: 8)",
    )
    add("--max-new-tokens", type=int, default=128, help="tokens per request (default: 128)")
    add(
        "--prompt-tokens",
        type=int,
        default=64,
        help="prompt length after the chat template (default: 64)",
    )
    add(
        "--rss-streams",
        type=int,
        default=8,
        help="streams of the peak-memory run; 0 skips it (default: 8)",
    )
    add(
        "--rss-new-tokens",
        type=int,
        default=512,
        help="tokens per stream in the peak-memory run (default: 512)",
    )
    add(
        "--baseline-repeats",
        type=int,
        default=3,
        help="timed generations per in-process baseline (default: 3)",
    )
    add("--llamacpp-threads", type=int, default=2, help="llama.cpp n_threads (default: 2)")
    add(
        "--shape",
        choices=("qwen1.5-0.5b", "tiny"),
        default="qwen1.5-0.5b",
        help="model shape; 'tiny' only for smoke tests (default: qwen1.5-0.5b)",
    )
    add(
        "--cache-dir",
        type=Path,
        default=cache,
        help="holds wheels/ and bench-models/ (default: $QWEN_GRPC_CACHE_DIR or ./.cache)",
    )
    add(
        "--out-dir",
        type=Path,
        default=REPO_ROOT / "bench" / "results",
        help="where latest.json/.md/.png go (default: bench/results)",
    )
    add(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `qwen_grpc serve`, repeatable (e.g. --server-arg=--max-batch-size=16)",
    )
    add(
        "--call-timeout", type=float, default=600.0, help="gRPC deadline per call, s (default: 600)"
    )
    add(
        "--quiet-start-below",
        type=float,
        default=10.0,
        help="start each measurement after a 2 s window with less CPU stall (PSI) than this "
        "%%; 0 disables waiting (default: 10)",
    )
    add(
        "--quiet-max-wait",
        type=float,
        default=60.0,
        help="longest wait for such a window, s (default: 60)",
    )
    add(
        "--redo-above",
        type=float,
        default=25.0,
        help="redo a measurement that ran under more CPU stall than this %%; 0: never "
        "(default: 25)",
    )
    add("--retries", type=int, default=1, help="most redos per measurement (default: 1)")
    add(
        "--only",
        type=_sections,
        default=(),
        help=f"run only these sections, comma-separated, from {', '.join(SECTIONS)}; the "
        "--skip-* options still apply (default: every section)",
    )
    add("--skip-grpc", action="store_true", help="skip the server (baselines only)")
    add("--skip-transformers", action="store_true", help="skip the transformers baseline")
    add("--skip-engine", action="store_true", help="skip the in-process engine baseline")
    add("--skip-llamacpp", action="store_true", help="skip llama.cpp")
    add(
        "--skip-fidelity",
        action="store_true",
        help="skip the next-token agreement section (demo model)",
    )
    add(
        "--skip-mixed",
        action="store_true",
        help="skip the mixed-load section (long prompt among streams, fair admission)",
    )
    add(
        "--mixed-streams",
        type=int,
        default=MixedPlan.streams,
        help=f"streams a long prompt joins (default: {MixedPlan.streams})",
    )
    add(
        "--mixed-short-tokens",
        type=int,
        default=MixedPlan.short_prompt_tokens,
        help="prompt tokens of the mixed section's short requests "
        f"(default: {MixedPlan.short_prompt_tokens})",
    )
    add(
        "--mixed-join-tokens",
        type=int,
        default=MixedPlan.join_prompt_tokens,
        help=f"the prompt joining the streams (default: {MixedPlan.join_prompt_tokens})",
    )
    add(
        "--mixed-rss-tokens",
        type=int,
        default=MixedPlan.rss_prompt_tokens,
        help="the long conversation of the memory scenario "
        f"(default: {MixedPlan.rss_prompt_tokens})",
    )
    add(
        "--mixed-queued",
        type=int,
        default=MixedPlan.queued,
        help=f"heavy requests kept queued beyond the batch (default: {MixedPlan.queued})",
    )
    add(
        "--mixed-heavy-new-tokens",
        type=int,
        default=MixedPlan.heavy_new_tokens,
        help=f"new tokens per heavy and light request (default: {MixedPlan.heavy_new_tokens})",
    )
    add(
        "--mixed-light-requests",
        type=int,
        default=MixedPlan.light_requests,
        help=f"the light client's requests (default: {MixedPlan.light_requests})",
    )
    add(
        "--mixed-llamacpp-batch",
        type=int,
        default=LLAMACPP_N_BATCH,
        help="llama.cpp n_batch of the mixed anchor: decode tokens plus prompt chunk per "
        f"llama_decode (default: {LLAMACPP_N_BATCH})",
    )
    add("--log-level", default="INFO")
    return parser.parse_args(argv)


def _runs(args: argparse.Namespace, section: str) -> bool:
    """Whether ``section`` runs: named by ``--only`` (or no ``--only``), not skipped."""
    return (not args.only or section in args.only) and not getattr(args, f"skip_{section}")


def _quiet(args: argparse.Namespace) -> Quiet:
    return Quiet(args.quiet_start_below, args.quiet_max_wait, args.redo_above, args.retries)


def _guarded(what: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs one measurement; a failure is logged and recorded instead of ending the run."""
    started, stall_before = time.perf_counter(), cpu_stall_us()
    try:
        result = step()
    except Exception as exc:
        _LOGGER.exception("%s failed", what)
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    elapsed, stall_after = time.perf_counter() - started, cpu_stall_us()
    _LOGGER.info("%s done in %.0f s", what, elapsed)
    if stall_before is not None and stall_after is not None:
        result.setdefault(
            "cpu_stall_share_whole_step", round((stall_after - stall_before) / 1e6 / elapsed, 3)
        )
    return result


def _isolated_baseline(
    function: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """Runs a baseline in its own process; its raw timings become a summary plus records."""
    return _merged_baselines([run_isolated(function, *args, **kwargs)])


def _default_dtype() -> str:
    """The precision ``auto`` picks on this CPU for a model whose answers survive it.

    ``auto`` checks greedy answers against float32 at start-up; the Qwen-shaped model has
    random weights, so its answers are noise and the check would always fall back to float32.
    The benchmark names the fastest candidate instead, the server's pick for a real model that
    passes the check.
    """
    from qwen_grpc.engine.cpu import cpu_info
    from qwen_grpc.engine.precision import candidate_precisions

    return candidate_precisions(cpu_info())[0]


def _dtype_runs(requested: Sequence[str]) -> list[tuple[str, str | None]]:
    """(name, flag) pairs without duplicates; ``default`` names :func:`_default_dtype`'s pick,
    passed as a flag like the others (see there why not ``auto``)."""
    default = _default_dtype()
    runs: list[tuple[str, str | None]] = []
    for name in requested:
        run = (default, default) if name in ("default", default) else (name, name)
        if run[0] not in (existing for existing, _ in runs):
            runs.append(run)
    return runs


def _load_prompts(model_dir: Path, count: int, prompt_tokens: int) -> list[BenchPrompt]:
    from transformers import AutoTokenizer

    return build_prompts(AutoTokenizer.from_pretrained(model_dir), count, prompt_tokens)


def _llamacpp(
    args: argparse.Namespace, model_dir: Path, prompts: Sequence[BenchPrompt]
) -> dict[str, Any]:
    """llama.cpp BF16 and Q8_0 single stream, then Q8_0 batched over the aggregate run's
    first 8 prompts (``q8_0_batched8``), each in its own process."""
    version = llamacpp.installed_version()
    if version is None:
        message = "llama-cpp-python is not installed (pip install -e '.[bench]')"
        _LOGGER.warning("%s; skipping llama.cpp", message)
        return {"error": message}
    results: dict[str, Any] = {
        "version": version,
        "build": _guarded("llama.cpp build info", functools.partial(run_isolated, build_info)),
    }
    models = args.cache_dir / "bench-models"
    for outtype in ("bf16", "q8_0"):

        def step(outtype: str = outtype) -> dict[str, Any]:
            path = llamacpp.convert(model_dir, models, outtype, version)
            return _isolated_baseline(
                llamacpp.measure,
                path,
                prompts[0].token_ids,
                args.max_new_tokens,
                args.baseline_repeats,
                args.llamacpp_threads,
                quiet=_quiet(args),
            )

        results[outtype] = _guarded(f"llama.cpp {outtype}", step)

    def batched() -> dict[str, Any]:
        return run_isolated(
            measure_batched,
            llamacpp.convert(model_dir, models, "q8_0", version),
            [prompt.token_ids for prompt in prompts[:BATCHED_SEQUENCES]],
            args.max_new_tokens,
            args.baseline_repeats,
            args.llamacpp_threads,
            quiet=_quiet(args),
        )

    results[f"q8_0_batched{BATCHED_SEQUENCES}"] = _guarded(
        f"llama.cpp q8_0 batched {BATCHED_SEQUENCES}", batched
    )
    return results


def _fidelity(args: argparse.Namespace) -> dict[str, Any]:
    """Next-token agreement on the demo model (real weights), not the random benchmark model."""
    from qwen_grpc.engine.sources import resolve_model

    demo_dir = resolve_model("demo", None, args.cache_dir).path
    return measure_fidelity(demo_dir, args.cache_dir / "bench-models", args.llamacpp_threads)


def _merged_baselines(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several raw runs of one in-process baseline as one record: all timings, one summary."""
    merged: dict[str, Any] = {"runs": len(runs)}
    for raw in runs:
        for key, value in raw.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged.setdefault(key, value)
    timings = merged.pop("timings")
    origin = min(t.start for t in timings)
    return {
        **merged,
        "summary": summarize(timings),
        "streams": [t.to_dict(origin) for t in timings],
    }


def _serving(
    args: argparse.Namespace,
    runs: Sequence[tuple[str, str | None]],
    model_dir: Path,
    prompts: Sequence[BenchPrompt],
    plan: LoadPlan,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per precision mode: the engine in process, the server over gRPC, the engine again.

    ``service_overhead`` compares the gRPC single stream with the engine alone. This machine's
    memory bandwidth drifts by tens of percent over minutes (other tenants), so the engine is
    timed on both sides of the server run and the two sets are pooled: a drift during the run
    then weighs on both sides of the ratio alike.
    """
    grpc_runs: dict[str, Any] = {}
    engine_runs: dict[str, Any] = {}
    for name, flag in runs:
        engine_raw: list[dict[str, Any]] = []

        def engine_baseline(
            flag: str | None = flag, engine_raw: list[dict[str, Any]] = engine_raw
        ) -> dict[str, Any]:
            engine_raw.append(
                run_isolated(
                    engine_single_stream,
                    model_dir,
                    flag,
                    prompts[0].token_ids,
                    args.max_new_tokens,
                    args.baseline_repeats,
                    quiet=_quiet(args),
                )
            )
            return {}

        if _runs(args, "engine"):
            _guarded(f"engine in-process {name} (before the server)", engine_baseline)
        if not _runs(args, "grpc"):
            grpc_runs[name] = {"error": "skipped"}
        else:
            log_path = args.cache_dir / "bench-logs" / f"server-{name}.log"
            grpc_runs[name] = _guarded(
                f"gRPC {name}",
                functools.partial(
                    bench_server, model_dir, flag, prompts, plan, args.cache_dir, log_path
                ),
            )
        if _runs(args, "engine"):
            _guarded(f"engine in-process {name} (after the server)", engine_baseline)
            engine_runs[name] = (
                _merged_baselines(engine_raw)
                if engine_raw
                else {"error": "the in-process engine failed on both sides of the server run"}
            )
    return grpc_runs, engine_runs


def _mixed_plan(args: argparse.Namespace) -> MixedPlan:
    return MixedPlan(
        streams=args.mixed_streams,
        short_prompt_tokens=args.mixed_short_tokens,
        join_prompt_tokens=args.mixed_join_tokens,
        rss_prompt_tokens=args.mixed_rss_tokens,
        queued=args.mixed_queued,
        heavy_new_tokens=args.mixed_heavy_new_tokens,
        light_requests=args.mixed_light_requests,
        call_timeout_s=args.call_timeout,
        quiet=_quiet(args),
    )


def _llamacpp_join(
    args: argparse.Namespace, model_dir: Path, prompts: MixedPrompts, plan: MixedPlan
) -> dict[str, Any]:
    """llama.cpp Q8_0 on the join scenario, in its own process."""
    version = llamacpp.installed_version()
    if version is None:
        return {"error": "llama-cpp-python is not installed (pip install -e '.[bench]')"}
    return run_isolated(
        measure_join,
        llamacpp.convert(model_dir, args.cache_dir / "bench-models", "q8_0", version),
        [prompt.token_ids for prompt in prompts.streams],
        prompts.join.token_ids,
        args.mixed_llamacpp_batch,
        plan.steady_steps,
        plan.join_new_tokens,
        args.llamacpp_threads,
        quiet=_quiet(args),
    )


def _mixed(
    args: argparse.Namespace,
    run: tuple[str, str | None],
    model_dir: Path,
    prompts: Sequence[BenchPrompt],
    plan: LoadPlan,
    grpc_runs: dict[str, Any],
) -> dict[str, Any]:
    """The mixed-load section in the first precision mode: the server scenarios, then the
    one-pass prefill in process and llama.cpp on the join scenario.

    The memory figure is set against the gRPC section's memory run; without one (that section
    skipped) the same run is made on the section's own server first.
    """
    from transformers import AutoTokenizer

    name, flag = run
    mixed_plan = _mixed_plan(args)
    servers = MixedServers(
        model_dir,
        (*(() if flag is None else ("--dtype", flag)), *args.server_arg),
        args.cache_dir,
        args.cache_dir / "bench-logs",
    )
    mixed_prompts = build_mixed_prompts(
        AutoTokenizer.from_pretrained(model_dir),
        mixed_plan,
        serving_settings(servers.server_args).max_batch_size,
    )
    baseline = grpc_runs.get(name, {}).get("rss_run")
    source = "the gRPC section's memory run"
    memory_baseline = None
    if baseline is None and plan.rss_streams == 0:
        source = "none: --rss-streams 0"
    elif baseline is None:
        source = "measured on this section's server first, the gRPC section having none"
        memory_baseline = functools.partial(rss_run, prompts=prompts, plan=plan, dtype=name)
    record: dict[str, Any] = {
        "server": _guarded(
            "mixed load through the server",
            functools.partial(
                bench_mixed, servers, mixed_prompts, mixed_plan, _guarded, memory_baseline
            ),
        )
    }
    baseline = baseline or record["server"].get("memory_8x512") or {}
    record["baseline_8x512"] = {
        "streams": plan.rss_streams,
        "new_tokens": plan.rss_new_tokens,
        "peak_rss_bytes": baseline.get("peak_rss_bytes"),
        "peak_rss_gb": baseline.get("peak_rss_gb"),
        "source": source,
    }
    record["one_pass_prefill"] = _guarded(
        "mixed: one-pass prefill in process",
        functools.partial(
            run_isolated,
            engine_prefill,
            model_dir,
            flag,
            mixed_prompts.join.token_ids,
            args.baseline_repeats,
            quiet=_quiet(args),
        ),
    )
    if not args.skip_llamacpp:
        record["llamacpp"] = _guarded(
            "llama.cpp q8_0 join",
            functools.partial(_llamacpp_join, args, model_dir, mixed_prompts, mixed_plan),
        )
    return record


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the server subprocess is stopped on the way out."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema_version": 1,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
    }
    from qwen_grpc.engine.synthetic import build_random_qwen

    model_dir = build_random_qwen(
        args.cache_dir / "bench-models" / f"{args.shape}-random", args.cache_dir, args.shape
    )
    results["model"] = {"shape": args.shape, "dir": str(model_dir)}
    count = max(*args.concurrency, args.rss_streams, BATCHED_SEQUENCES)
    prompts = _load_prompts(model_dir, count, args.prompt_tokens)
    results["prompts"] = {
        "count": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "first": prompts[0].text,
    }
    plan = LoadPlan(
        concurrency=args.concurrency,
        min_requests=args.min_requests,
        max_new_tokens=args.max_new_tokens,
        rss_streams=args.rss_streams,
        rss_new_tokens=args.rss_new_tokens,
        call_timeout_s=args.call_timeout,
        server_args=tuple(args.server_arg),
        quiet=_quiet(args),
    )
    runs = _dtype_runs(args.dtypes)
    results["primary_dtype"] = runs[0][0]
    results["grpc"], results["engine_inprocess"] = _serving(args, runs, model_dir, prompts, plan)
    if _runs(args, "mixed"):
        results["mixed"] = _mixed(args, runs[0], model_dir, prompts, plan, results["grpc"])
    if _runs(args, "transformers"):
        results["transformers_eager"] = {
            "float32": _guarded(
                "transformers eager float32",
                functools.partial(
                    _isolated_baseline,
                    transformers_eager,
                    model_dir,
                    "float32",
                    prompts[0].token_ids,
                    args.max_new_tokens,
                    args.baseline_repeats,
                    quiet=_quiet(args),
                ),
            )
        }
    if _runs(args, "llamacpp"):
        results["llamacpp"] = _llamacpp(args, model_dir, prompts)
    if _runs(args, "fidelity"):
        results["fidelity"] = _guarded("fidelity", functools.partial(_fidelity, args))
    primary = results["primary_dtype"]
    results["ratios"] = {
        **compute_ratios(
            results["grpc"].get(primary),
            results["engine_inprocess"].get(primary),
            results.get("llamacpp", {}).get("q8_0"),
            results.get("llamacpp", {}).get(f"q8_0_batched{BATCHED_SEQUENCES}"),
        ),
        **mixed_ratios(results.get("mixed")),
    }
    results["targets"] = check_targets(results["ratios"], {**TARGETS, **MIXED_TARGETS})
    results["machine"]["load_average_end"] = load_average()
    results["machine"]["cpu_pressure_avg60_end"] = cpu_pressure()
    results["duration_s"] = round(time.perf_counter() - started, 1)
    markdown = write_results(results, args.out_dir)
    sys.stdout.write(markdown)
    _LOGGER.info("wrote %s in %.1f min", args.out_dir / "latest.json", results["duration_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
