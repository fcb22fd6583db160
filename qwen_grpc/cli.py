"""``qwen-grpc serve|chat``: the command line, kept apart from the server wiring."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qwen_grpc import config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-grpc", description="Qwen chat over gRPC on CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the model over gRPC")
    config.add_arguments(serve_parser)
    chat_parser = commands.add_parser("chat", help="chat with a running server")
    from qwen_client import cli as chat_cli

    chat_cli.add_arguments(chat_parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from qwen_grpc.logs import configure_logging
        from qwen_grpc.server import serve

        settings = config.from_namespace(args, os.environ)
        configure_logging(settings.log_level)
        return serve(settings)
    return chat_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
