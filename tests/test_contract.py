"""The contract is machine-checked: buf lint and buf breaking pass on the repo, and breaking
catches the change deployed clients fear most, a renumbered field."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from check_contract import PROTO, RELEASED_IMAGE, breaking, lint  # noqa: E402

CHAT_PROTO = Path("qwen/chat/v1/chat.proto")


def test_buf_lint_passes_on_the_contract() -> None:
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_passes_against_the_released_contract() -> None:
    assert RELEASED_IMAGE.is_file()
    result = breaking()
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_fails_on_a_renumbered_field(tmp_path: Path) -> None:
    proto = tmp_path / "proto"
    shutil.copytree(PROTO, proto)
    chat = proto / CHAT_PROTO
    text = chat.read_text()
    # Message.content moves from field 2 to 9: same name, same type, a different wire number.
    renumbered, count = re.subn(r"(?m)^(\s*string content = )2;", r"\g<1>9;", text)
    assert count == 1, "the proto no longer has `string content = 2;`"
    chat.write_text(renumbered)
    assert lint(proto).returncode == 0, "the change must be legal proto, only breaking"

    result = breaking(proto)

    assert result.returncode != 0
    assert '"content"' in result.stdout and '"Message"' in result.stdout, result.stdout
    assert str(CHAT_PROTO) in result.stdout
