"""Checks the contract with buf: lint by proto/buf.yaml's rules, and no breaking change against
the image of the last release. The one recipe for `make lint` and the tests that run it.

The baseline is a committed image (proto/release/, see its README) rather than a git ref: it is
what deployed clients were generated from, and it works in a shallow clone or a source tarball.
buf comes from the dev extra (PyPI's buf-bin), next to this interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
RELEASED_IMAGE = PROTO / "release" / "qwen-chat-v1.binpb"
BUF = Path(sys.executable).parent / "buf"


def buf(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Runs the venv's buf; its findings are on stdout, one per line, file:line:column first."""
    return subprocess.run(
        [str(BUF), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def lint(proto: Path = PROTO) -> subprocess.CompletedProcess[str]:
    return buf("lint", proto)


def breaking(
    proto: Path = PROTO, against: Path = RELEASED_IMAGE
) -> subprocess.CompletedProcess[str]:
    return buf("breaking", proto, "--against", against)


def main() -> int:
    failed = False
    for name, result in (("buf lint", lint()), ("buf breaking", breaking())):
        sys.stdout.write(result.stdout + result.stderr)
        failed |= result.returncode != 0
        verdict = "ok" if result.returncode == 0 else f"failed ({result.returncode})"
        sys.stdout.write(f"{name}: {verdict}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
