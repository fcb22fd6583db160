"""Generated gRPC stubs for qwen.chat.v1; regenerate with `make proto`."""
