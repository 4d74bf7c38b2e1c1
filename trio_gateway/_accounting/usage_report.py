"""``trio-gateway usage``: who used what, from the usage database. No Trio.

:func:`usage_report` reads the ``requests`` table that
:class:`~trio_gateway._accounting.usage_store.UsageStore` writes, in a SQLite
file or in PostgreSQL (``--database postgresql://...``). Reading is the only
part that knows the database: one small function per database
(:func:`_sqlite_rows`, :func:`_postgres_rows`) yields the same seven columns
of the requests that started in the window, and everything after it is
shared and pure, so both databases give the same report from the same
records. Both read without writing: SQLite opens the file read-only (safe
next to a live gateway: WAL mode lets readers and the writer work at the
same time), PostgreSQL sets the session read-only. The requests are
grouped by client key or by public model. Percentiles are computed here in
Python (nearest rank), not in SQL, and costs are summed with
:func:`math.fsum`, so no figure depends on the order the rows come in.
Formatting is kept apart and is pure: :func:`format_table` for a person,
:func:`format_json` for scripts.

An *error* is a request that ended with an ``error_type`` (a failure, or a
client that left) or whose HTTP status was 400 or more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trio_gateway._accounting.usage_db import is_database_url
from trio_gateway._accounting.usage_rows import SCHEMA_VERSION

__all__ = [
    "By",
    "ReportError",
    "UsageRow",
    "add_usage_arguments",
    "format_json",
    "format_table",
    "main_usage",
    "parse_since",
    "percentile",
    "usage_report",
]

By = Literal["key", "model"]
_GROUP_COLUMN: dict[str, str] = {"key": "key_name", "model": "public_model"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
#: What each reader yields per request: the group's name, status, error_type,
#: input_tokens, output_tokens, cost and duration.
_Source = tuple[str, int | None, str | None, int | None, int | None, float | None, float | None]
_SOURCE_COLUMNS = "status, error_type, input_tokens, output_tokens, cost, duration"


class ReportError(Exception):
    """The report cannot be made (no database, not a usage database, ...)."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of requests. Durations are in seconds; None means no figure."""

    name: str  # the key name or the public model
    requests: int
    errors: int
    input_tokens: int  # requests that reported no count add nothing
    output_tokens: int
    cost: float | None  # None: no request in the group reported a cost
    p50_duration: float | None  # None: no request in the group has a duration
    p95_duration: float | None


def parse_since(text: str) -> float:
    """Seconds in ``"90s"``, ``"30m"``, ``"24h"`` or ``"7d"``; ValueError with the reason."""
    match = _SINCE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"expected a number and a unit (s, m, h or d), like 24h or 30m; got {text!r}"
        )
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds <= 0:
        raise ValueError(f"the period must be longer than zero; got {text!r}")
    return seconds


def percentile(ordered: Sequence[float], p: int) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of a sorted, non-empty list."""
    if not ordered or not 0 < p <= 100:
        raise ValueError("percentile needs values and 0 < p <= 100")
    rank = -(-p * len(ordered) // 100)  # ceil(p/100 * n), in integers
    return ordered[rank - 1]


@dataclass(slots=True)
class _Group:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    costs: list[float] | None = None
    durations: list[float] | None = None


def usage_report(
    database: str | os.PathLike[str],
    since_seconds: float,
    by: By,
    now: float,
    *,
    schema: str | None = None,
) -> list[UsageRow]:
    """Requests that started in the last ``since_seconds`` before ``now`` (unix time), grouped.

    ``database`` is a SQLite file or a ``postgresql://`` URL (``schema``: the
    schema its tables are in, PostgreSQL only). Rows come most requests
    first, then by name. Raises :class:`ReportError` if the database is
    missing, cannot be read, or is not a usage database this code can read.
    """
    column = _GROUP_COLUMN.get(by)
    if column is None:
        raise ValueError(f"by must be 'key' or 'model', got {by!r}")
    since = now - since_seconds
    if is_database_url(database):
        source = _postgres_rows(str(database), schema, column, since)
    elif schema is not None:
        raise ReportError("--schema is only for a PostgreSQL database (postgresql://...)")
    else:
        source = _sqlite_rows(Path(database), column, since)
    groups = _group(source)
    rows = [
        UsageRow(
            name=name,
            requests=group.requests,
            errors=group.errors,
            input_tokens=group.input_tokens,
            output_tokens=group.output_tokens,
            cost=None if group.costs is None else math.fsum(group.costs),
            p50_duration=_percentile_or_none(group.durations, 50),
            p95_duration=_percentile_or_none(group.durations, 95),
        )
        for name, group in groups.items()
    ]
    rows.sort(key=lambda row: (-row.requests, row.name))
    return rows


# --- reading: one function per database ---------------------------------------------


def _sqlite_rows(path: Path, column: str, since: float) -> Iterator[_Source]:
    """The window's requests from a SQLite file, opened read-only."""
    if not path.is_file():
        raise ReportError(f"no usage database at {path}")
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as conn:
            _check_version(conn.execute("PRAGMA user_version").fetchone()[0], str(path))
            yield from conn.execute(
                f"SELECT {column}, {_SOURCE_COLUMNS} FROM requests WHERE started_wall >= ?",
                (since,),
            )
    except sqlite3.Error as exc:
        raise ReportError(f"{path}: cannot read the usage database: {exc}") from exc


