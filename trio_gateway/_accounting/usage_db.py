"""The database behind the usage store: one small blocking interface, SQLite or PostgreSQL.

:class:`~trio_gateway._accounting.usage_store.UsageStore` (the Trio side:
queue, writer, spill files) knows a database only through
:class:`UsageDatabase`. The store picks the implementation from
``[accounting] database``: a ``postgresql://`` or ``postgres://`` URL
(:func:`is_database_url`) is
:class:`~trio_gateway._accounting.postgres_store.PostgresDatabase`, anything
else a SQLite file (:class:`~trio_gateway._accounting.sqlite_store.SQLiteDatabase`).

The contract every implementation keeps:

1. **Blocking, on one thread.** Every method is called on the store's
   database thread, one call at a time, and only that thread touches the
   connection. No method is ever called from the event loop.
2. **One batch, one transaction.** :meth:`UsageDatabase.insert` writes all
   of its rows or none, and a row whose ``request_id`` is already stored is
   skipped, not an error: it returns how many rows were new. So writing a
   batch twice (a retry, a re-imported spill file) stores it once.
3. **Errors are sorted here, at the boundary,** into four kinds, and the
   store acts on the kind, never on a driver's exception:

   - :class:`SchemaError` (and other :class:`UsageDatabaseError`\\ s) from
     :meth:`~UsageDatabase.open`: this database cannot be used; ``serve``
     stops at start with one line.
   - :class:`DatabaseUnavailable`: the server cannot be reached now, or the
     connection was lost. The implementation has already dropped the
     connection; the next :meth:`~UsageDatabase.open` reconnects. The
     store spills until a retry succeeds.
   - ``refused``: the database's own errors that mean "this row will never go
     in" (a NULL where NOT NULL is declared, a number out of range). A spill
     import retries such a chunk row by row and keeps the bad rows aside.
   - anything else: this write failed; the batch is spilled and retried.
4. **No secret in a message.** :attr:`UsageDatabase.where` names the
   database for logs and errors: the path, or the URL without its password.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from trio_gateway._accounting.usage_rows import Row

__all__ = [
    "DatabaseUnavailable",
    "SchemaError",
    "UsageDatabase",
    "UsageDatabaseError",
    "is_database_url",
]

#: URL schemes that select PostgreSQL (libpq accepts both).
URL_SCHEMES = ("postgresql://", "postgres://")


class UsageDatabaseError(Exception):
    """The usage database cannot be used (found at start; ``serve`` exits with status 2)."""


class SchemaError(UsageDatabaseError):
    """The database is not one this version of trio-gateway can use."""


class DatabaseUnavailable(Exception):
    """The database server cannot be reached now; records are spilled until it can."""


class UsageDatabase(Protocol):
    """A usage database, as the store's database thread sees it (the module docstring)."""

    #: Names the database in messages; never holds a password.
    where: str
    #: The spill files' common start, ``<spill_base>.spill.<pid>.jsonl``; None: no spill files.
    spill_base: Path | None
    #: Errors from :meth:`insert` that mean a row will never go in.
    refused: tuple[type[Exception], ...]
    #: The driver's errors: expected, so logged without a traceback.
    errors: tuple[type[Exception], ...]

    def open(self) -> None:
        """Connect (again) and bring the schema to the current version.

        Raises :class:`SchemaError` or :class:`UsageDatabaseError` when the
        database cannot be used, :class:`DatabaseUnavailable` when it cannot be
        reached now.
        """

    def insert(self, rows: Sequence[Row]) -> int:
        """Insert ``rows`` in one transaction; return how many were new (not already stored)."""

    def close(self) -> None:
        """Close the connection, if any. Never raises."""

    @property
    def connection(self) -> Any:
        """The driver's connection (for ``UsageStore.call_on_connection``); RuntimeError if none."""


def is_database_url(database: str | os.PathLike[str]) -> bool:
    """True when ``database`` is a PostgreSQL URL rather than a SQLite file."""
    return str(database).startswith(URL_SCHEMES)
