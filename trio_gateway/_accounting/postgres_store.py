"""The usage database in PostgreSQL: blocking psycopg 3, run on the usage store's database thread.

Implements :class:`~trio_gateway._accounting.usage_db.UsageDatabase` (read its
contract first); ``[accounting] database = "postgresql://..."`` selects it.
The Trio side (queue, writer task, batches, spill files) is the same
:class:`~trio_gateway._accounting.usage_store.UsageStore` as for SQLite; only
the database thread's work differs.

1. **One connection, on the store's thread,** in autocommit mode: each batch
   opens its own transaction. The connection is made by :meth:`PostgresDatabase.open`
   with short network bounds unless the URL sets its own (``connect_timeout``
   10 s, TCP keepalives, ``tcp_user_timeout`` 15 s), so a server that vanishes
   holds the thread for seconds, not for the kernel's TCP timeout.
2. **A batch is COPY, then one INSERT.** The rows are copied into a
   temporary table of the session (:data:`~trio_gateway._accounting.usage_rows.POSTGRES_INCOMING`,
   emptied at each commit), then moved with ``INSERT ... SELECT ... ON CONFLICT
   (request_id) DO NOTHING``, in one transaction. A batch sent twice is
   stored once; the INSERT's row count says how many rows were new.
3. **The schema is created on first start,** in one transaction that holds
   an advisory lock, so two gateways that start together on an empty
   database create it once. Its version is a row of ``trio_gateway_schema``
   (``name = 'requests'``); an older one is brought up to date in the same
   transaction. A newer version, or a ``requests`` table without that row, is
   a :class:`~trio_gateway._accounting.usage_db.SchemaError`.
   The column types come from :data:`~trio_gateway._accounting.usage_rows.POSTGRES_TYPES`.
4. **The schema name** (``[accounting] schema``) is set as the session's
   ``search_path`` and created if missing; without one, the server's
   ``search_path`` decides (usually ``public``).
5. **Errors, sorted** (the contract's rule 3): a failed connect, or any error
   after which the connection is broken, is
   :class:`~trio_gateway._accounting.usage_db.DatabaseUnavailable` (the
   connection is dropped; the next :meth:`~PostgresDatabase.open`
   reconnects). ``IntegrityError`` and ``DataError`` are refused rows. Any
   other error at start is a :class:`~trio_gateway._accounting.usage_db.UsageDatabaseError`.
6. **The password stays in the URL.** :attr:`PostgresDatabase.where` and
   every message name ``postgresql://USER@HOST:PORT/DB``. Records hold key
   names, never keys (:data:`~trio_gateway._core.record.FIELDS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from trio_gateway._accounting.usage_db import DatabaseUnavailable, SchemaError, UsageDatabaseError
from trio_gateway._accounting.usage_rows import (
    POSTGRES_COPY,
    POSTGRES_INCOMING,
    POSTGRES_INSERT,
    SCHEMA_VERSION,
    TABLE,
    Row,
    migration_statements,
    schema_statements,
)

__all__ = [
    "VERSION_TABLE",
    "PostgresDatabase",
    "connect",
    "describe",
    "schema_version",
]

#: The table that holds the schema version: one row per trio-gateway table.
VERSION_TABLE: Final = "trio_gateway_schema"
#: Network bounds libpq gets unless the URL sets them (libpq's own default is no bound).
CONNECT_DEFAULTS: Final[Mapping[str, str | int]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: sent data unacknowledged this long breaks the connection
    "application_name": "trio-gateway",
}
# Taken by the transaction that creates the schema; any constant shared by every version.
_MIGRATION_LOCK: Final = 0x7472_696F_6761_7465  # "triogate"
_REFUSED = (psycopg.IntegrityError, psycopg.DataError)


def describe(url: str, schema: str | None = None) -> str:
    """``url`` without its password (and any other parameter), for messages.

    ValueError (which names no part of the URL) if libpq cannot parse it.
    """
    params = _parse(url)
    user = f"{params['user']}@" if params.get("user") else ""
    host = str(params.get("host") or "")
    if ":" in host and "," not in host and not host.startswith("/"):
        host = f"[{host}]"  # an IPv6 address
    port = f":{params['port']}" if params.get("port") else ""
    text = f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"
    return text if schema is None else f"{text} (schema {schema})"


def _parse(url: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise ValueError("not a PostgreSQL URL libpq can read") from None


def connect(url: str, schema: str | None = None, **options: Any) -> psycopg.Connection[Any]:
    """A new autocommit connection to ``url``, with :data:`CONNECT_DEFAULTS` the URL leaves
    unset, and ``search_path`` set to ``schema`` when one is given. Blocking.

    ``psycopg.OperationalError`` if the server cannot be reached.
    """
    params = _parse(url)
    extra = {key: value for key, value in CONNECT_DEFAULTS.items() if key not in params}
    conn = psycopg.connect(url, autocommit=True, **{**extra, **options})
    try:
        if schema is not None:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    except BaseException:
        conn.close()
        raise
    return conn


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The schema version the version table records, 0 if it has none; None: no such table."""
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    if not found or not found[0]:
        return None
    row = conn.execute(
        sql.SQL("SELECT version FROM {} WHERE name = %s").format(sql.Identifier(VERSION_TABLE)),
        (TABLE,),
    ).fetchone()
    return 0 if row is None else int(row[0])


