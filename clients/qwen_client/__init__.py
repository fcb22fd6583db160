"""Python client for qwen.chat.v1."""
