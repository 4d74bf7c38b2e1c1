"""The ``trio-gateway`` command line: serve, demo, hash-key."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from trio_gateway import __version__
from trio_gateway._config import ConfigError, hash_key, load_config, split_bind


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gateway",
        description="A stream-safe AI gateway (LLM API proxy) built on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"trio-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway from a TOML config file")
    serve.add_argument("--config", required=True, help="path of gateway.toml")
    serve.add_argument("--bind", help="HOST:PORT to listen on (overrides [server] bind)")

    demo = commands.add_parser(
        "demo", help="run the gateway in front of a built-in mock upstream (no API key needed)"
    )
    demo.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    demo.add_argument(
        "--once", action="store_true", help="exit after the sample stream instead of serving on"
    )

    commands.add_parser(
        "hash-key", help="read a client key on stdin and print the sha256 for [[keys]]"
    )
    return parser


def _serve(config_path: str, bind: str | None) -> int:
    from trio_gateway._app import Gateway
    from trio_gateway._server import serve

    try:
        config = load_config(config_path)
        if bind is not None:
            split_bind(bind)
    except ConfigError as exc:
        print(f"trio-gateway: config error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve, Gateway(config), bind or config.bind)
            print(f"trio-gateway listening on {' '.join(urls)}", file=sys.stderr, flush=True)

    trio.run(run)
    return 0


def _hash_key() -> int:
    # Clients send the key as a Bearer token or header value, which carry no
    # surrounding white space; a key with some could never match.
    key = sys.stdin.readline().strip()
    if not key:
        print("trio-gateway: hash-key: no key on standard input", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.config, args.bind)
    if args.command == "demo":
        from trio_gateway._demo import run_demo

        try:
            split_bind(args.bind)
        except ConfigError as exc:
            parser.error(str(exc))
        trio.run(run_demo, args.bind, args.once)
        return 0
    if args.command == "hash-key":
        return _hash_key()
    parser.print_help()
    return 0
