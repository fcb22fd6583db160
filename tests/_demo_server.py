"""A real ``qwen-grpc serve --model demo`` process shared by the client and grpcurl tests.

The client, the CLI and the grpcurl scripts are tested against the service as deployed: a
separate process, over TCP, stopped with SIGTERM. Starting it costs seconds, so both test
modules share one process: each imports :func:`demo_server`; the first user starts it and the
last one (at the end of the session) stops it and checks that it drained cleanly.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.server_process import REPO_ROOT, ServerProcess, server_env

__all__ = ["REPO_ROOT", "ServerProcess", "demo_server", "server_env"]

START_TIMEOUT_SECONDS = 180.0  # the first run converts the GGUF model (~15 s), busy CI is slow
STOP_TIMEOUT_SECONDS = 60.0


def start_demo_server() -> ServerProcess:
    """Starts the demo model server on a free port and returns once health says SERVING."""
    log_dir = Path(tempfile.mkdtemp(prefix="qwen-grpc-demo-"))
    server = ServerProcess(
        "demo",
        log_dir / "server.log",
        # One torch thread: on a busy CI machine, threads waiting for each other in every
        # matmul cost far more than the parallelism gains for a 135M model.
        extra_args=("--grace-seconds", "5", "--threads", "1"),
        startup_timeout=START_TIMEOUT_SECONDS,
    )
    server.start()
    return server


_LOCK = threading.Lock()
_shared: ServerProcess | None = None
_users = 0


@pytest.fixture(scope="session")
def demo_server() -> Iterator[ServerProcess]:
    """The shared demo server; stopped with SIGTERM after its last user, exit code checked.

    Each importing module gets its own fixture definition from pytest, so the process is
    reference counted here rather than relying on pytest to share it.
    """
    global _shared, _users
    with _LOCK:
        if _shared is None:
            _shared = start_demo_server()
        _users += 1
        server = _shared
    try:
        yield server
    finally:
        with _LOCK:
            _users -= 1
            last = _users == 0
            if last:
                _shared = None
        if last:
            code = server.stop(timeout=STOP_TIMEOUT_SECONDS)
            tail = server.log_tail()
            server.log_path.unlink(missing_ok=True)
            server.log_path.parent.rmdir()
            assert code == 0, f"demo server exited with {code} on SIGTERM:\n{tail}"
