"""``python -m qwen_grpc.engine.kernels``: build (or find) the native kernels and say which path runs.

``make install`` runs it so the first server start does not pay the compile.
"""

from __future__ import annotations

import logging

from qwen_grpc.engine.kernels import kernel_path


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernel_path()


if __name__ == "__main__":
    main()
