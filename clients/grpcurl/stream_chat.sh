#!/usr/bin/env bash
# A StreamChat call: one message per text delta as it is generated, then a final message
# with the finish reason and token usage.
set -euo pipefail
exec "${GRPCURL:-grpcurl}" -plaintext -d @ \
  "${QWEN_GRPC_TARGET:-127.0.0.1:50051}" qwen.chat.v1.ChatService/StreamChat <<'JSON'
{
  "messages": [
    {"role": "ROLE_SYSTEM", "content": "You are a concise assistant."},
    {"role": "ROLE_USER", "content": "What is the capital of France?"}
  ],
  "options": {"greedy": true, "max_new_tokens": 64}
}
JSON
