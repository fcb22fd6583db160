"""The README stays true: its settings table and the commands it shows."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from qwen_grpc.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_settings_table_matches_the_settings() -> None:
    table = README.split("<!-- settings-table -->")[1].split("<!-- /settings-table -->")[0]
    assert table.strip() == settings_table()


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"(?:^|`)make ([a-z-]+)", README, flags=re.MULTILINE))
    assert named <= targets, named - targets


def test_every_file_the_readme_links_exists() -> None:
    for link in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / link).exists(), link


def test_the_readme_java_stub_command_generates_the_messages(tmp_path: Path) -> None:
    # The README's no-plugin line, run as written from a folder laid out like the repo.
    (line,) = re.findall(r"^mkdir -p gen/java && \.venv/bin/protoc .*$", README, re.MULTILINE)
    for name in ("proto", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    result = subprocess.run(
        ["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    java = (tmp_path / "gen" / "java" / "qwen" / "chat" / "v1" / "Chat.java").read_text()
    for name in ("ChatRequest", "StreamChatResponse", "ROLE_USER", "FINISH_REASON_STOP"):
        assert name in java, name
