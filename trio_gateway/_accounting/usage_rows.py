"""The usage database's rows, with no I/O: schema, row mapping, spill lines.

Nothing here names a field. Columns, their types, their order and their
conversions all come from :data:`trio_gateway._core.record.FIELDS`; this
module adds what only the database knows: the table's name, its key
(``request_id``, which makes a second insert of a record a no-op), its
indexes and the schema version. It imports no sqlite3: the database itself
is :mod:`trio_gateway._accounting.usage_store`, the spill file
:mod:`trio_gateway._accounting.spill`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from trio_gateway._core.record import FIELDS, RequestRecord, SQLValue, Usage

__all__ = [
    "COLUMNS",
    "INSERT",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Row",
    "record_from_row",
    "record_to_row",
    "row_from_spill_line",
    "spill_line",
]

Row = tuple[SQLValue, ...]

#: Bumped whenever the schema changes; a database with a higher version is refused.
SCHEMA_VERSION: Final = 1

#: The ``requests`` columns in insert order, and the keys of a spill line.
COLUMNS: Final = tuple(f.name for f in FIELDS)

TABLE: Final = "requests"
#: The column that tells records apart: UNIQUE, and the conflict target of INSERT.
KEY: Final = "request_id"
#: What ``trio-gateway usage`` and ad hoc queries filter and group by.
INDEXED: Final = ("started_wall", "key_name", "public_model")

_NOTE_COLUMN = 40  # where a column's "-- note" starts in the schema text


def _schema() -> str:
    """The version-1 schema text, statements separated by ``;``.

    Byte for byte what version-1 databases hold in ``sqlite_master``
    (``tests/test_usage_store.py::test_schema_version_1_is_frozen``).
    """
    lines = ["    id INTEGER PRIMARY KEY,"]
    for i, f in enumerate(FIELDS):
        line = f"    {f.name} {f.sql}{' UNIQUE' if f.name == KEY else ''}"
        line += "," if i < len(FIELDS) - 1 else ""
        if f.note:
            line = f"{line.ljust(_NOTE_COLUMN)}-- {f.note}"
        lines.append(line)
    indexes = "".join(f"CREATE INDEX {TABLE}_{name} ON {TABLE} ({name});\n" for name in INDEXED)
    return f"\nCREATE TABLE {TABLE} (\n" + "\n".join(lines) + "\n);\n" + indexes


#: The ``CREATE TABLE`` and ``CREATE INDEX`` statements, separated by ``;``.
SCHEMA: Final = _schema()

#: Insert one row (in COLUMNS order); a record already stored is left as it is.
INSERT: Final = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    f" ON CONFLICT ({KEY}) DO NOTHING"
)


def record_to_row(record: RequestRecord) -> Row:
    """The ``requests`` row for ``record``, in :data:`COLUMNS` order.

    Clock times become durations from the start (the Trio clock means nothing
    outside this process); booleans become 0 or 1; a Kind its label and a
    FailureType its value. Nothing is checked here: a bad value is for the
    database to refuse.
    """
    return tuple(f.column(record) for f in FIELDS)


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
    """Parse one spill line (without its newline); ValueError or KeyError if it is not one."""
    values = orjson.loads(line)
    if not isinstance(values, dict):
        raise ValueError("not a JSON object")
    return tuple(values[name] for name in COLUMNS)
