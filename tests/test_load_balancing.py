"""Client-side load balancing over two real server processes, and a replica stopped mid-traffic.

This is the Kubernetes shape on loopback: a headless Service's DNS name resolves to every ready
pod's address on the same port; here the ``ipv4:`` target lists two loopback addresses on one
port (this machine's ``localhost`` resolves to 127.0.0.1 only, so ``dns:///`` cannot yield
two). The resolver differs, the policy under test does not: ``round_robin`` over all resolved
addresses, retries on UNAVAILABLE and wait-for-ready, from :class:`qwen_client.ChatClient`.

The two replicas serve the same tiny checkpoint under two different paths, so
``GetModelInfo.model_id`` (the ``--model`` setting as given) tells which one answered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from qwen_client import ChatClient

from qwen_grpc.server import SERVICE_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.1", "127.0.0.2")
START_TIMEOUT_S = 60.0
HELLO = [("user", "Hello")]


@dataclasses.dataclass
class Replica:
    """One ``qwen-grpc serve`` process and where its log goes."""

    model: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _free_port_on_all(hosts: tuple[str, ...]) -> int:
    """A port free on every host at once: the 'same port, several pod IPs' of a Service."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host in hosts[1:]:
                    stack.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def _start_replica(model: Path, host: str, port: int, log: Path, cache_dir: Path) -> Replica:
    args = [
        sys.executable,
        "-m",
        "qwen_grpc",
        "serve",
        f"--model={model}",
        "--dtype=float32",
        f"--host={host}",
        f"--port={port}",
        "--threads=1",  # two replicas share this machine's cores
        "--grace-seconds=5",
        "--log-level=INFO",
        # Off: both replicas would claim the default metrics port of this one machine.
        "--metrics-port=0",
        # One client sends all the traffic here; a per-client rate limit is not under test.
        "--rate-limit-per-second=0",
    ]
    env = {**os.environ, "QWEN_GRPC_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Replica(str(model), f"{host}:{port}", process, log)


def _wait_serving(replica: Replica, deadline: float) -> None:
    """Polls the replica's own health until the model is loaded and warm."""
    with ChatClient(replica.address, timeout=2.0, wait_for_ready=False) as client:
        while time.monotonic() < deadline:
            if replica.process.poll() is not None:
                pytest.fail(f"{replica.address} exited early:\n{replica.log_text()}")
            with contextlib.suppress(grpc.RpcError):
                if client.health(SERVICE_NAME) == "SERVING":
                    return
            time.sleep(0.2)
    pytest.fail(f"{replica.address} not SERVING after {START_TIMEOUT_S} s:\n{replica.log_text()}")


def _stop(replica: Replica) -> None:
    if replica.process.poll() is None:
        replica.process.terminate()
        try:
            replica.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()


@pytest.fixture
def replicas(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    """Two replicas of the tiny model on 127.0.0.1:P and 127.0.0.2:P, SERVING."""
    port = _free_port_on_all(HOSTS)
    started: list[Replica] = []
    try:
        for index, host in enumerate(HOSTS):
            # Symlinks, not copies: the server reports --model as given, so the paths differ.
            model = tmp_path / f"replica-{index}"
            model.symlink_to(tiny_model_dir, target_is_directory=True)
            log = tmp_path / f"replica-{index}.log"
            started.append(_start_replica(model, host, port, log, cache_dir))
        deadline = time.monotonic() + START_TIMEOUT_S
        for replica in started:
            _wait_serving(replica, deadline)
        yield started
    finally:
        for replica in started:
            _stop(replica)


def _target(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(replica.address for replica in replicas)


def test_round_robin_spreads_calls_and_survives_a_replica_stopped_with_sigterm(
    replicas: list[Replica],
) -> None:
    first, second = replicas
    with ChatClient(_target(replicas), timeout=30.0) as client:
        # Round robin only alternates once both connections are up; wait for them, since
        # that is start-up, not balancing.
        grpc.channel_ready_future(client.channel).result(timeout=10)
        answered_by = Counter(client.model_info().model_id for _ in range(20))
        assert set(answered_by) == {first.model, second.model}, answered_by
        assert min(answered_by.values()) >= 5, f"calls not spread: {answered_by}"

        # Real generations, spread the same way, while one replica is told to stop mid-traffic
        # (what a rolling update or a node drain does to a pod).
        results: list[str] = []
        failures: list[BaseException] = []
        halfway = threading.Event()

        def traffic() -> None:
            for index in range(40):
                if index == 10:
                    halfway.set()
                try:
                    reply = client.chat(HELLO, max_new_tokens=4, greedy=True)
                    results.append(reply.finish_reason)
                except grpc.RpcError as error:  # recorded, so the assertion shows the code
                    failures.append(error)
            halfway.set()

        worker = threading.Thread(target=traffic, name="traffic")
        worker.start()
        assert halfway.wait(timeout=30)
        second.process.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert not worker.is_alive()
        assert not failures, [f"{e.code()}: {e.details()}" for e in failures]  # type: ignore[attr-defined]
        assert len(results) == 40

        # The stopped replica drained and exited cleanly; everything now lands on the other.
        assert second.process.wait(timeout=15) == 0, second.log_text()
        after = Counter(client.model_info().model_id for _ in range(10))
        assert after == Counter({first.model: 10}), after
