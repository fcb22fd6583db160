"""Smoke test of the benchmark's own code path: real server subprocess, tiny model, few tokens.

The benchmark is not part of ``make test`` (it takes many minutes); this only proves that
``python -m bench.run`` still starts a server, drives it over gRPC and writes its three files
with the ratio keys the issue fixes, so a refactor of the service cannot silently break it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ratios import MIXED_RATIO_KEYS, RATIO_KEYS
from bench.run import main


@pytest.mark.timeout(120)
def test_bench_writes_results_with_the_ratio_keys(cache_dir: Path, tmp_path: Path) -> None:
    code = main(
        [
            *("--shape", "tiny", "--concurrency", "1,2", "--min-requests", "2"),
            *("--max-new-tokens", "4", "--rss-streams", "2", "--rss-new-tokens", "4"),
            *(
                "--skip-transformers",
                "--skip-engine",
                "--skip-llamacpp",
                "--skip-fidelity",
                "--skip-mixed",
                "--quiet-start-below",
                "0",
            ),
            *("--cache-dir", str(cache_dir), "--out-dir", str(tmp_path), "--log-level", "WARNING"),
        ]
    )

    assert code == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert tuple(results["ratios"]) == (*RATIO_KEYS, *MIXED_RATIO_KEYS)
    assert "mixed" not in results
    run = results["grpc"][results["primary_dtype"]]
    assert [level["concurrency"] for level in run["levels"]] == [1, 2]
    for level in run["levels"]:
        assert level["errors"] == []
        assert level["summary"]["completion_tokens"] == 4 * level["summary"]["requests"]
        assert level["summary"]["ttft_ms_p50"] > 0
    assert results["ratios"]["peak_rss_gb"] > 0
    assert "| concurrency |" in (tmp_path / "latest.md").read_text()
