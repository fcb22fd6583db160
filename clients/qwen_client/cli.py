"""``qwen-grpc chat``: ask a running server from the shell, once or as a multi-turn chat.

Standard output carries only the answer, streamed as it is generated, so the command composes
with pipes (``qwen-grpc chat "..." > answer.txt``). Prompts, usage and errors go to standard
error. A failed call prints one line with its status code and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

import grpc

from qwen_client.client import (
    DEFAULT_TARGET,
    ChatClient,
    GenerationKwargs,
    MessageLike,
    StreamFinal,
    TextDelta,
    error_details,
)

TARGET_ENV = "QWEN_GRPC_TARGET"
TOKEN_ENV = "QWEN_GRPC_TOKEN"
EXIT_COMMAND = "/exit"
RESET_COMMAND = "/reset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``qwen-grpc chat``; ``qwen_grpc.cli`` owns the parser."""
    parser.add_argument(
        "question",
        nargs="?",
        help="ask once and stream the answer; without it, chat turn by turn from stdin "
        f"({RESET_COMMAND} forgets the conversation, {EXIT_COMMAND} or EOF quits)",
    )
    parser.add_argument(
        "--target",
        help=f"server address, e.g. host:port or dns:///host:port "
        f"(default: ${TARGET_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--token",
        help=f"bearer token for a server that requires one (default: ${TOKEN_ENV}; prefer the "
        "variable, flags show up in the process list)",
    )
    parser.add_argument("--system", help="system prompt that frames the conversation")
    parser.add_argument("--max-new-tokens", type=int, help="upper bound on generated tokens")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2")
    parser.add_argument(
        "--greedy", action="store_true", help="always pick the most likely token (reproducible)"
    )
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible samples")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per answer in seconds (default 60)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print finish reason and usage to stderr"
    )


def _options(args: argparse.Namespace) -> GenerationKwargs:
    """Only the flags the user gave, so the server's defaults apply to the rest."""
    options: GenerationKwargs = {}
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.seed is not None:
        options["seed"] = args.seed
    if args.greedy:
        options["greedy"] = True
    return options


def describe_error(error: grpc.RpcError) -> str:
    """One line a person can act on: the code, the server's message, when to retry."""
    details = error_details(error)
    line = f"error: {details.code.name}"
    if details.message:
        line += f": {' '.join(details.message.split())}"
    if details.retry_delay is not None:
        line += f" (retry in {details.retry_delay:.1f} s)"
    if details.request_id:
        line += f" (request id {details.request_id})"
    return line


def _answer(
    client: ChatClient,
    messages: list[MessageLike],
    options: GenerationKwargs,
    *,
    verbose: bool,
    stdout: TextIO,
    stderr: TextIO,
) -> str:
    """Streams one answer to stdout as it is generated and returns its whole text."""
    parts: list[str] = []
    try:
        for event in client.stream_chat(messages, **options):
            if isinstance(event, TextDelta):
                parts.append(event.text)
                stdout.write(event.text)
                stdout.flush()
            elif isinstance(event, StreamFinal) and verbose:
                usage = event.usage
                stderr.write(
                    f"[{event.finish_reason}] prompt {usage.prompt_tokens} + completion "
                    f"{usage.completion_tokens} = {usage.total_tokens} tokens\n"
                )
    finally:
        if parts:  # end the answer's line even when the stream broke off
            stdout.write("\n")
            stdout.flush()
    return "".join(parts)


def _interactive(
    client: ChatClient,
    base: list[MessageLike],
    options: GenerationKwargs,
    *,
    verbose: bool,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
) -> None:
    """Reads questions line by line; the server is stateless, so the history is resent."""
    prompt = stdin.isatty()
    history = list(base)
    while True:
        if prompt:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line:  # EOF
            if prompt:
                stderr.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == EXIT_COMMAND:
            return
        if text == RESET_COMMAND:
            history = list(base)
            if prompt:
                stderr.write("(conversation reset)\n")
            continue
        history.append(("user", text))
        answer = _answer(client, history, options, verbose=verbose, stdout=stdout, stderr=stderr)
        history.append(("assistant", answer))


def run(args: argparse.Namespace) -> int:
    """Runs ``qwen-grpc chat``; returns the exit code (1 on a failed call, 130 on Ctrl-C)."""
    stdin, stdout, stderr = sys.stdin, sys.stdout, sys.stderr
    target = args.target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
    base: list[MessageLike] = [("system", args.system)] if args.system else []
    options = _options(args)
    token = args.token or os.environ.get(TOKEN_ENV)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    if args.verbose:
        stderr.write(f"target {target}\n")
    try:
        with ChatClient(target, timeout=args.timeout, metadata=metadata) as client:
            if args.question is not None:
                _answer(
                    client,
                    [*base, ("user", args.question)],
                    options,
                    verbose=args.verbose,
                    stdout=stdout,
                    stderr=stderr,
                )
            else:
                _interactive(
                    client,
                    base,
                    options,
                    verbose=args.verbose,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                )
    except grpc.RpcError as error:
        stderr.write(describe_error(error) + "\n")
        return 1
    except KeyboardInterrupt:  # closing the stream cancelled the call on the server
        stderr.write("\n")
        return 130
    return 0
