"""A real ``qwen-grpc serve --model demo`` process shared by the client and grpcurl tests.

The client, the CLI and the grpcurl scripts are tested against the service as deployed: a
separate process, over TCP, stopped with SIGTERM. Starting it costs seconds, so both test
modules share one process: each imports :func:`demo_server`; the first user starts it and the
last one (at the end of the session) stops it and checks that it drained cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 180.0  # the first run converts the GGUF model (~15 s), busy CI is slow
STOP_TIMEOUT_SECONDS = 60.0


@dataclass
class DemoServer:
    """A running demo server process and the address to reach it."""

    target: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, to explain a failure."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A loopback port nobody listens on right now (the server does not report port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env() -> dict[str, str]:
    """The environment for the server and the CLIs; ``make test`` exports the cache dir."""
    env = dict(os.environ)
    env.setdefault("QWEN_GRPC_CACHE_DIR", str(REPO_ROOT / ".cache"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_until_serving(server: DemoServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"demo server exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo server not SERVING after {timeout:.0f} s")
            time.sleep(0.2)


def start_demo_server(timeout: float = START_TIMEOUT_SECONDS) -> DemoServer:
    """Starts the demo model server on a free port and returns once health says SERVING."""
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="qwen-grpc-demo-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qwen_grpc",
                "serve",
                "--model",
                "demo",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--grace-seconds",
                "5",
                "--metrics-port",
                "0",
                # One torch thread: on a busy CI machine, threads waiting for each other in
                # every matmul cost far more than the parallelism gains for a 135M model.
                "--threads",
                "1",
            ],
            cwd=REPO_ROOT,
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = DemoServer(f"127.0.0.1:{port}", port, process, Path(log_name))
    try:
        _wait_until_serving(server, timeout)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return server


def stop_demo_server(server: DemoServer) -> int:
    """SIGTERM, as Kubernetes does; returns the exit code (0 when it drained cleanly)."""
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise


_LOCK = threading.Lock()
_shared: DemoServer | None = None
_users = 0


@pytest.fixture(scope="session")
def demo_server() -> Iterator[DemoServer]:
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
            code = stop_demo_server(server)
            tail = server.log_tail()
            server.log_path.unlink(missing_ok=True)
            assert code == 0, f"demo server exited with {code} on SIGTERM:\n{tail}"