def _migrate(conn: psycopg.Connection[Any], schema: str | None, where: str) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, in one transaction under the advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        if schema is not None:
            exists = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        version = schema_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaError(
                f"{where}: the usage database has schema version {version}, newer than this"
                f" trio-gateway knows ({SCHEMA_VERSION}); upgrade trio-gateway or point"
                " [accounting] database at another database or schema"
            )
        if version == SCHEMA_VERSION:
            return
        versions = sql.Identifier(VERSION_TABLE)
        if version is None:
            found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
            if found and found[0]:
                raise SchemaError(
                    f"{where}: has a '{TABLE}' table but no {VERSION_TABLE} table:"
                    " not a trio-gateway usage database"
                )
            conn.execute(
                sql.SQL("CREATE TABLE {} (name TEXT PRIMARY KEY, version INTEGER NOT NULL)").format(
                    versions
                )
            )
            for statement in schema_statements("postgres"):
                conn.execute(statement)
            conn.execute(
                sql.SQL("INSERT INTO {} (name, version) VALUES (%s, %s)").format(versions),
                (TABLE, SCHEMA_VERSION),
            )
            return
        if version == 0:
            raise SchemaError(
                f"{where}: {VERSION_TABLE} has no version for '{TABLE}':"
                " not a trio-gateway usage database"
            )
        for statement in migration_statements("postgres", version):
            conn.execute(statement)
        conn.execute(
            sql.SQL("UPDATE {} SET version = %s WHERE name = %s").format(versions),
            (SCHEMA_VERSION, TABLE),
        )


def _spill_name(url: str, schema: str | None) -> str:
    """The spill files' name for this database: readable, and distinct per server,
    database, user and schema, so two databases never share spill files."""
    params = _parse(url)
    target = "\0".join(
        str(params.get(key) or "") for key in ("host", "hostaddr", "port", "dbname", "user")
    )
    digest = hashlib.sha256(f"{target}\0{schema or ''}".encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(params.get("dbname") or "postgres"))[:40]
    return f"usage-postgres-{name}-{digest}"


class PostgresDatabase:
    """A usage database in PostgreSQL at ``url``; see the module docstring.

    ``schema``: the schema its tables live in (created if missing), or None
    for the server's ``search_path``. The spill files are
    ``usage-postgres-<dbname>-<hash>.spill.<pid>.jsonl`` in ``spill_dir``.
    ValueError (naming no part of the URL) if libpq cannot parse ``url``.
    """

    refused: tuple[type[Exception], ...] = _REFUSED
    errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def __init__(self, url: str, *, schema: str | None = None, spill_dir: Path) -> None:
        self.url = url
        self.schema = schema
        self.where = describe(url, schema)
        self.spill_base: Path | None = spill_dir / _spill_name(url, schema)
        self._conn: psycopg.Connection[Any] | None = None

    def open(self) -> None:
        """Connect (again), create or check the schema, and make the session's COPY table."""
        self.close()
        try:
            conn = connect(self.url, self.schema)
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"{self.where}: cannot connect: {_one_line(exc)}") from exc
        try:
            _migrate(conn, self.schema, self.where)  # at every connect: the version may change
            conn.execute(POSTGRES_INCOMING)
        except SchemaError:
            conn.close()
            raise
        except psycopg.Error as exc:
            lost = conn.broken or isinstance(exc, psycopg.OperationalError)
            conn.close()
            if lost:
                raise DatabaseUnavailable(f"{self.where}: {_one_line(exc)}") from exc
            raise UsageDatabaseError(f"{self.where}: {_one_line(exc)}") from exc
        self._conn = conn

    def insert(self, rows: Sequence[Row]) -> int:
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable(f"{self.where}: not connected")
        try:
            with conn.transaction(), conn.cursor() as cursor:
                with cursor.copy(POSTGRES_COPY) as copy:
                    for row in rows:
                        copy.write_row(row)
                cursor.execute(POSTGRES_INSERT)
                return cursor.rowcount
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self.close()
                raise DatabaseUnavailable(
                    f"{self.where}: the connection was lost: {_one_line(exc)}"
                ) from exc
            raise

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    @property
    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("the usage database is not open")
        return self._conn


def _one_line(exc: BaseException) -> str:
    """libpq's message on one line (it writes hints on lines of their own)."""
    return " ".join(str(exc).split())
