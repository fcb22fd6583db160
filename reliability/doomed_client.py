"""``python -m reliability.doomed_client ADDRESS``: a client process that streams until killed.

A crashed or OOM-killed caller never cancels its call: its process vanishes and the kernel
closes the socket. The fault scenario starts this client, waits for its ``streaming`` line and
SIGKILLs it; the server must notice the dead connection and drop the sequence. It imports only
grpc and the stubs, so it starts in a fraction of a second.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc

from qwen_grpc.v1 import chat_pb2, chat_pb2_grpc

READY = "streaming"
MAX_NEW_TOKENS = 512


def main(argv: Sequence[str] | None = None) -> int:
    (address,) = sys.argv[1:] if argv is None else argv
    request = chat_pb2.StreamChatRequest(
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Tell me a long story.")],
        options=chat_pb2.GenerationOptions(greedy=True, max_new_tokens=MAX_NEW_TOKENS),
    )
    with grpc.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for index, _ in enumerate(stub.StreamChat(request, timeout=600)):
            if index == 0:
                print(READY, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
