"""Shared fixtures: models built once per session, a real server on a free loopback port."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from qwen_grpc.config import Settings
from qwen_grpc.engine.synthetic import build_random_qwen
from qwen_grpc.interceptors.access_log import ACCESS_LOGGER
from qwen_grpc.logs import JsonFormatter
from qwen_grpc.server import QwenServer
from qwen_grpc.v1 import chat_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where `make models` put the wheels; converted models are reused across runs."""
    return Path(os.environ.get("QWEN_GRPC_CACHE_DIR", REPO_ROOT / ".cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    """A 2-layer random Qwen2 with Qwen's real vocabulary: real tokenization, instant compute."""
    return build_random_qwen(cache_dir / "test-models" / "tiny-qwen2", cache_dir, "tiny")


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: Path, cache_dir: Path) -> Settings:
    return Settings(
        port=0,
        model=str(tiny_model_dir),
        cache_dir=cache_dir,
        dtype="float32",
        max_new_tokens_cap=512,
        default_max_new_tokens=32,
        grace_seconds=2.0,
        metrics_port=0,
        drain_delay_seconds=0.2,
    )


class RunningServer:
    """A started :class:`QwenServer` and a channel to it."""

    def __init__(self, settings: Settings) -> None:
        self.server = QwenServer(settings)
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=1.0)


@pytest.fixture(scope="session")
def tiny_server(tiny_settings: Settings) -> Iterator[RunningServer]:
    """One loaded tiny-model server shared by the read-only tests."""
    running = RunningServer(tiny_settings)
    running.server.load()
    yield running
    running.close()


@pytest.fixture
def server_factory(tiny_settings: Settings) -> Iterator[object]:
    """Builds servers with changed settings; each is stopped at the end of the test."""
    started: list[RunningServer] = []

    def make(**changes: object) -> RunningServer:
        running = RunningServer(replace(tiny_settings, **changes))  # type: ignore[arg-type]
        started.append(running)
        return running

    yield make
    for running in started:
        running.close()


ServerMaker = Callable[..., RunningServer]


@pytest.fixture
def make_server(server_factory: Any, tiny_server: RunningServer) -> ServerMaker:
    """A server with changed settings, serving the session's already loaded tiny model."""

    def make(**changes: Any) -> RunningServer:
        running: RunningServer = server_factory(**changes)
        running.server.servicer.attach(tiny_server.server.servicer.runtime)
        return running

    return make


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    """The access-log lines written so far, each formatted by the production JSON formatter."""
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER.name)
    formatter = JsonFormatter()

    def lines() -> list[dict[str, Any]]:
        raw = [formatter.format(r) for r in caplog.records if r.name == ACCESS_LOGGER.name]
        assert all("\n" not in line for line in raw)
        return [json.loads(line) for line in raw]

    return lines
