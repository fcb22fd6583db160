"""Generates the Python stubs for proto/ into a folder: the one recipe for `make proto` and the
test that fails when the committed stubs are stale.

grpcio-tools writes ``from qwen.chat.v1 import chat_pb2`` (protobuf#1491) while the stubs live
in ``qwen_grpc.v1``, so that one import is rewritten. The descriptor set keeps the proto's
comments, which the reflection service serves to ``grpcurl describe``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "qwen/chat/v1/chat.proto"
STUB_FILES = ("chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py", "chat_descriptor.binpb")


def generate(out_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{ROOT / 'proto'}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                "--include_source_info",
                f"--descriptor_set_out={Path(scratch) / 'chat_descriptor.binpb'}",
                str(ROOT / "proto" / PROTO),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        generated = Path(scratch) / Path(PROTO).parent
        shutil.move(Path(scratch) / "chat_descriptor.binpb", generated / "chat_descriptor.binpb")
        grpc_stub = generated / "chat_pb2_grpc.py"
        grpc_stub.write_text(
            grpc_stub.read_text().replace(
                "from qwen.chat.v1 import chat_pb2", "from qwen_grpc.v1 import chat_pb2"
            )
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in STUB_FILES:
            shutil.copyfile(generated / name, out_dir / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "qwen_grpc" / "v1")
