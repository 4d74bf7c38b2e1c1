"""The usage database's rows, with no I/O: schema, row mapping, spill lines.

Nothing here names a field. Columns, their types, their order and their
conversions all come from :data:`trio_gateway._core.record.FIELDS`; this
module adds what only the database knows: the table's name, its key
(``request_id``, which makes a second insert of a record a no-op), its
indexes and the schema version. The same table is written in two SQL
dialects: SQLite's (:data:`SCHEMA`, :data:`INSERT`) and PostgreSQL's
(:data:`POSTGRES_SCHEMA` and the statements after it), whose column types
come from :data:`POSTGRES_TYPES`, the one place that maps SQLite's types to
PostgreSQL's. Each schema version is a prefix of the field list
(:data:`FIELDS_IN_VERSION`), so the statements that create a version, and
those that bring an older database up to date, are derived too. It imports
no database driver: the databases themselves are
:mod:`~trio_gateway._accounting.sqlite_store` and
:mod:`~trio_gateway._accounting.postgres_store`, the spill files
:mod:`~trio_gateway._accounting.spill`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from trio_gateway._core.record import (
    FIELDS,
    RequestRecord,
    SQLValue,
    Usage,
    column_readers,
    read_fields,
)

__all__ = [
    "COLUMNS",
    "FIELDS_IN_VERSION",
    "INSERT",
    "POSTGRES_COPY",
    "POSTGRES_INCOMING",
    "POSTGRES_INSERT",
    "POSTGRES_SCHEMA",
    "POSTGRES_TYPES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Row",
    "migration_statements",
    "record_from_row",
    "record_to_row",
    "row_from_spill_line",
    "schema_statements",
    "schema_text",
    "spill_line",
]

Row = tuple[SQLValue, ...]

#: The schema versions, and how many of :data:`~trio_gateway._core.record.FIELDS`
#: each has. Version 1 is the first 23 fields (up to ``error_type``); each later
#: version appends fields, which must allow NULL, so that a database of an
#: earlier version gains them by ``ALTER TABLE ... ADD COLUMN`` (old rows hold
#: NULL). A field appended to FIELDS needs a new version here
#: (``tests/test_usage_store.py::test_every_field_is_in_the_current_schema_version``).
FIELDS_IN_VERSION: Final[Mapping[int, int]] = {1: 23, 2: 25}

#: The current version; a database with a higher one is refused.
SCHEMA_VERSION: Final = max(FIELDS_IN_VERSION)

#: The ``requests`` columns in insert order, and the keys of a spill line.
COLUMNS: Final = tuple(f.name for f in FIELDS)
_COLUMN_READERS: Final = column_readers(FIELDS)

TABLE: Final = "requests"
#: The column that tells records apart: UNIQUE, and the conflict target of INSERT.
KEY: Final = "request_id"
#: What ``trio-gateway usage`` and ad hoc queries filter and group by.
INDEXED: Final = ("started_wall", "key_name", "public_model")

_NOTE_COLUMN = 40  # where a column's "-- note" starts in the schema text
_SQLITE_TYPES: Final = {"INTEGER": "INTEGER", "REAL": "REAL", "TEXT": "TEXT"}
#: Each codec's SQLite type, as PostgreSQL spells it: the one place they are mapped.
#: A Python int is 64 bits in SQLite; BIGINT keeps that. NOT NULL and UNIQUE are kept.
POSTGRES_TYPES: Final = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "TEXT": "TEXT"}
_ID_COLUMN: Final = {
    "sqlite": "INTEGER PRIMARY KEY",
    "postgres": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}


def _types(dialect: str) -> Mapping[str, str]:
    return POSTGRES_TYPES if dialect == "postgres" else _SQLITE_TYPES


def schema_statements(dialect: str, version: int = SCHEMA_VERSION) -> tuple[str, ...]:
    """The statements that create ``version`` of the table and its indexes, in ``dialect``
    (``"sqlite"`` or ``"postgres"``).

    ``CREATE TABLE`` lays the columns out one a line, each note as a ``--``
    comment; the statements hold no ``;``, which a note may hold.
    """
    types = _types(dialect)
    fields = FIELDS[: FIELDS_IN_VERSION[version]]
    lines = [f"    id {_ID_COLUMN[dialect]},"]
    for i, f in enumerate(fields):
        sql = types[f.codec.sql_type] + (" NOT NULL" if f.not_null else "")
        line = f"    {f.name} {sql}{' UNIQUE' if f.name == KEY else ''}"
        line += "," if i < len(fields) - 1 else ""
        if f.note:
            line = f"{line.ljust(_NOTE_COLUMN - 1)} -- {f.note}"
        lines.append(line)
    table = f"CREATE TABLE {TABLE} (\n" + "\n".join(lines) + "\n)"
    indexes = tuple(f"CREATE INDEX {TABLE}_{name} ON {TABLE} ({name})" for name in INDEXED)
    return (table, *indexes)


def migration_statements(dialect: str, version: int) -> tuple[str, ...]:
    """The statements that bring a database of ``version`` to :data:`SCHEMA_VERSION`."""
    types = _types(dialect)
    return tuple(
        f"ALTER TABLE {TABLE} ADD COLUMN {f.name} {types[f.codec.sql_type]}"
        for f in FIELDS[FIELDS_IN_VERSION[version] : FIELDS_IN_VERSION[SCHEMA_VERSION]]
    )


def schema_text(dialect: str, version: int = SCHEMA_VERSION) -> str:
    """:func:`schema_statements` as one text, each statement ended by ``;`` and a newline.

    For SQLite's version 1, byte for byte the text that version-1 databases
    were made with (``tests/test_usage_store.py::test_schema_version_1_is_frozen``).
    """
    return "\n" + "".join(f"{statement};\n" for statement in schema_statements(dialect, version))


#: The current ``CREATE TABLE`` and ``CREATE INDEX`` statements, as one text.
SCHEMA: Final = schema_text("sqlite")

#: Insert one row (in COLUMNS order); a record already stored is left as it is.
INSERT: Final = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    f" ON CONFLICT ({KEY}) DO NOTHING"
)

# --- PostgreSQL ---------------------------------------------------------------------

#: The same table and indexes in PostgreSQL, as one text.
POSTGRES_SCHEMA: Final = schema_text("postgres")

_INCOMING: Final = f"{TABLE}_incoming"
_COLUMN_LIST: Final = ", ".join(COLUMNS)

#: A session's own table that a batch is copied into before it is inserted: the
#: columns without constraints (the insert checks them), emptied at each commit.
POSTGRES_INCOMING: Final = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_INCOMING} ("
    + ", ".join(f"{f.name} {POSTGRES_TYPES[f.codec.sql_type]}" for f in FIELDS)
    + ") ON COMMIT DELETE ROWS"
)

#: COPY rows (in COLUMNS order) into the incoming table.
POSTGRES_COPY: Final = f"COPY {_INCOMING} ({_COLUMN_LIST}) FROM STDIN"

#: Move the incoming rows into the table; a record already stored is left as it is.
POSTGRES_INSERT: Final = (
    f"INSERT INTO {TABLE} ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_INCOMING}"
    f" ON CONFLICT ({KEY}) DO NOTHING"
)


def record_to_row(record: RequestRecord) -> Row:
    """The ``requests`` row for ``record``, in :data:`COLUMNS` order.

    Clock times become durations from the start (the Trio clock means nothing
    outside this process); booleans become 0 or 1; a Kind its label and a
    FailureType its value. Nothing is checked here: a bad value is for the
    database to refuse.
    """
    return tuple(read_fields(record, _COLUMN_READERS))


def record_from_row(row: Sequence[Any] | Mapping[str, Any]) -> RequestRecord:
    """The record a row stands for (a tuple in :data:`COLUMNS` order, or a mapping).

    The database keeps durations, so the record read back has ``started_at``
    0.0 and its other clock times relative to it: its ``duration``,
    ``time_to_headers`` and ``time_to_first_token`` equal the original's.
    Raises ValueError for a kind or failure type this version does not know.
    """
    values = dict(row) if isinstance(row, Mapping) else dict(zip(COLUMNS, row, strict=True))
    attributes: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    for f in FIELDS:
        (figures if f.usage else attributes)[f.attribute] = f.from_column(values[f.name])
    return RequestRecord(started_at=0.0, usage=Usage(**figures), **attributes)


def spill_line(row: Row) -> bytes:
    """One line of the spill file: a JSON object keyed by :data:`COLUMNS`, and a newline.

    TypeError if a value cannot be JSON (an int too large, say).
    """
    return orjson.dumps(dict(zip(COLUMNS, row, strict=True))) + b"\n"


def row_from_spill_line(line: bytes) -> Row:
    """Parse one spill line (without its newline); ValueError or KeyError if it is not one.

    Every value must be a string, a number, a boolean (stored as 0 or 1) or
    null: a list or an object would be stored as text by one database and
    refused by another.
    """
    values = orjson.loads(line)
    if not isinstance(values, dict):
        raise ValueError("not a JSON object")
    # A line spilled by an earlier version lacks the columns added since: NULL, as ALTER gives.
    for name in COLUMNS[FIELDS_IN_VERSION[1] :]:
        values.setdefault(name, None)
    row = tuple(values[name] for name in COLUMNS)
    for value in row:
        if value is not None and not isinstance(value, str | int | float):
            raise ValueError(f"not a column value: {value!r}")
    return tuple(int(value) if isinstance(value, bool) else value for value in row)
