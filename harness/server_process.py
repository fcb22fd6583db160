"""``qwen-grpc serve`` as a child process: start it, watch it, signal it, stop it.

The tests of the client and grpcurl, the benchmark and the reliability suite all talk to the
server as deployed: a separate process over loopback TCP, whose crash is an exit, whose memory
is its own and which stops on SIGTERM as Kubernetes stops it.
"""

from __future__ import annotations

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

from harness.probes import health_status, metric_values, status_bytes

_LOGGER = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE = ("-m", "qwen_grpc", "serve")
# Every server gets SIGTERM if the harness dies (see harness.die_with_parent).
_ORPHAN_GUARD = ("-m", "harness.die_with_parent")


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(cache_dir: Path | None = None) -> dict[str, str]:
    """The environment for the server and the CLIs; ``make`` exports the cache folder."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cache_dir is not None:
        env["QWEN_GRPC_CACHE_DIR"] = str(cache_dir)
    env.setdefault("QWEN_GRPC_CACHE_DIR", str(REPO_ROOT / ".cache"))
    return env


class ServerProcess:
    """One server on free loopback ports (gRPC and metrics), its log in a file."""

    def __init__(
        self,
        model: str,
        log_path: Path,
        *,
        cache_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        launcher: Sequence[str] = SERVE,
        log_level: str = "INFO",
        startup_timeout: float = 300.0,
    ) -> None:
        """``launcher`` is what follows the interpreter (a fault-injecting variant, say);
        ``startup_timeout`` covers a first run that still converts the demo model."""
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.command = [
            sys.executable,
            *launcher,
            *("--model", model, "--host", "127.0.0.1", "--port", str(self.port)),
            *("--metrics-port", str(self.metrics_port), "--log-level", log_level),
            *extra_args,
        ]
        self.load_s: float | None = None
        self._env = server_env(cache_dir)
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
            [sys.executable, *_ORPHAN_GUARD, *self.command],
            cwd=REPO_ROOT,  # where fault-injecting launchers are importable
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_serving(self) -> None:
        """Returns once the health check says SERVING; raises if the process exits first."""
        while (status := self.health()) != "SERVING":
            if not self.alive:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() - self._started > self.startup_timeout:
                raise TimeoutError(f"the server was {status} after {self.startup_timeout:.0f} s")
            time.sleep(0.2)
        self.load_s = time.monotonic() - self._started
        _LOGGER.info("SERVING on %s after %.1f s", self.address, self.load_s)

    def start(self) -> None:
        """Spawns the server and waits for SERVING; a server that never got there is stopped."""
        self.spawn()
        try:
            self.wait_serving()
        except BaseException:
            self.stop(timeout=5.0)
            raise

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
        return status_bytes(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int:
        """The kernel's high-water mark of resident memory since start or the last reset."""
        return status_bytes(self.pid, "VmHWM")

    def reset_peak_rss(self) -> bool:
        """Resets the high-water mark to the current RSS, so a peak covers one phase only.

        Without it a serving peak would include model loading, a different question.
        """
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError as exc:
            _LOGGER.warning("cannot reset the server's peak RSS (%s); it includes loading", exc)
            return False
        return True

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, to explain a failure."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

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
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
