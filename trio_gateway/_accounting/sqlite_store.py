"""The usage database in a SQLite file: blocking, run on the usage store's database thread.

Implements :class:`~trio_gateway._accounting.usage_db.UsageDatabase` (read its
contract first). The schema text is
:data:`~trio_gateway._accounting.usage_rows.SCHEMA`, its version is kept in
``PRAGMA user_version``; a file of an older version is brought up to date at
start (:func:`~trio_gateway._accounting.usage_rows.migration_statements`), in
the same transaction.

Several processes may write one file: each has its own connection (on its
own store's thread). WAL mode lets readers and the one writer of the moment
work at the same time; writers take turns, each ``BEGIN IMMEDIATE`` waiting
up to ``busy_timeout`` (5 s) for the others. Creating the schema is one
``BEGIN IMMEDIATE`` transaction too, so two processes that start together on
a new file create it once.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from trio_gateway._accounting.usage_db import SchemaError
from trio_gateway._accounting.usage_rows import (
    INSERT,
    SCHEMA_VERSION,
    Row,
    migration_statements,
    schema_statements,
)

__all__ = ["SQLiteDatabase", "connect"]

BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's lock
# A row that fails for one of these would fail again: it is refused, not retried.
_REFUSED = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open the usage database at ``path`` and bring it to :data:`SCHEMA_VERSION`.

    Blocking. WAL mode (``:memory:`` has none), autocommit: callers write their
    own ``BEGIN``/``COMMIT``. Raises :class:`SchemaError` for a database made
    by a newer trio-gateway, or one with a ``requests`` table it did not make.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _set_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: safe from crashes, cheap commits
        conn.execute("BEGIN IMMEDIATE")
        try:
            _migrate(conn, path)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _set_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (once for good: the mode is kept in the file).

    Changing the mode does not wait for the busy timeout: when another process
    is opening a new file at the same moment, SQLite answers "database is
    locked" at once. So the change is retried for as long as the timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
        else:
            return


def _migrate(conn: sqlite3.Connection, path: str | os.PathLike[str]) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: the usage database has schema version {version}, newer than this"
            f" trio-gateway knows ({SCHEMA_VERSION}); upgrade trio-gateway or point"
            " [accounting] database at another file"
        )
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        found = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'requests'")
        if found.fetchone()[0]:
            raise SchemaError(
                f"{path}: has a 'requests' table but no schema version:"
                " not a trio-gateway usage database"
            )
        statements = schema_statements("sqlite")
    else:
        statements = migration_statements("sqlite", version)
    # One statement at a time: executescript() would commit the open transaction.
    for statement in statements:
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def insert(conn: sqlite3.Connection, rows: Sequence[Row]) -> int:
    """Insert ``rows`` in one transaction; return how many were new (not duplicates)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        inserted = conn.executemany(INSERT, rows).rowcount
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return int(inserted)


class SQLiteDatabase:
    """A SQLite usage database: a file, or ``":memory:"`` (which has no spill files).

    The spill files are ``<file>.spill.<pid>.jsonl`` beside the file, or in
    ``spill_dir`` when one is given.
    """

    refused: tuple[type[Exception], ...] = _REFUSED
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: str | os.PathLike[str], *, spill_dir: Path | None = None) -> None:
        self.path = path
        self.where = str(path)
        if str(path) in (":memory:", ""):
            self.spill_base: Path | None = None
        elif spill_dir is None:
            self.spill_base = Path(path)
        else:
            self.spill_base = spill_dir / Path(path).name
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open the file (once: a SQLite file is never "unavailable") and migrate it."""
        if self._conn is None:
            self._conn = connect(self.path)

    def insert(self, rows: Sequence[Row]) -> int:
        return insert(self.connection, rows)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    @property
    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the usage database is not open")
        return self._conn
