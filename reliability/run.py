"""``python -m reliability.run`` (``make reliability``): every scenario, a verdict, the files.

Each scenario gets a fresh server process on loopback, so one scenario's damage cannot pass
for another's: load, bad input and soak on the tiny model (real tokenizer, instant compute),
faults on the tiny model behind :mod:`reliability.faulty_server`, drain on the offline demo
model as deployed, long prompt on the Qwen-shaped random model (production's compute and
memory) with a prompt as long as the server admits. The run writes ``reliability/results/latest.json`` and ``latest.md``, prints
the summary table and exits 1 if any scenario failed. The defaults fit in about ten minutes on
two cores, plus the long prompt, whose 16k-token prefill alone takes minutes there; the flags
trade time for counts (``--long-prompt-tokens 2000`` for a quick run).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.server_process import REPO_ROOT, ServerProcess
from reliability.bad_input import BadInputPlan, run_bad_input
from reliability.drain import DrainPlan, run_drain
from reliability.faults import FaultPlan, run_faults
from reliability.launcher import ServerLauncher
from reliability.load import LoadPlan, run_load
from reliability.long_prompt import LongPromptPlan, run_long_prompt
from reliability.report import RunInfo, ScenarioResult, write_results
from reliability.soak import SoakPlan, run_soak

_LOGGER = logging.getLogger("reliability")
SCENARIOS = ("load", "bad_input", "faults", "drain", "soak", "long_prompt")


def _scenario_list(raw: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenarios {sorted(unknown)}; see --help")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability.run", description=__doc__)
    add = parser.add_argument
    add("--scenarios", type=_scenario_list, default=SCENARIOS, help=", ".join(SCENARIOS))
    add("--load-seconds", type=float, default=180.0, help="load duration (default: 180)")
    add("--load-clients", type=int, default=32, help="concurrent load clients (default: 32)")
    add("--bad-inputs", type=int, default=250, help="malformed requests (default: 250)")
    add("--cancelled-streams", type=int, default=100, help="streams cancelled (default: 100)")
    add("--deadline-streams", type=int, default=20, help="streams that expire (default: 20)")
    add("--killed-clients", type=int, default=4, help="client processes killed (default: 4)")
    add("--drain-streams", type=int, default=8, help="streams in flight at SIGTERM (default: 8)")
    add("--drain-tokens", type=int, default=128, help="tokens per drain stream (default: 128)")
    add(
        "--drain-model",
        choices=("demo", "tiny"),
        default="demo",
        help="model of the drained server (default: demo, the deployable one)",
    )
    add("--soak-requests", type=int, default=1000, help="soak requests (default: 1000)")
    add(
        "--soak-baseline", type=int, default=100, help="requests before the baseline (default: 100)"
    )
    add(
        "--long-prompt-tokens",
        type=int,
        default=0,
        help="length of the long prompt; 0 = the server's max_prompt_tokens (default: 0)",
    )
    add(
        "--long-prompt-timeout",
        type=float,
        default=1800.0,
        help="deadline of each long-prompt scenario call, in seconds (default: 1800)",
    )
    add(
        "--threads",
        type=int,
        default=1,
        help="torch threads per server: the clients need a core too (default: 1)",
    )
    add("--seed", type=int, default=0, help="seed of every generated workload (default: 0)")
    add(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO_ROOT / ".cache")),
        help="model wheels and converted models; server logs go to <cache>/reliability-logs",
    )
    add("--out-dir", type=Path, default=REPO_ROOT / "reliability" / "results")
    add("--log-level", default="INFO")
    return parser.parse_args(argv)


def _runners(
    args: argparse.Namespace, launcher: ServerLauncher
) -> dict[str, Callable[[], ScenarioResult]]:
    """Each scenario with its server, started only when the scenario runs."""
    threads = ("--threads", str(args.threads))

    def on(server: ServerProcess, run: Callable[[ServerProcess], ScenarioResult]) -> ScenarioResult:
        with server:
            return run(server)

    faults = FaultPlan(
        cancelled_streams=args.cancelled_streams,
        deadline_streams=args.deadline_streams,
        killed_clients=args.killed_clients,
        seed=args.seed,
    )
    drain = DrainPlan(streams=args.drain_streams, max_new_tokens=args.drain_tokens)
    long_prompt = LongPromptPlan(
        prompt_tokens=args.long_prompt_tokens, call_timeout_seconds=args.long_prompt_timeout
    )
    drain_server = launcher.demo if args.drain_model == "demo" else launcher.tiny
    return {
        "load": lambda: on(
            launcher.tiny("load", *threads),
            lambda s: run_load(
                s, LoadPlan(clients=args.load_clients, seconds=args.load_seconds, seed=args.seed)
            ),
        ),
        "bad_input": lambda: on(
            launcher.tiny("bad_input", *threads),
            lambda s: run_bad_input(s, BadInputPlan(examples=args.bad_inputs, seed=args.seed)),
        ),
        "faults": lambda: on(
            launcher.tiny("faults", *threads, *faults.server_args(), faulty=True),
            lambda s: run_faults(s, faults),
        ),
        "drain": lambda: on(
            drain_server("drain", *threads, *drain.server_args()), lambda s: run_drain(s, drain)
        ),
        "soak": lambda: on(
            launcher.tiny("soak", *threads),
            lambda s: run_soak(
                s,
                SoakPlan(requests=args.soak_requests, baseline=args.soak_baseline, seed=args.seed),
            ),
        ),
        "long_prompt": lambda: on(
            launcher.qwen("long_prompt", *threads, *long_prompt.server_args()),
            lambda s: run_long_prompt(s, long_prompt, launcher.qwen_model),
        ),
    }


def run_scenario(name: str, runner: Callable[[], ScenarioResult]) -> ScenarioResult:
    """Runs one scenario; one that cannot finish is a failed scenario, not a failed suite."""
    _LOGGER.info("=== %s ===", name)
    started = time.monotonic()
    try:
        result = runner()
    except Exception as exc:
        _LOGGER.exception("scenario %s did not finish", name)
        result = ScenarioResult.crashed(name, exc)
    result.seconds = time.monotonic() - started
    _LOGGER.info("%s: %s — %s", name, "pass" if result.passed else "FAIL", result.summary)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    launcher = ServerLauncher(args.cache_dir, args.cache_dir / "reliability-logs")
    runners = _runners(args, launcher)
    results = [run_scenario(name, runners[name]) for name in args.scenarios]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.pop("cache_dir")
    settings.pop("out_dir")
    info = RunInfo(started_at, time.monotonic() - started, settings)
    table = write_results(results, info, args.out_dir)
    print(table)
    print(f"\n{len(results)} scenarios in {info.seconds / 60:.1f} min; details in {args.out_dir}")
    return 0 if all(result.passed for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
