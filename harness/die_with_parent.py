"""``python -m harness.die_with_parent COMMAND...``: runs COMMAND, which gets SIGTERM if its
parent dies, so no server outlives a killed harness.

This is a separate step before ``exec`` rather than a ``preexec_fn``: a ``preexec_fn`` makes
``subprocess`` fork instead of vfork, which runs gRPC's fork handlers in the child, and with
gRPC calls active in the parent those crash the child now and then (grpcio 1.8x: "epoll_wait
error: Bad file descriptor", then SIGABRT before the server even starts; grpc/grpc#43055).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(command: list[str]) -> None:
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(1)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
