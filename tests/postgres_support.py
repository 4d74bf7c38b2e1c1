"""PostgreSQL for the tests: the shared server, a schema per test, and a link the test can cut.

* :func:`require_postgres` checks that the shared server answers. When it
  does not, the test fails under CI (the environment variable ``CI`` is set)
  and is skipped elsewhere, with a reason that says how to start it.
* :func:`new_schema` names a schema no other test uses; :func:`drop_schema`
  removes it with everything in it. Tests never touch ``public``.
* :class:`TcpProxy` forwards a loopback port to the server. :meth:`TcpProxy.cut`
  closes every connection through it and refuses new ones, and
  :meth:`TcpProxy.restore` lets them through again: an outage of the
  database as the gateway sees it, without stopping the shared server.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_URL = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
RUN_THEM = "then run: .venv/bin/python -m pytest -p no:cacheprovider tests/test_postgres_store.py"


def unavailable(reason: str) -> None:
    """Fail under CI, where PostgreSQL must be there; skip elsewhere. Never returns."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def require_postgres() -> str:
    """The shared server's URL, once it has answered a query; else fail or skip."""
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        unavailable(
            f"PostgreSQL does not answer at {POSTGRES_HOST}:{POSTGRES_PORT} ({exc}); start it"
            f" with `{START_POSTGRES}`, {RUN_THEM}"
        )
    return POSTGRES_URL


def new_schema() -> str:
    return f"test_{uuid.uuid4().hex}"


def drop_schema(schema: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def query(schema: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``statement`` with ``search_path`` set to ``schema``; its rows (none for DDL).

    Blocking: from an async test, run it with ``trio.to_thread.run_sync``.
    """
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        cursor = conn.execute(statement.encode(), params)
        return cursor.fetchall() if cursor.description is not None else []


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to the shared server, until :meth:`cut`.

    Run :meth:`serve` in a nursery (``await nursery.start(proxy.serve)``). While
    cut, a new connection is accepted and closed at once, as a server that
    is going down does.
    """

    def __init__(self) -> None:
        self.port = 0
        self.up = True
        self.connections = 0  # accepted so far, forwarded or not
        self._links: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._link, listeners, handler_nursery=nursery)

    def cut(self) -> None:
        """Close every connection now, and refuse the next ones."""
        self.up = False
        for link in self._links:
            link.cancel()

    def restore(self) -> None:
        self.up = True

    async def _link(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            if not self.up:
                return
            with trio.CancelScope() as link:
                self._links.add(link)
                try:
                    server = await trio.open_tcp_stream(POSTGRES_HOST, POSTGRES_PORT)
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(_pump, client, server, nursery.cancel_scope)
                        nursery.start_soon(_pump, server, client, nursery.cancel_scope)
                finally:
                    self._links.discard(link)


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, link: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    link.cancel()  # one side closed: close both
