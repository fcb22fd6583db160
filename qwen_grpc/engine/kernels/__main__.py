"""``python -m qwen_grpc.engine.kernels``: build (or find) the native kernels and say which path runs.

``make install`` runs it so the first server start does not pay the compile. ``--for-image``
compiles every build (AVX512-VNNI and AVX2) whatever this CPU supports, and fails instead of
falling back (deploy/Dockerfile).
"""

from __future__ import annotations

import argparse
import logging

from qwen_grpc.engine.kernels import kernel_path, native


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qwen_grpc.engine.kernels")
    parser.add_argument(
        "--for-image",
        action="store_true",
        help="compile for another machine to load; fail if the library cannot be built",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.for_image:
        for library in native.build_for_image():
            logging.getLogger(__name__).info("q8 kernels: built %s", library)
    else:
        kernel_path()


if __name__ == "__main__":
    main()
