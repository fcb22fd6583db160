"""The real server as a child process: start it, wait for SERVING, watch its memory, stop it.

The benchmark measures what an operator runs, ``python -m qwen_grpc serve``, not an in-process
server object: the client and the server are different processes, as in production, and the
server's resident memory is its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

_LOGGER = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port the kernel just handed out (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _die_with_parent() -> None:
    """In the child: SIGTERM when the bench dies, so no server outlives a killed benchmark."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _has_setting(name: str) -> bool:
    """Whether this version of the server has a setting (older ones lack the metrics port)."""
    from qwen_grpc.config import Settings

    return name in {f.name for f in dataclasses.fields(Settings)}


class RssSampler:
    """Samples a process's RSS in a thread; a cross-check on the kernel's VmHWM."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_bytes = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.Error:
                return
            self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class ServerProcess:
    """``python -m qwen_grpc serve`` on a free loopback port, as a context manager."""

    def __init__(
        self,
        model_dir: Path,
        dtype: str | None,
        cache_dir: Path,
        log_path: Path,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
    ) -> None:
        self.model_dir = model_dir
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port() if _has_setting("metrics_port") else None
        self.load_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "qwen_grpc", "serve", "--model", str(self.model_dir)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING"]
        if self.dtype is not None:
            command += ["--dtype", self.dtype]
        if self.metrics_port is not None:
            command += ["--metrics-port", str(self.metrics_port)]
        return command + self.extra_args

    def start(self) -> None:
        """Spawns the server and blocks until its health check says SERVING."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._log_file = log
        env = dict(os.environ, QWEN_GRPC_CACHE_DIR=str(self.cache_dir))
        _LOGGER.info("starting server: %s", " ".join(self.command()))
        started = time.perf_counter()
        self._process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self._wait_serving(started)
        self.load_s = time.perf_counter() - started
        _LOGGER.info("server SERVING on %s after %.1f s", self.address, self.load_s)

    def _wait_serving(self, started: float) -> None:
        assert self._process is not None
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with {self._process.returncode} while starting; "
                        f"see {self.log_path}"
                    )
                if time.perf_counter() - started > self.startup_timeout_s:
                    raise TimeoutError(
                        f"the server was not SERVING after {self.startup_timeout_s} s"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)

    def rss_bytes(self) -> int | None:
        kib = _status_kib(self.pid, "VmRSS")
        return None if kib is None else kib * 1024

    def peak_rss_bytes(self) -> int | None:
        """The kernel's high-water mark of resident memory (VmHWM) since start or last reset."""
        kib = _status_kib(self.pid, "VmHWM")
        return None if kib is None else kib * 1024

    def reset_peak_rss(self) -> bool:
        """Resets VmHWM to the current RSS (``clear_refs`` 5), so a peak covers one phase only.

        Without it the peak would include model loading and quantization, which is a different
        question (start-up memory) from the one asked (memory while serving).
        """
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError as exc:
            _LOGGER.warning("cannot reset the server's peak RSS (%s); it includes loading", exc)
            return False
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the server drains), then SIGKILL if it does not exit in time."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _LOGGER.warning("server did not stop in %.0f s; killing it", timeout_s)
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServerProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
