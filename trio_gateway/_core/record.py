"""What one request leaves behind for accounting: the usage record, and its field list. No I/O.

A :class:`RequestRecord` is created when a request is routed, filled in as
the exchange goes (the rewriter's extractor adds usage from the events it
already parses), and finished exactly once however the request ends. The
accounting sinks (the usage database, metrics, the request log) only ever
see finished records.

One field list
==============

Everything that affects which fields are stored and logged, and how, lives
in this file (h11's "one module, one rule"):

1. :data:`FIELDS` declares, once, every field that leaves the process: its
   name, its :class:`Codec` (the SQL type, how the value becomes a column,
   how a column becomes the value again, how it is logged), whether it may
   be NULL, and its log key. The usage database's schema, ``COLUMNS``, the
   insert statement, the row mapping and the spill-line keys
   (:mod:`trio_gateway._accounting.usage_rows`) and the request log's keys
   and values (:mod:`trio_gateway._accounting.json_log`) are all derived
   from it; none of them names a field.
2. A field's name is at once the column, the spill-line key and the record
   attribute (or property) it is read from; ``usage=True`` reads it from
   :attr:`RequestRecord.usage`. Times on the Trio clock mean nothing outside
   this process, so a time is stored as a duration from the start (the
   ``time_to_*`` and ``duration`` properties) and read back into the clock
   attribute named by ``restore``, with ``started_at`` 0.0.
3. Every attribute of :class:`RequestRecord` and :class:`Usage` is either
   declared in :data:`FIELDS` or named in :data:`UNSTORED`, and
   ``tests/test_usage_store.py::test_one_field_list_drives_the_schema_the_rows_and_the_log``
   holds that true: a field added to the record is stored and logged by
   nobody until it is declared here. That is also the request log's
   allowlist: a record carries no key and no text, and whatever else it
   might carry is not in the list.
4. The usage database's schema version 1 is this list in this order, up to
   ``error_type``; version 2 appended ``attempts`` and ``failed_attempts``.
   Changing a name, a type, the order or the nullability changes the schema:
   it needs a new ``SCHEMA_VERSION`` and a migration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from trio_gateway._core.kinds import FailureType, Kind

__all__ = [
    "FIELDS",
    "MAX_UPSTREAM_TEXT",
    "UNSTORED",
    "Codec",
    "Field",
    "FieldReader",
    "RecordSink",
    "RequestRecord",
    "SQLValue",
    "Usage",
    "column_readers",
    "log_readers",
    "read_fields",
]

#: A value as SQLite stores it.
SQLValue = str | int | float | None

#: Strings that come from the upstream (its response id, the finish reason)
#: are logged cut to this many characters, so a hostile upstream cannot make
#: a log line huge. The database keeps them whole.
MAX_UPSTREAM_TEXT: Final = 256


@dataclass(slots=True)
class Usage:
    """Token counts and the upstream's cost, as the answer reported them (None: not reported)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from cache
    cache_write_tokens: int | None = None  # prompt tokens written to cache (Messages)
    reasoning_tokens: int | None = None
    cost: float | None = None  # the upstream's figure, taken before any stripping

    def merge(self, **figures: Any) -> None:
        """Set each given figure that is a number; bools and other types are ignored."""
        for name, value in figures.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            setattr(self, name, float(value) if name == "cost" else int(value))


@dataclass(slots=True)
class RequestRecord:
    """One request, as accounting sees it. Times are seconds on the Trio clock."""

    request_id: str
    kind: Kind
    key_name: str
    public_model: str
    upstream: str
    upstream_model: str
    streamed: bool
    started_at: float  # trio.current_time() when the request was routed
    started_wall: float  # time.time() at the same moment, for the database
    status: int | None = None  # the HTTP status the client got
    usage: Usage = field(default_factory=Usage)
    upstream_id: str | None = None  # the upstream's response id
    finish_reason: str | None = None
    headers_at: float | None = None  # upstream response headers arrived
    first_token_at: float | None = None  # first content token went to the client
    ended_at: float | None = None
    bytes_to_client: int = 0
    cancelled: bool = False  # the client disconnected before the end
    error_type: FailureType | None = None  # None for a clean end
    # Routing (docs/routing.md): upstream and upstream_model above name the
    # deployment that answered (or the last one tried).
    attempts: int = 1  # upstream attempts made (0: none could be, every deployment cooling)
    failed_attempts: str | None = None  # "upstream:error_type[:status];...", None: none failed

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def time_to_headers(self) -> float | None:
        return None if self.headers_at is None else self.headers_at - self.started_at

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at


