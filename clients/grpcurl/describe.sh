#!/usr/bin/env bash
# Shows a service, method or message with its comments: ./describe.sh [SYMBOL]
# e.g. ./describe.sh qwen.chat.v1.GenerationOptions
set -euo pipefail
exec "${GRPCURL:-grpcurl}" -plaintext "${QWEN_GRPC_TARGET:-127.0.0.1:50051}" \
  describe "${1:-qwen.chat.v1.ChatService}"
