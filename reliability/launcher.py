"""The suite's servers: the tiny model (plain or with injected faults), the demo model and the
Qwen-shaped random model.

Every scenario talks to a real ``qwen-grpc serve`` process (:mod:`harness.server_process`), or
the same server with injected faults (:mod:`reliability.faulty_server`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from harness.server_process import SERVE, ServerProcess

FAULTY_SERVE = ("-m", "reliability.faulty_server")


class ServerLauncher:
    """Builds the suite's servers: the tiny model (plain or faulty), demo and Qwen-shaped."""

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

    @functools.cached_property
    def qwen_model(self) -> Path:
        """Qwen1.5-0.5B's exact shape with random weights, in the folder the benchmark uses."""
        from qwen_grpc.engine.synthetic import build_random_qwen

        return build_random_qwen(
            self.cache_dir / "bench-models" / "qwen1.5-0.5b-random", self.cache_dir, "qwen1.5-0.5b"
        )

    def tiny(self, name: str, *extra_args: str, faulty: bool = False) -> ServerProcess:
        """A tiny-model server; ``faulty`` serves it through :mod:`reliability.faulty_server`."""
        return ServerProcess(
            str(self.tiny_model),
            self.log_dir / f"{name}.log",
            cache_dir=self.cache_dir,
            extra_args=("--dtype", "float32", *extra_args),
            launcher=FAULTY_SERVE if faulty else SERVE,
        )

    def demo(self, name: str, *extra_args: str) -> ServerProcess:
        """The offline demo model (SmolLM2-135M from a PyPI wheel) as deployed."""
        return ServerProcess(
            "demo", self.log_dir / f"{name}.log", cache_dir=self.cache_dir, extra_args=extra_args
        )

    def qwen(self, name: str, *extra_args: str) -> ServerProcess:
        """The Qwen-shaped model with the deployed precision flags: production's compute and
        memory, for scenarios whose verdict is a memory or time budget."""
        return ServerProcess(
            str(self.qwen_model),
            self.log_dir / f"{name}.log",
            cache_dir=self.cache_dir,
            extra_args=extra_args,
        )
