"""The ``trio-gateway`` command line: serve, demo, hash-key."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sqlite3
import sys
from collections.abc import Sequence

import trio

from trio_gateway._core.config import ConfigError, hash_key, load_config, split_bind
from trio_gateway._version import __version__


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
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="processes serving the one port (overrides [server] workers; default 1)",
    )
    # Internal: how a worker process learns the listening socket its parent made.
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)

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

    from trio_gateway._accounting.usage_report import add_usage_arguments

    usage = commands.add_parser(
        "usage", help="print tokens, cost, errors and latency per key or model from the database"
    )
    add_usage_arguments(usage)
    return parser


def _worker_count(text: str) -> int:
    from trio_gateway._core.config import MAX_WORKERS

    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1 to {MAX_WORKERS}, got {text!r}"
        )
    return count


def _serve(
    config_path: str, bind: str | None, workers: int | None = None, worker_fd: int | None = None
) -> int:
    from trio_gateway._accounting.json_log import RequestLogger
    from trio_gateway._accounting.usage_store import UsageDatabaseError, UsageStore
    from trio_gateway._proxy.app import Gateway
    from trio_gateway._server.serve import serve

    try:
        config = load_config(config_path, workers=workers)  # --workers overrides the file
        if bind is not None:
            split_bind(bind)
        request_log = RequestLogger(config.log_destination, config.log_level)
    except ConfigError as exc:
        return _config_error(str(exc))
    except (OSError, ValueError) as exc:
        return _config_error(f"log.destination: cannot write {config.log_destination}: {exc}")
    if config.workers > 1 and worker_fd is None:
        from trio_gateway._server.workers import run_workers

        request_log.close()  # checked; each worker opens its own
        return run_workers(config_path, config, bind or config.bind)
    if config.log_destination == "logging":
        # A handler for whoever has none; the level applies to the request log only.
        logging.basicConfig()
        if config.log_level != "off":
            logging.getLogger("trio_gateway.requests").setLevel(config.log_level.upper())
    store = None
    if config.database is not None:
        try:
            store = UsageStore(
                config.database,
                schema=config.database_schema,
                spill_dir=config.spill_dir,
                retry_interval=config.retry_interval,
            )
        except ValueError as exc:  # a URL libpq cannot read; the message never echoes it
            return _config_error(f"accounting.database: {exc}")
    limiter = None
    if config.redis_url is not None:
        # Imported only here: the Redis client takes most of a second to import.
        from trio_gateway._accounting.redis_limiter import RedisRateLimiter

        limiter = RedisRateLimiter.from_config(config)
    gateway = Gateway(config, store=store, request_log=request_log, limiter=limiter)

    async def run() -> None:
        # The Redis client lives in this Trio run; closed when serving ends.
        async with limiter or contextlib.nullcontext(), trio.open_nursery() as nursery:
            if worker_fd is not None:  # one of several workers: the parent says "listening"
                from trio_gateway._server.workers import serve_worker

                await serve_worker(gateway, worker_fd)
                return
            urls = await nursery.start(serve, gateway, bind or config.bind)
            print(f"trio-gateway listening on {' '.join(urls)}", file=sys.stderr, flush=True)

    database_errors: list[BaseException] = []
    try:
        trio.run(run)
    except* (UsageDatabaseError, sqlite3.Error) as group:
        database_errors.extend(_leaves(group))
    if database_errors:
        request_log.close()
        return _config_error(f"accounting.database: {database_errors[0]}")
    return 0


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _config_error(message: str) -> int:
    print(f"trio-gateway: config error: {message}", file=sys.stderr)
    return 2


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
        return _serve(args.config, args.bind, args.workers, args.worker_fd)
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
    if args.command == "usage":
        from trio_gateway._accounting.usage_report import main_usage

        return main_usage(args)
    parser.print_help()
    return 0
