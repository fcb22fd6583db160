"""Looking at a server from outside: its health, its Prometheus gauges, its resident memory.

Scenarios judge the server by what an operator can see, so every probe here goes through a
public surface (the health service, the metrics port, ``/proc``), never through the server's
objects.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families


def health_status(channel: grpc.Channel, timeout: float = 2.0) -> str:
    """``SERVING``/``NOT_SERVING``, or the status code name when the check itself failed.

    During a drain the check fails once the server stops taking calls; that failure is an
    observation too, so it is returned rather than raised.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as error:
        return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def metric_values(port: int, timeout: float = 5.0) -> dict[str, float]:
    """Every sample of the server's ``/metrics`` page, keyed ``name{label="value",...}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode("utf-8")
    return {
        _key(sample.name, sample.labels): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def status_bytes(pid: int, field: str) -> int:
    """A memory field of ``/proc/<pid>/status``: ``VmRSS`` (what the OOM killer counts) or
    ``VmHWM`` (its high-water mark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")
