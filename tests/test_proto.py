"""The committed stubs are what `make proto` generates from the committed proto."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from generate_proto import STUB_FILES, generate  # noqa: E402


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    stale = [
        name
        for name in STUB_FILES
        if (tmp_path / name).read_bytes() != (ROOT / "qwen_grpc" / "v1" / name).read_bytes()
    ]
    assert not stale, f"run `make proto`: {stale} differ from what proto/ generates"
