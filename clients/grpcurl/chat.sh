#!/usr/bin/env bash
# One unary Chat call: the whole answer, its finish reason and token usage.
set -euo pipefail
exec "${GRPCURL:-grpcurl}" -plaintext -d @ \
  "${QWEN_GRPC_TARGET:-127.0.0.1:50051}" qwen.chat.v1.ChatService/Chat <<'JSON'
{
  "messages": [
    {"role": "ROLE_USER", "content": "What is the capital of France?"}
  ],
  "options": {"greedy": true}
}
JSON
