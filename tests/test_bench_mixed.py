"""Smoke test of the benchmark's mixed-load section at tiny sizes, on the tiny random model.

``python -m bench.run --only mixed`` on a real server subprocess: a long prompt joining two
streams, the memory scenario, the heavy and light clients, the deadline probes and the
one-pass prefill in process (llama.cpp is skipped: it may not be installed). The server's KV
budget is set so the memory scenario's long conversation is held back, which sends that
scenario to a second server with the settings that admit it. Every figure must be in the JSON
and in the Markdown: a refactor that drops one fails here, not in a twenty-minute bench run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ratios import MIXED_RATIO_KEYS, RATIO_KEYS
from bench.run import main

KV_BUDGET = 2048
"""Room for three rows of a 32-token prompt and 512 new tokens (the streams' cap), not for
three rows as wide as the 1,000-token prompt's conversation."""


@pytest.mark.timeout(300)
def test_the_mixed_section_reports_every_figure(cache_dir: Path, tmp_path: Path) -> None:
    code = main(
        [
            *("--shape", "tiny", "--only", "mixed", "--skip-llamacpp"),
            *("--mixed-streams", "2", "--mixed-short-tokens", "32"),
            *("--mixed-join-tokens", "256", "--mixed-rss-tokens", "1000"),
            *("--mixed-queued", "6", "--mixed-light-requests", "2"),
            *("--mixed-heavy-new-tokens", "64", "--rss-streams", "2", "--rss-new-tokens", "8"),
            "--server-arg=--max-batch-size=3",
            f"--server-arg=--kv-cache-tokens={KV_BUDGET}",
            "--server-arg=--min-deadline-seconds=0.01",
            *("--baseline-repeats", "1", "--quiet-start-below", "0", "--redo-above", "0"),
            *("--cache-dir", str(cache_dir), "--out-dir", str(tmp_path), "--log-level", "WARNING"),
        ]
    )

    assert code == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert tuple(results["ratios"]) == (*RATIO_KEYS, *MIXED_RATIO_KEYS)
    missing = [key for key in MIXED_RATIO_KEYS if results["ratios"][key] is None]
    assert missing == [], results["mixed"]
    mixed = results["mixed"]
    server = mixed["server"]
    join = server["join"]
    assert join["long"]["code"] == "OK" and join["server_args_added"] == []
    assert join["streams"]["streaming_when_the_long_prompt_was_sent"] == 2
    assert join["gap_ms_in_window"]["count"] > 0 and join["gaps_outside_window"] > 0
    memory = server["memory"]
    assert memory["long"]["code"] == "OK"
    assert memory["server_args_added"] == ["--kv-cache-tokens", str(3 * (1000 + 32))]
    assert memory["why"][0].startswith("queued")
    assert mixed["baseline_8x512"]["peak_rss_bytes"] > 0
    fair = server["fair"]
    for phase in ("idle", "loaded"):
        assert fair[phase]["codes"] == {"OK": 2}
    assert fair["deadline"]["codes"] == {"DEADLINE_EXCEEDED": 3}
    assert mixed["one_pass_prefill"]["prefill_ms"] > 0
    markdown = (tmp_path / "latest.md").read_text()
    for key in MIXED_RATIO_KEYS:
        (row,) = [line for line in markdown.splitlines() if line.startswith(f"| `{key}`")]
        assert row.split(" | ")[1] != "—", row
    for heading in ("joins running streams", "Peak memory", "Fair and deadline-aware"):
        assert heading in markdown
    assert "--kv-cache-tokens 3096" in markdown
    assert "| long prompt TTFT, ms |" in markdown