class RecordSink(Protocol):
    """Where finished records go (the usage database, for one)."""

    async def submit(self, record: RequestRecord) -> None:
        """Take a finished record. A checkpoint; returns within a bounded time.

        The gateway calls it from a shielded, time-bounded scope, so it also
        runs for a request that is being cancelled.
        """


# --- how a value is stored and logged ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Codec:
    """How one kind of value is stored and logged.

    Each function converts a value that is not None; a function left None
    keeps the value as it is. None itself is NULL in the database and
    ``null`` in the log, whatever the codec.
    """

    sql_type: str  # "TEXT", "INTEGER" or "REAL"
    to_column: Callable[[Any], SQLValue] | None = None  # the attribute's value -> the column's
    from_column: Callable[[Any], Any] | None = None  # the column's value -> the attribute's
    to_log: Callable[[Any], Any] | None = None  # the attribute's value -> the log line's


def _plain_text(value: Any) -> Any:
    """A str (a StrEnum too) as a plain str; anything else unchanged, for the database to judge."""
    return str(value) if isinstance(value, str) else value


def _cut(value: str) -> str:
    """Cut to MAX_UPSTREAM_TEXT, with anything orjson refuses (lone surrogates) replaced."""
    return value[:MAX_UPSTREAM_TEXT].encode("utf-8", "replace").decode("utf-8")


def _ms(seconds: float) -> float:
    """Milliseconds, rounded to the microsecond."""
    return round(seconds * 1000.0, 3)


def _utc_iso(unix_time: float) -> str:
    """ISO 8601 in UTC, to the millisecond: ``2023-11-14T22:13:20.500Z``."""
    text = datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _label(kind: Kind) -> str:
    return kind.label


_KIND_BY_LABEL: Final = {kind.label: kind for kind in Kind}


def _kind_from_label(label: str) -> Kind:
    try:
        return _KIND_BY_LABEL[label]
    except KeyError:
        raise ValueError(f"not a kind label: {label!r}") from None


TEXT: Final = Codec("TEXT", to_column=_plain_text)
#: Text from the upstream: stored whole, logged cut to MAX_UPSTREAM_TEXT.
UPSTREAM_TEXT: Final = Codec("TEXT", to_column=_plain_text, to_log=_cut)
INTEGER: Final = Codec("INTEGER")
REAL: Final = Codec("REAL")
#: A bool: 0 or 1 in the database, true or false in the log.
FLAG: Final = Codec("INTEGER", to_column=int, from_column=bool)
#: Seconds since the start: seconds in the database, milliseconds in the log.
SECONDS: Final = Codec("REAL", to_log=_ms)
#: Unix time: a number in the database, ISO 8601 UTC in the log.
UNIX_TIME: Final = Codec("REAL", to_log=_utc_iso)
#: A Kind, by its label ("chat", "messages", ...).
KIND: Final = Codec("TEXT", to_column=_label, from_column=_kind_from_label, to_log=_label)
#: A FailureType, by its value ("client_disconnect", ...).
FAILURE: Final = Codec("TEXT", to_column=_plain_text, from_column=FailureType, to_log=_plain_text)


@dataclass(frozen=True, slots=True)
class Field:
    """One field that leaves the process: a column of the usage database, a key of the log.

    ``name`` is the column, the spill-line key and the attribute read from
    the record (from its :class:`Usage` when ``usage`` is true).
    ``restore`` names the attribute a column is read back into, when that
    is not ``name`` (a duration goes back into a clock time). The log line
    holds every field, under ``log_key`` (default: the name), in column
    order after those marked ``log_first``. ``note`` is the schema's comment
    on the column.
    """

    name: str
    codec: Codec
    not_null: bool = False
    usage: bool = False
    restore: str | None = None
    log_key: str | None = None  # None: the name
    log_first: bool = False  # the log line opens with it, ahead of the column order
    note: str = ""

    @property
    def attribute(self) -> str:
        """The attribute (of the record, or of its usage) a column is read back into."""
        return self.restore or self.name

    @property
    def key(self) -> str:
        """The key of the request log line."""
        return self.log_key or self.name

    @property
    def sql(self) -> str:
        """The column's type and nullability: ``TEXT NOT NULL``, ``REAL``, ..."""
        return self.codec.sql_type + (" NOT NULL" if self.not_null else "")

    def from_column(self, value: Any) -> Any:
        """The attribute value a column value stands for; ValueError if it can stand for none.

        The codec's rule, as in :func:`read_fields`: None stays None; no
        function keeps the value.
        """
        convert = self.codec.from_column
        return value if value is None or convert is None else convert(value)


