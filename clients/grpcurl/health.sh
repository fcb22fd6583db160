#!/usr/bin/env bash
# Asks grpc.health.v1 for the serving status: ./health.sh [SERVICE]
# "" (the default) is the whole server; qwen.chat.v1.ChatService the chat service alone.
set -euo pipefail
exec "${GRPCURL:-grpcurl}" -plaintext -d "{\"service\": \"${1:-}\"}" \
  "${QWEN_GRPC_TARGET:-127.0.0.1:50051}" grpc.health.v1.Health/Check
