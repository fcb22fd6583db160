"""The grpcurl example scripts in ``clients/grpcurl`` work against a real demo-model server.

They are what an engineer copies when debugging, so they run with the real grpcurl binary
(installed into the venv by the dev extra), through server reflection, exactly as documented.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._demo_server import REPO_ROOT, ServerProcess, demo_server, server_env  # noqa: F401

SCRIPTS = REPO_ROOT / "clients" / "grpcurl"
VENV_BIN = Path(sys.executable).parent


def run_script(demo_server: ServerProcess, name: str) -> str:  # noqa: F811
    """Runs one example with the venv's grpcurl first on PATH; returns its stdout."""
    grpcurl = shutil.which("grpcurl", path=str(VENV_BIN))
    assert grpcurl is not None, f"grpcurl is not installed in {VENV_BIN} (pip install -e .[dev])"
    env = server_env()
    env.pop("GRPCURL", None)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["QWEN_GRPC_TARGET"] = demo_server.address
    done = subprocess.run(
        [str(SCRIPTS / name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stderr}"
    return done.stdout


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty JSON object per response message, back to back."""
    decoder = json.JSONDecoder()
    objects: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return objects
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)


@pytest.mark.parametrize(
    "name", ["list.sh", "describe.sh", "health.sh", "chat.sh", "stream_chat.sh"]
)
def test_example_is_an_executable_script(name: str) -> None:
    script = SCRIPTS / name
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


def test_list_shows_chat_and_health_services(demo_server: ServerProcess) -> None:  # noqa: F811
    services = run_script(demo_server, "list.sh").split()
    assert "qwen.chat.v1.ChatService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_shows_every_rpc(demo_server: ServerProcess) -> None:  # noqa: F811
    output = run_script(demo_server, "describe.sh")
    assert "service ChatService" in output
    for rpc in ("Chat", "StreamChat", "CountTokens", "GetModelInfo"):
        assert f"rpc {rpc} (" in output
    assert "returns ( stream .qwen.chat.v1.StreamChatResponse )" in output


def test_health_says_serving(demo_server: ServerProcess) -> None:  # noqa: F811
    assert json_stream(run_script(demo_server, "health.sh")) == [{"status": "SERVING"}]


def test_chat_answers_paris(demo_server: ServerProcess) -> None:  # noqa: F811
    (response,) = json_stream(run_script(demo_server, "chat.sh"))
    assert response["message"]["role"] == "ROLE_ASSISTANT"
    assert "Paris" in response["message"]["content"]
    assert response["finishReason"] == "FINISH_REASON_STOP"  # proto3 JSON names


def test_stream_chat_prints_deltas_then_a_final(demo_server: ServerProcess) -> None:  # noqa: F811
    *deltas, final = json_stream(run_script(demo_server, "stream_chat.sh"))
    assert deltas
    assert all(set(message) == {"delta"} for message in deltas)
    assert "Paris" in "".join(message["delta"] for message in deltas)
    assert set(final) == {"final"}
    assert final["final"]["usage"]["completionTokens"] > 0