#: How to read one field of a record: from its usage?, the attribute, the
#: codec's function (to_column or to_log) or None.
FieldReader = tuple[bool, str, Callable[[Any], Any] | None]


def column_readers(fields: tuple[Field, ...]) -> tuple[FieldReader, ...]:
    """The readers of ``fields``' column values, for :func:`read_fields`."""
    return tuple((f.usage, f.name, f.codec.to_column) for f in fields)


def log_readers(fields: tuple[Field, ...]) -> tuple[FieldReader, ...]:
    """The readers of ``fields``' values in the request log line, for :func:`read_fields`."""
    return tuple((f.usage, f.name, f.codec.to_log) for f in fields)


def read_fields(record: RequestRecord, readers: tuple[FieldReader, ...]) -> list[Any]:
    """Each field's value for ``record``, converted by its codec: None stays None; no
    function keeps the value.

    One loop for every field of a request (it runs twice per request, for
    its row and its log line), so the readers are made once, at import.
    """
    usage = record.usage
    values = []
    for in_usage, name, convert in readers:
        value = getattr(usage if in_usage else record, name)
        values.append(value if value is None or convert is None else convert(value))
    return values


#: Every stored and logged field, in column order; see the module docstring.
FIELDS: Final[tuple[Field, ...]] = (
    Field("request_id", TEXT, not_null=True),
    Field("kind", KIND, not_null=True),
    Field("key_name", TEXT, not_null=True),
    Field("public_model", TEXT, not_null=True),
    Field("upstream", TEXT, not_null=True),
    Field("upstream_model", TEXT, not_null=True),
    Field("streamed", FLAG, not_null=True, note="0 or 1"),
    Field(
        "started_wall", UNIX_TIME, not_null=True, log_key="time", log_first=True, note="unix time"
    ),
    Field("status", INTEGER, note="the HTTP status the client got"),
    Field("input_tokens", INTEGER, usage=True, note="NULL: not reported"),
    Field("output_tokens", INTEGER, usage=True),
    Field("cached_tokens", INTEGER, usage=True),
    Field("cache_write_tokens", INTEGER, usage=True),
    Field("reasoning_tokens", INTEGER, usage=True),
    Field("cost", REAL, usage=True, note="the upstream's figure"),
    Field("upstream_id", UPSTREAM_TEXT),
    Field("finish_reason", UPSTREAM_TEXT),
    Field(
        "time_to_headers",
        SECONDS,
        restore="headers_at",
        log_key="time_to_headers_ms",
        note="seconds from start",
    ),
    Field(
        "time_to_first_token",
        SECONDS,
        restore="first_token_at",
        log_key="time_to_first_token_ms",
    ),
    Field("duration", SECONDS, restore="ended_at", log_key="duration_ms"),
    Field("bytes_to_client", INTEGER, not_null=True),
    Field("cancelled", FLAG, not_null=True, note="0 or 1: the client left first"),
    Field("error_type", FAILURE, note="NULL for a clean end"),
    # Schema version 2: appended, so a version-1 database gains them by ALTER TABLE.
    Field("attempts", INTEGER, note="upstream attempts; NULL in rows from before version 2"),
    Field("failed_attempts", TEXT, note="upstream:error_type[:status] of each, ;-separated"),
)

#: Attributes of RequestRecord that no field is read back into: the start on
#: the Trio clock, which means nothing outside the process (read back, it is
#: 0.0), and ``usage``, whose figures are fields of their own (``usage=True``).
UNSTORED: Final = frozenset({"started_at", "usage"})
