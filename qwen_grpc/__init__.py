"""qwen-grpc: a gRPC service serving Qwen chat models on CPU."""
