"""Placeholder: replaced by the chat CLI."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?")


def run(args: argparse.Namespace) -> int:
    return 0
