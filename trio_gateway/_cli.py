"""The ``trio-gateway`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from trio_gateway import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gateway",
        description="A stream-safe AI gateway (LLM API proxy) built on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"trio-gateway {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0
