"""Scenario verdicts and the files they end up in: ``latest.json`` and ``latest.md``.

A scenario passes when every one of its named checks holds; the checks are recorded next to
the figures they were computed from, so a failed run says which promise broke and by how much.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ScenarioResult:
    """What one scenario measured and whether the service kept its promises."""

    name: str
    summary: str
    """One line for the summary table."""
    checks: dict[str, bool]
    figures: dict[str, Any]
    seconds: float = 0.0
    error: str | None = None
    """Set when the scenario itself could not run to the end (it then fails)."""

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())

    @property
    def failed_checks(self) -> list[str]:
        return [name for name, held in self.checks.items() if not held]

    @classmethod
    def crashed(cls, name: str, error: BaseException) -> ScenarioResult:
        return cls(name, f"did not finish: {error}", {}, {}, error=repr(error))

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "summary": self.summary,
            "checks": self.checks,
            "figures": self.figures,
            "error": self.error,
        }


@dataclass(frozen=True)
class RunInfo:
    """When and where the suite ran; the numbers mean little without the machine."""

    started: datetime.datetime
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started.isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "settings": self.settings,
        }


def summary_table(results: list[ScenarioResult]) -> str:
    """The Markdown table the README links and the closing note quotes."""
    rows = ["| scenario | result | figures | time |", "|---|---|---|---|"]
    for result in results:
        verdict = "pass" if result.passed else "**FAIL**"
        rows.append(f"| {result.name} | {verdict} | {result.summary} | {result.seconds:.0f} s |")
    return "\n".join(rows)


def _checks_section(results: list[ScenarioResult]) -> str:
    lines = ["## Checks", ""]
    for result in results:
        lines.append(f"**{result.name}**" + (f" — error: `{result.error}`" if result.error else ""))
        lines.extend(
            f"- {'pass' if held else 'FAIL'}: {name}" for name, held in result.checks.items()
        )
        lines.append("")
    return "\n".join(lines)


def write_results(results: list[ScenarioResult], info: RunInfo, out_dir: Path) -> str:
    """Writes ``latest.json`` and ``latest.md`` to ``out_dir``; returns the summary table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    passed = all(result.passed for result in results)
    document = {
        "passed": passed,
        "run": info.to_json(),
        "scenarios": {result.name: result.to_json() for result in results},
    }
    (out_dir / "latest.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    table = summary_table(results)
    run = info.to_json()
    markdown = [
        "# Reliability suite: latest run",
        "",
        f"{'All scenarios passed' if passed else 'Some scenarios FAILED'} — "
        f"{run['started']}, {info.seconds / 60:.1f} min on {run['machine']['cpus']} CPUs "
        f"(load average {', '.join(map(str, run['machine']['load_average']))}). "
        "Figures in `latest.json`; re-run with `make reliability`.",
        "",
        table,
        "",
        _checks_section(results),
    ]
    (out_dir / "latest.md").write_text("\n".join(markdown))
    return table
