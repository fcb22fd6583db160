"""The server under test as a child process: start it, watch it, signal it, stop it.

Every scenario talks to a real ``qwen-grpc serve`` process (or the same server with injected
faults, :mod:`reliability.faulty_server`) over loopback TCP: a crash is a process that exited,
memory is the process's own, and SIGTERM is the signal Kubernetes sends.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc

from reliability.probes import health_status, metric_values, vm_rss_bytes

_LOGGER = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE = ("-m", "qwen_grpc", "serve")
FAULTY_SERVE = ("-m", "reliability.faulty_server")
STARTUP_TIMEOUT_SECONDS = 300.0  # the first demo run converts the GGUF model; CI is slow


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One server process on free loopback ports, its log in a file; a context manager."""

    def __init__(
        self,
        launcher: Sequence[str],
        model: str,
        cache_dir: Path,
        log_path: Path,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [
            sys.executable,
            *launcher,
            *("--model", model, "--host", "127.0.0.1", "--port", str(self.port)),
            *("--metrics-port", str(self.metrics_port), "--log-level", "INFO"),
            *extra_args,
        ]
        self._env = dict(os.environ, QWEN_GRPC_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started = 0.0

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the server was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def spawn(self) -> None:
        """Starts the process without waiting: several servers can load at the same time."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        _LOGGER.info("starting %s (log %s)", " ".join(self.command[1:]), self.log_path)
        self._started = time.monotonic()
        self._process = subprocess.Popen(
            self.command,
            cwd=REPO_ROOT,  # where ``-m reliability.faulty_server`` is importable
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Returns once the health check says SERVING; raises if the process exits first."""
        while (status := self.health()) != "SERVING":
            if not self.alive:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode} while starting; "
                    f"see {self.log_path}"
                )
            if time.monotonic() - self._started > timeout:
                raise TimeoutError(f"the server was {status} after {timeout:.0f} s")
            time.sleep(0.2)
        _LOGGER.info("SERVING on %s after %.1f s", self.address, time.monotonic() - self._started)

    def start(self) -> None:
        self.spawn()
        self.wait_serving()

    def health(self) -> str:
        with grpc.insecure_channel(self.address) as channel:
            return health_status(channel)

    def metrics(self) -> dict[str, float]:
        return metric_values(self.metrics_port)

    def decode_steps(self) -> int:
        """Batched decode steps run so far: the engine's clock, whatever the machine's speed."""
        return int(self.metrics().get('qwen_engine_step_seconds_count{kind="decode"}', 0))

    def idle_within(self, seconds: float) -> float | None:
        """Seconds until no sequence runs or waits, or ``None`` if that took longer."""
        started = time.monotonic()
        while True:
            gauges = self.metrics()
            if gauges["qwen_active_sequences"] == 0 and gauges["qwen_queue_depth"] == 0:
                return time.monotonic() - started
            if time.monotonic() - started > seconds:
                return None
            time.sleep(0.05)

    def rss_bytes(self) -> int:
        return vm_rss_bytes(self.pid)

    def error_log_lines(self) -> int:
        """Log records at ERROR or above: failed calls, engine failures, tracebacks."""
        count = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                level = json.loads(line).get("level")
            except (json.JSONDecodeError, AttributeError):
                continue
            count += level in ("ERROR", "CRITICAL")
        return count

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or ``None`` if the process is still running after ``timeout``."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; the SIGTERM exit code or None."""
        code: int | None = None
        if self._process is not None:
            if self.alive:
                self.sigterm()
            code = self.wait_exit(timeout)
            if code is None:
                _LOGGER.warning(
                    "server %d ignored SIGTERM for %.0f s; killing it", self.pid, timeout
                )
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop(timeout=5.0)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class ServerLauncher:
    """Builds the suite's servers: the tiny model (plain or faulty) and the demo model."""

    def __init__(self, cache_dir: Path, log_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.log_dir = log_dir

    @functools.cached_property
    def tiny_model(self) -> Path:
        """The tests' tiny random Qwen2 (real Qwen tokenizer), built once and reused."""
        from qwen_grpc.engine.synthetic import build_random_qwen

        return build_random_qwen(
            self.cache_dir / "test-models" / "tiny-qwen2", self.cache_dir, "tiny"
        )

    def tiny(self, name: str, *extra_args: str, faulty: bool = False) -> ServerProcess:
        """A tiny-model server; ``faulty`` serves it through :mod:`reliability.faulty_server`."""
        return ServerProcess(
            FAULTY_SERVE if faulty else SERVE,
            str(self.tiny_model),
            self.cache_dir,
            self.log_dir / f"{name}.log",
            ("--dtype", "float32", *extra_args),
        )

    def demo(self, name: str, *extra_args: str) -> ServerProcess:
        """The offline demo model (SmolLM2-135M from a PyPI wheel) as deployed."""
        return ServerProcess(
            SERVE, "demo", self.cache_dir, self.log_dir / f"{name}.log", extra_args
        )