def _postgres_rows(url: str, schema: str | None, column: str, since: float) -> Iterator[_Source]:
    """The window's requests from PostgreSQL, in a read-only session, streamed."""
    # Imported only here: a report on a SQLite file never loads the PostgreSQL driver.
    import psycopg

    from trio_gateway._accounting.postgres_store import connect, describe, schema_version

    try:
        where = describe(url, schema)
    except ValueError as exc:
        raise ReportError(f"--database: {exc}") from None
    try:
        with connect(url, schema) as conn:
            conn.execute("SET default_transaction_read_only = on")
            _check_version(schema_version(conn) or 0, where)
            yield from conn.cursor().stream(
                f"SELECT {column}, {_SOURCE_COLUMNS} FROM requests WHERE started_wall >= %s",
                (since,),
            )
    except psycopg.Error as exc:
        message = " ".join(str(exc).split())
        raise ReportError(f"{where}: cannot read the usage database: {message}") from exc


def _check_version(version: int, where: str) -> None:
    if version == 0:
        raise ReportError(f"{where} is not a trio-gateway usage database")
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"{where} has schema version {version}, newer than this trio-gateway knows"
            f" ({SCHEMA_VERSION}); upgrade trio-gateway"
        )


# --- grouping (pure) ------------------------------------------------------------------


def _group(source: Iterable[_Source]) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    for name, status, error_type, input_tokens, output_tokens, cost, duration in source:
        group = groups.setdefault(name, _Group())
        group.requests += 1
        if error_type is not None or (status is not None and status >= 400):
            group.errors += 1
        group.input_tokens += input_tokens or 0
        group.output_tokens += output_tokens or 0
        if cost is not None:
            if group.costs is None:
                group.costs = []
            group.costs.append(cost)
        if duration is not None:
            if group.durations is None:
                group.durations = []
            group.durations.append(duration)
    return groups


def _percentile_or_none(values: list[float] | None, p: int) -> float | None:
    return None if values is None else percentile(sorted(values), p)


# --- formatting (pure) ------------------------------------------------------------


def _cost(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(rows: Sequence[UsageRow], *, by: By = "key") -> str:
    """The rows as an aligned table with a totals line; no trailing newline.

    Totals add up requests, errors, tokens and cost; percentiles do not add
    up, so the totals line leaves them blank.
    """
    if not rows:
        return "no requests in this period"
    header = [by, "requests", "errors", "input tokens", "output tokens", "cost", "p50 s", "p95 s"]
    body = [
        [
            row.name,
            f"{row.requests:,}",
            f"{row.errors:,}",
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            _cost(row.cost),
            _seconds(row.p50_duration),
            _seconds(row.p95_duration),
        ]
        for row in rows
    ]
    costs = [row.cost for row in rows if row.cost is not None]
    total = [
        "total",
        f"{sum(row.requests for row in rows):,}",
        f"{sum(row.errors for row in rows):,}",
        f"{sum(row.input_tokens for row in rows):,}",
        f"{sum(row.output_tokens for row in rows):,}",
        _cost(math.fsum(costs) if costs else None),
        "",
        "",
    ]
    widths = [max(len(line[i]) for line in [header, *body, total]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *map(render, body), rule, render(total)])


def format_json(rows: Sequence[UsageRow], *, by: By = "key") -> str:
    """The rows as a JSON array of objects; the group's field is named ``by``."""
    return json.dumps(
        [
            {
                by: row.name,
                "requests": row.requests,
                "errors": row.errors,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "cost": row.cost,
                "p50_duration": row.p50_duration,
                "p95_duration": row.p95_duration,
            }
            for row in rows
        ],
        indent=2,
    )


# --- the command --------------------------------------------------------------------


def _since_argument(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_usage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``usage`` command's options to ``parser``."""
    parser.add_argument(
        "--since",
        type=_since_argument,
        default="24h",
        metavar="PERIOD",
        help="how far back: a number and s, m, h or d (default %(default)s)",
    )
    parser.add_argument(
        "--by",
        choices=("key", "model"),
        default="key",
        help="group by client key or by public model (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--database",
        default="usage.db",
        metavar="PATH_OR_URL",
        help="the usage database: a SQLite file or a postgresql:// URL (default %(default)s)",
    )
    parser.add_argument(
        "--schema",
        metavar="NAME",
        help="PostgreSQL only: the schema of the tables ([accounting] schema)",
    )


def main_usage(args: argparse.Namespace, *, now: float | None = None) -> int:
    """Run ``usage`` with options from :func:`add_usage_arguments`; return the exit status.

    Prints the report to stdout. A database that cannot be read is one line
    on stderr and status 2.
    """
    try:
        rows = usage_report(
            args.database,
            args.since,
            args.by,
            time.time() if now is None else now,
            schema=args.schema,
        )
    except ReportError as exc:
        print(f"trio-gateway: usage: {exc}", file=sys.stderr)
        return 2
    print(format_json(rows, by=args.by) if args.json else format_table(rows, by=args.by))
    return 0
