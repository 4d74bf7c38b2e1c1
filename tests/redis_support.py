"""Redis for the tests: the shared server at 127.0.0.1:6379, and throwaway servers.

* :func:`require_redis` checks that the shared server answers. When it does
  not, the test fails under CI (the environment variable ``CI`` is set) and
  is skipped elsewhere, with a reason that says how to start Redis.
* :class:`RedisServer` runs a ``redis-server`` of the test's own on a free
  loopback port, to be killed, restarted or paused (SIGSTOP) without
  disturbing the shared one. A missing binary fails under CI, skips elsewhere.
* :func:`keys_under` and :func:`delete_under` list and remove the keys of one
  test's prefix, so tests never touch each other's keys.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from glide import GlideClient

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
START_REDIS = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
RUN_THEM = "then run: .venv/bin/python -m pytest -p no:cacheprovider tests/test_redis_limits.py"


def unavailable(reason: str) -> None:
    """Fail under CI, where Redis must be there; skip elsewhere. Never returns."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def _pings(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as probe:
            probe.sendall(b"PING\r\n")
            return probe.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> str:
    """The shared server's URL, once it has answered a PING; else fail or skip."""
    if not _pings("127.0.0.1", 6379):
        unavailable(
            f"Redis does not answer at 127.0.0.1:6379; start it with `{START_REDIS}`, {RUN_THEM}"
        )
    return SHARED_REDIS_URL


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` of the test's own, on 127.0.0.1 and a free port; nothing persisted."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable(
                "redis-server is not installed (apt-get install redis-server); "
                "the failure tests need a server of their own to stop and restart"
            )
        self.binary = str(binary)
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: trio.Process | None = None

    async def start(self) -> None:
        """Start it (on the same port again after :meth:`kill`); return once it answers."""
        command = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *("--dir", str(self.folder)),
        ]
        self.process = await trio.lowlevel.open_process(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(10):
            await eventually(lambda: trio.to_thread.run_sync(_pings, "127.0.0.1", self.port, 0.2))

    async def kill(self) -> None:
        """SIGKILL it and wait for it to be gone."""
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: it keeps its socket open but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        if self.process is not None:
            self.resume()
        await self.kill()


async def eventually(condition: Callable[[], Awaitable[bool]], interval: float = 0.02) -> None:
    """Poll ``condition`` until it is true; the caller bounds the wait (``trio.fail_after``)."""
    while True:
        if await condition():
            return
        await trio.sleep(interval)


async def keys_under(client: GlideClient, prefix: str) -> list[bytes]:
    """Every key whose name starts with ``prefix`` (SCAN, so the server is never blocked)."""
    found: list[bytes] = []
    cursor: bytes = b"0"
    while True:
        reply = await client.scan(cursor, match=f"{prefix}*", count=1000)
        next_cursor, batch = reply[0], reply[1]
        assert isinstance(next_cursor, bytes)
        assert isinstance(batch, list)
        found += batch
        cursor = next_cursor
        if cursor == b"0":
            return found


async def delete_under(client: GlideClient, prefix: str) -> None:
    keys = await keys_under(client, prefix)
    if keys:
        await client.delete(list(keys))
