"""The reliability suite in miniature: every scenario with small counts, on the real code paths.

``make reliability`` runs the full counts (minutes); this proves in seconds that each scenario
still starts its server, drives it and judges it, so a change to the service that breaks a
promise (or breaks the suite) shows up in ``make test``. Two tiny-model servers load in
parallel: one to drain, and one :mod:`reliability.faulty_server` (the real server, plus faults
only marked requests trigger and a short decode delay) shared by load, bad input and soak,
then by the fault scenario, which ends it with SIGTERM. A third runs the long prompt, on the
tiny model a wiring check only: its memory verdict means something on the Qwen-shaped model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.server_process import ServerProcess
from reliability.bad_input import BadInputPlan, run_bad_input
from reliability.drain import DrainPlan, run_drain
from reliability.faults import FaultPlan, run_faults
from reliability.launcher import ServerLauncher
from reliability.load import LoadPlan, run_load
from reliability.long_prompt import LongPromptPlan, run_long_prompt
from reliability.report import RunInfo, ScenarioResult, write_results
from reliability.soak import SoakPlan, run_soak

pytestmark = pytest.mark.timeout(240)

ONE_THREAD = ("--threads", "1")
FAULTS = FaultPlan(
    cancelled_streams=10,
    cancel_concurrency=5,
    deadline_streams=4,
    killed_clients=2,
    neighbours=2,
    bystander_threads=1,
    call_timeout_seconds=2.0,
    grace_seconds=1.0,
)
DRAIN = DrainPlan(streams=4, max_new_tokens=200, grace_seconds=10.0, drain_delay_seconds=0.2)
LONG_PROMPT = LongPromptPlan(
    prompt_tokens=1000, short_new_tokens=200, health_interval_seconds=0.1, call_timeout_seconds=60.0
)


@pytest.fixture(scope="module")
def servers(
    tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    launcher = ServerLauncher(cache_dir, tmp_path_factory.mktemp("reliability-logs"))
    started = {
        "shared": launcher.tiny("shared", *ONE_THREAD, *FAULTS.server_args(), faulty=True),
        "drain": launcher.tiny("drain", *ONE_THREAD, *DRAIN.server_args()),
        "long_prompt": launcher.tiny("long_prompt", *ONE_THREAD, *LONG_PROMPT.server_args()),
    }
    try:
        for server in started.values():
            server.spawn()
        for server in started.values():
            server.wait_serving()
        yield started
    finally:
        for server in started.values():
            server.stop(timeout=10.0)


def failed(result: ScenarioResult, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    return [name for name in result.failed_checks if name.startswith(prefixes)] + (
        [f"error: {result.error}"] if result.error else []
    )


@pytest.fixture(scope="module")
def bad_input(servers: dict[str, ServerProcess]) -> ScenarioResult:
    return run_bad_input(servers["shared"], BadInputPlan(examples=60))


@pytest.fixture(scope="module")
def faults(servers: dict[str, ServerProcess]) -> ScenarioResult:
    return run_faults(servers["shared"], FAULTS)


def test_load_loses_no_call(servers: dict[str, ServerProcess]) -> None:
    result = run_load(servers["shared"], LoadPlan(clients=8, seconds=3.0, max_new_tokens=16))

    assert result.passed, failed(result)
    assert result.figures["calls"] >= 8
    assert result.figures["ttft_seconds"]["p50"] is not None


def test_bad_input_is_refused_cleanly_and_the_server_keeps_serving(
    bad_input: ScenarioResult,
) -> None:
    assert bad_input.passed, failed(bad_input)
    assert bad_input.figures["requests"] >= 60
    assert bad_input.figures["categories"] == 15


def test_soak_memory_stays_flat(servers: dict[str, ServerProcess]) -> None:
    result = run_soak(servers["shared"], SoakPlan(requests=60, baseline=20))

    assert result.passed, failed(result)
    assert list(result.figures["rss_mib_by_requests"]) == [20, 40, 60]


def test_cancelled_expired_and_orphaned_streams_cost_nothing_else(faults: ScenarioResult) -> None:
    assert not failed(faults, ("cancel:", "deadline:", "killed_clients:"))
    assert faults.figures["deadline"]["expired_mid_stream"] >= 1
    assert faults.figures["killed_clients"]["streaming_when_killed"] == 2


def test_an_exception_in_one_sequence_affects_no_other_call(faults: ScenarioResult) -> None:
    assert not failed(faults, ("exception_mid_stream:", "exception_first_token:"))
    assert faults.figures["exception_first_token"]["fault_code"] == "INTERNAL"


def test_a_failed_prefill_leaves_the_running_batch_alone(faults: ScenarioResult) -> None:
    assert faults.passed, failed(faults)


def test_drain_completes_streams_in_flight(servers: dict[str, ServerProcess]) -> None:
    result = run_drain(servers["drain"], DRAIN)

    assert result.passed, failed(result)


def test_a_long_prompt_joins_streaming_calls_and_every_call_is_answered(
    servers: dict[str, ServerProcess], tiny_model_dir: Path
) -> None:
    result = run_long_prompt(servers["long_prompt"], LONG_PROMPT, tiny_model_dir)

    assert not failed(result, ("all ", "every call", "health", "the server")), failed(result)
    figures = result.figures
    assert figures["long_prompt"]["prompt_tokens"] == 1000
    assert figures["long_prompt"]["code"] == "OK"
    assert figures["short_streams"]["streaming_when_the_long_prompt_was_sent"] == 7
    assert figures["memory"]["peak_rss_mib"] > figures["memory"]["idle_rss_mib"] > 0
    assert figures["health"]["polls"] >= 1


def test_results_are_written_with_a_verdict_per_scenario(
    bad_input: ScenarioResult, faults: ScenarioResult, tmp_path: Path
) -> None:
    import datetime
    import json

    info = RunInfo(datetime.datetime.now(datetime.UTC), 1.0)
    table = write_results([bad_input, faults], info, tmp_path)

    document = json.loads((tmp_path / "latest.json").read_text())
    assert set(document["scenarios"]) == {"bad_input", "faults"}
    assert all(isinstance(s["passed"], bool) for s in document["scenarios"].values())
    assert document["passed"] is (bad_input.passed and faults.passed)
    assert "| bad_input |" in table
    assert table in (tmp_path / "latest.md").read_text()
