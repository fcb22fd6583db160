#!/usr/bin/env bash
# Lists the services the server exposes through reflection.
set -euo pipefail
exec "${GRPCURL:-grpcurl}" -plaintext "${QWEN_GRPC_TARGET:-127.0.0.1:50051}" list
