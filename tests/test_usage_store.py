"""The usage database: rows, schema, batching, shutdown, and a database slower than the traffic.

Rules for this file, on top of ``conftest.py``:

* Databases are real SQLite files under ``tmp_path`` (or ``:memory:``).
* A slow database is a :class:`GatedStore`: its insert blocks on a
  ``threading.Event`` that the test opens. A thread blocked on it looks
  idle to Trio, so under ``autojump_clock`` time jumps to the next deadline
  (``submit_timeout``, ``drain_timeout``) exactly as if the disk were slow.
* Tests under ``autojump_clock`` set every deadline that is not under test to
  ``math.inf``: real database work happens on a thread, and time would jump
  past any deadline while it runs.
* A test that lets the store abandon a job joins the database thread before
  it ends, so no thread outlives its test.
* Every test that runs on the real clock (a real database thread) carries an
  absolute ``trio.fail_after(LIMIT)`` (``conftest.py`` rule 3).
* Several processes are real OS processes (:func:`run_store_processes`), each
  running :func:`store_process_main` with its own store. They wait on a
  barrier file, so they start their stores at the same moment.
* A process that is "no longer running" has a pid above the kernel's
  ``pid_max`` (:func:`dead_pids`): no process can have it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from trio_gateway._accounting import spill
from trio_gateway._accounting.json_log import LOG_FIELDS, format_record
from trio_gateway._accounting.usage_rows import (
    COLUMNS,
    FIELDS_IN_VERSION,
    INSERT,
    SCHEMA,
    SCHEMA_VERSION,
    Row,
    migration_statements,
    record_from_row,
    record_to_row,
    row_from_spill_line,
    schema_statements,
    schema_text,
    spill_line,
)
from trio_gateway._accounting.usage_store import SchemaError, UsageStore
from trio_gateway._core.kinds import FailureType, Kind
from trio_gateway._core.record import FIELDS, UNSTORED, RequestRecord, Usage

WALL = 1_700_000_000.25  # exactly representable, like every time below
LIMIT = 30  # seconds: the absolute bound of a real-clock test; a normal run takes well under 1


def make_record(request_id: str, **fields: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": request_id,
        "kind": Kind.CHAT,
        "key_name": "alice",
        "public_model": "gpt-fast",
        "upstream": "openrouter",
        "upstream_model": "openai/gpt-4o-mini",
        "streamed": True,
        "started_at": 100.0,
        "started_wall": WALL,
        "status": 200,
        "ended_at": 101.0,
    }
    base.update(fields)
    return RequestRecord(**base)


# One record per way a request can end. Clock times are sums of powers of two,
# so the durations the store computes are exact.
SHAPES: dict[str, RequestRecord] = {
    "completed": make_record(
        "req-completed",
        usage=Usage(
            input_tokens=12,
            output_tokens=34,
            cached_tokens=5,
            reasoning_tokens=7,
            cost=0.000123,
        ),
        upstream_id="gen-123",
        finish_reason="stop",
        headers_at=100.25,
        first_token_at=100.5,
        ended_at=101.75,
        bytes_to_client=2048,
    ),
    "cancelled_mid_stream": make_record(
        "req-cancelled",
        kind=Kind.MESSAGES,
        key_name="bob",
        public_model="claude-fast",
        upstream="anthropic",
        upstream_model="claude-3-5-haiku",
        started_wall=WALL + 1,
        usage=Usage(input_tokens=20, cached_tokens=0, cache_write_tokens=3),
        upstream_id="msg_01",
        headers_at=100.125,
        first_token_at=100.375,
        ended_at=102.5,
        bytes_to_client=512,
        cancelled=True,
        error_type=FailureType.CLIENT_DISCONNECT,
    ),
    "upstream_reset": make_record(
        "req-reset",
        kind=Kind.RESPONSES,
        headers_at=100.5,
        first_token_at=101.0,
        ended_at=103.0,
        bytes_to_client=300,
        error_type=FailureType.UPSTREAM_RESET,
    ),
    "upstream_timeout": make_record(
        "req-timeout",
        status=504,
        ended_at=220.0,
        bytes_to_client=120,
        error_type=FailureType.UPSTREAM_TIMEOUT,
    ),
    "idle_timeout": make_record(
        "req-idle",
        headers_at=100.5,
        first_token_at=100.75,
        ended_at=400.75,
        bytes_to_client=90,
        usage=Usage(input_tokens=3),
        error_type=FailureType.IDLE_TIMEOUT,
    ),
    "embeddings_no_cost": make_record(
        "req-embed",
        kind=Kind.EMBEDDINGS,
        streamed=False,
        usage=Usage(input_tokens=8),
        headers_at=100.0625,
        ended_at=100.125,
        bytes_to_client=4096,
    ),
    "never_ended": make_record("req-unended", status=None, ended_at=None),
}


def as_stored(record: RequestRecord) -> RequestRecord:
    """The record as the database gives it back: clock times relative to a start of 0."""
    return dataclasses.replace(
        record,
        started_at=0.0,
        headers_at=record.time_to_headers,
        first_token_at=record.time_to_first_token,
        ended_at=record.duration,
    )


class GatedStore(UsageStore):
    """A store whose inserts wait for ``gate`` (a slow disk) or fail (a broken one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # an insert has started
        self.batches: list[list[str]] = []  # request ids, per insert attempt
        self.failures: list[Exception] = []  # raised by the next inserts, in order

    def _write_batch(self, rows: Sequence[Row]) -> int:
        self.batches.append([str(row[0]) for row in rows])
        self.entered.set()
        if not self.gate.wait(timeout=10):  # a real bound, only so a broken test cannot hang
            raise RuntimeError("the test never opened the gate")
        if self.failures:
            raise self.failures.pop(0)
        return super()._write_batch(rows)


def read_rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id").fetchall()
    return [dict(row) for row in rows]


def stored_ids(path: Path) -> list[str]:
    return sorted(row["request_id"] for row in read_rows(path))


def spill_ids(store: UsageStore) -> list[str]:
    assert store.spill_path is not None
    if not store.spill_path.exists():
        return []
    return [orjson.loads(line)["request_id"] for line in store.spill_path.read_bytes().splitlines()]


def file_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def join_thread(store: UsageStore) -> None:
    assert store._thread is not None
    await trio.to_thread.run_sync(store._thread.join)


async def writing(store: UsageStore, nursery: trio.Nursery) -> None:
    await nursery.start(store.run)


# --- rows -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
def test_row_round_trip(shape: str):
    record = SHAPES[shape]
    row = record_to_row(record)
    assert len(row) == len(COLUMNS)
    assert record_from_row(row) == as_stored(record)
    assert record_from_row(dict(zip(COLUMNS, row, strict=True))) == as_stored(record)


def test_row_columns_are_flat_and_durations():
    row = dict(zip(COLUMNS, record_to_row(SHAPES["completed"]), strict=True))
    assert row == {
        "request_id": "req-completed",
        "kind": "chat",
        "key_name": "alice",
        "public_model": "gpt-fast",
        "upstream": "openrouter",
        "upstream_model": "openai/gpt-4o-mini",
        "streamed": 1,
        "started_wall": WALL,
        "status": 200,
        "input_tokens": 12,
        "output_tokens": 34,
        "cached_tokens": 5,
        "cache_write_tokens": None,
        "reasoning_tokens": 7,
        "cost": 0.000123,
        "upstream_id": "gen-123",
        "finish_reason": "stop",
        "time_to_headers": 0.25,
        "time_to_first_token": 0.5,
        "duration": 1.75,
        "bytes_to_client": 2048,
        "cancelled": 0,
        "error_type": None,
        "attempts": 1,
        "failed_attempts": None,
    }
    reset = dict(zip(COLUMNS, record_to_row(SHAPES["upstream_reset"]), strict=True))
    assert type(reset["error_type"]) is str  # the StrEnum's plain value


def test_rows_keep_text_and_give_enums_back():
    row = dict(zip(COLUMNS, record_to_row(SHAPES["cancelled_mid_stream"]), strict=True))
    assert (row["kind"], row["error_type"]) == ("messages", "client_disconnect")
    assert type(row["kind"]) is str
    back = record_from_row(row)
    assert back.kind is Kind.MESSAGES
    assert back.error_type is FailureType.CLIENT_DISCONNECT
    assert {record_from_row(record_to_row(record)).kind for record in SHAPES.values()} <= set(Kind)
    with pytest.raises(ValueError, match="not a kind label: 'chats'"):
        record_from_row({**row, "kind": "chats"})
    with pytest.raises(ValueError, match="'no_such_failure' is not a valid FailureType"):
        record_from_row({**row, "error_type": "no_such_failure"})


# Version 1 of the schema, as version-1 databases hold it: deriving it from
# FIELDS must not change one byte (a change needs a new SCHEMA_VERSION).
SCHEMA_V1 = """
CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    key_name TEXT NOT NULL,
    public_model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    streamed INTEGER NOT NULL,          -- 0 or 1
    started_wall REAL NOT NULL,         -- unix time
    status INTEGER,                     -- the HTTP status the client got
    input_tokens INTEGER,               -- NULL: not reported
    output_tokens INTEGER,
    cached_tokens INTEGER,
    cache_write_tokens INTEGER,
    reasoning_tokens INTEGER,
    cost REAL,                          -- the upstream's figure
    upstream_id TEXT,
    finish_reason TEXT,
    time_to_headers REAL,               -- seconds from start
    time_to_first_token REAL,
    duration REAL,
    bytes_to_client INTEGER NOT NULL,
    cancelled INTEGER NOT NULL,         -- 0 or 1: the client left first
    error_type TEXT                     -- NULL for a clean end
);
CREATE INDEX requests_started_wall ON requests (started_wall);
CREATE INDEX requests_key_name ON requests (key_name);
CREATE INDEX requests_public_model ON requests (public_model);
"""


def test_schema_version_1_is_frozen():
    assert schema_text("sqlite", 1) == SCHEMA_V1
    # Version 2 appended two columns; a version-1 file gains them by ALTER TABLE.
    assert SCHEMA_VERSION == 2
    assert migration_statements("sqlite", 1) == (
        "ALTER TABLE requests ADD COLUMN attempts INTEGER",
        "ALTER TABLE requests ADD COLUMN failed_attempts TEXT",
    )
    assert schema_text("sqlite", 2) == SCHEMA
    assert INSERT == (
        "INSERT INTO requests (request_id, kind, key_name, public_model, upstream,"
        " upstream_model, streamed, started_wall, status, input_tokens, output_tokens,"
        " cached_tokens, cache_write_tokens, reasoning_tokens, cost, upstream_id,"
        " finish_reason, time_to_headers, time_to_first_token, duration, bytes_to_client,"
        " cancelled, error_type, attempts, failed_attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
        " ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"
    )


def test_every_field_is_in_the_current_schema_version():
    counts = [FIELDS_IN_VERSION[version] for version in sorted(FIELDS_IN_VERSION)]
    assert sorted(FIELDS_IN_VERSION) == list(range(1, SCHEMA_VERSION + 1))
    assert counts == sorted(set(counts))  # each version adds fields
    assert FIELDS_IN_VERSION[SCHEMA_VERSION] == len(FIELDS)
    # Appended fields allow NULL: ADD COLUMN gives the rows already there NULL.
    assert not any(f.not_null for f in FIELDS[FIELDS_IN_VERSION[1] :])


async def test_a_version_1_file_is_brought_up_to_date(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        v1_columns = COLUMNS[: FIELDS_IN_VERSION[1]]
        with sqlite3.connect(path) as conn:
            for statement in schema_statements("sqlite", 1):
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 1")
            row = record_to_row(SHAPES["completed"])[: len(v1_columns)]
            marks = ", ".join("?" * len(v1_columns))
            conn.execute(f"INSERT INTO requests ({', '.join(v1_columns)}) VALUES ({marks})", row)
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.submit(SHAPES["upstream_reset"])
            await store.aclose()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            columns = [row[1] for row in conn.execute("PRAGMA table_info(requests)")]
        assert columns == ["id", *COLUMNS]
        old, new = read_rows(path)
        assert (old["request_id"], old["attempts"], old["failed_attempts"]) == (
            "req-completed",
            None,
            None,
        )
        assert new == dict(zip(COLUMNS, record_to_row(SHAPES["upstream_reset"]), strict=True))


def test_one_field_list_drives_the_schema_the_rows_and_the_log():
    names = [f.name for f in FIELDS]
    assert len(set(names)) == len(names)
    assert tuple(names) == COLUMNS
    # Every field reads a real attribute (or property) and is read back into a real one.
    record_fields = set(RequestRecord.__dataclass_fields__)
    usage_fields = set(Usage.__dataclass_fields__)
    for f in FIELDS:
        owner = Usage if f.usage else RequestRecord
        assert hasattr(owner, f.name), f.name
        assert f.attribute in (usage_fields if f.usage else record_fields), f.name
    # Every attribute of the record and of its usage is stored exactly once, or said not to be.
    restored = [f.attribute for f in FIELDS if not f.usage]
    assert sorted(restored) == sorted(record_fields - UNSTORED)
    assert sorted(f.attribute for f in FIELDS if f.usage) == sorted(usage_fields)
    assert record_fields >= UNSTORED
    # The table a fresh database gets has exactly these columns, types and NOT NULLs.
    with sqlite3.connect(":memory:") as conn:
        for statement in schema_statements("sqlite"):
            conn.execute(statement)
        table = [row[1:4] for row in conn.execute("PRAGMA table_info(requests)")]
    assert table == [
        ("id", "INTEGER", 0),
        *((f.name, f.codec.sql_type, int(f.not_null)) for f in FIELDS),
    ]
    # A row, a spill line and a log line each hold every field, in the declared order.
    record = SHAPES["completed"]
    row = record_to_row(record)
    assert len(row) == len(COLUMNS) == INSERT.count("?")
    assert list(orjson.loads(spill_line(row))) == list(COLUMNS)
    assert row_from_spill_line(spill_line(row).rstrip(b"\n")) == row
    assert sorted(LOG_FIELDS) == sorted(f.key for f in FIELDS)
    assert len(set(LOG_FIELDS)) == len(LOG_FIELDS)
    assert list(orjson.loads(format_record(record))) == list(LOG_FIELDS)


# --- the database -------------------------------------------------------------------


async def test_every_shape_written_and_read_back_exactly(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            for record in SHAPES.values():
                await store.submit(record)
            await store.aclose()
        assert store.written == len(SHAPES)
        assert (store.spilled, store.dropped, store.write_errors) == (0, 0, 0)
        rows = read_rows(path)
        assert [record_from_row(row) for row in rows] == [as_stored(r) for r in SHAPES.values()]
        assert rows[0] == dict(zip(COLUMNS, record_to_row(SHAPES["completed"]), strict=True))
        assert rows[0]["cost"] == 0.000123
        assert rows[1]["error_type"] == "client_disconnect"
        assert rows[1]["cancelled"] == 1


async def test_wal_mode_schema_version_and_indexes(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            indexes = {
                row[0]: row[1]
                for row in conn.execute(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                )
            }
            columns = [row[1] for row in conn.execute("PRAGMA table_info(requests)")]
        assert sorted(indexes) == [
            "requests_key_name",
            "requests_public_model",
            "requests_started_wall",
        ]
        assert columns == ["id", *COLUMNS]


async def test_reopening_keeps_rows_and_version(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        for record in (SHAPES["completed"], SHAPES["upstream_reset"]):
            store = UsageStore(path)
            async with trio.open_nursery() as nursery:
                await writing(store, nursery)
                await store.submit(record)
                await store.aclose()
        assert stored_ids(path) == ["req-completed", "req-reset"]


async def test_newer_schema_is_refused(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        store = UsageStore(path)
        await store.submit(SHAPES["completed"])  # queued before run: must not be lost
        async with trio.open_nursery() as nursery:
            with pytest.raises(SchemaError, match=r"schema version 3, newer than .* \(2\)"):
                await nursery.start(store.run)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
            assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
        assert spill_ids(store) == ["req-completed"]
        assert store.spilled == 1
        await store.submit(SHAPES["upstream_reset"])  # the writer is gone: spilled too
        assert spill_ids(store) == ["req-completed", "req-reset"]


async def test_unversioned_requests_table_is_refused(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "other.db"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE requests (x)")
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            with pytest.raises(SchemaError, match="not a trio-gateway usage database"):
                await nursery.start(store.run)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="queue_size and batch_size"):
        UsageStore(":memory:", queue_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        UsageStore(":memory:", batch_size=0)
    with pytest.raises(ValueError, match="submit_timeout"):
        UsageStore(":memory:", submit_timeout=-1)
    with pytest.raises(ValueError, match="drain_timeout"):
        UsageStore(":memory:", drain_timeout=math.nan)
    with pytest.raises(ValueError, match="gather_seconds"):
        UsageStore(":memory:", gather_seconds=-0.1)


# --- batching and flushing -------------------------------------------------------------


async def test_writer_takes_what_is_queued_up_to_batch_size(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = GatedStore(path, queue_size=16, batch_size=4)
        ids = [f"req-{i:02}" for i in range(10)]
        for request_id in ids:
            await store.submit(make_record(request_id))
        assert store.queued == 10
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.flush()
            assert store.queued == 0
            assert store.batches == [ids[0:4], ids[4:8], ids[8:10]]
            await store.submit(make_record("req-late"))
            await store.aclose()
        assert store.batches[-1] == ["req-late"]
        assert store.written == 11
        assert stored_ids(path) == sorted([*ids, "req-late"])


async def test_memory_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with trio.fail_after(LIMIT):
        monkeypatch.chdir(tmp_path)
        store = UsageStore(":memory:")
        assert store.spill_path is None
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            for record in SHAPES.values():
                await store.submit(record)
            await store.flush()
            rows = await store.call_on_connection(
                lambda conn: conn.execute(f"SELECT {', '.join(COLUMNS)} FROM requests").fetchall()
            )
            mode = await store.call_on_connection(
                lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0]
            )
            await store.aclose()
        assert [record_from_row(row) for row in rows] == [as_stored(r) for r in SHAPES.values()]
        assert mode == "memory"  # WAL does not apply to a database in memory
        assert file_names(tmp_path) == []
        with pytest.raises(RuntimeError, match="not running"):
            await store.call_on_connection(lambda conn: None)


async def test_memory_database_counts_and_logs_what_it_cannot_spill(
    caplog: pytest.LogCaptureFixture,
):
    with trio.fail_after(LIMIT):
        store = UsageStore(":memory:")
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        with caplog.at_level(logging.ERROR, logger="trio_gateway.usage"):
            await store.submit(SHAPES["completed"])
        assert (store.spilled, store.dropped) == (0, 1)
        [message] = [r.getMessage() for r in caplog.records if r.name == "trio_gateway.usage"]
        assert "1 record(s) dropped (the usage store is closed)" in message
        line = message.splitlines()[-1]
        assert orjson.loads(line) == dict(
            zip(COLUMNS, record_to_row(SHAPES["completed"]), strict=True)
        )


# --- shutdown ----------------------------------------------------------------------


async def test_shutdown_writes_every_pending_record(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path, queue_size=1000, batch_size=64)
        ids = [f"req-{i:04}" for i in range(600)]
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            for request_id in ids:
                await store.submit(make_record(request_id))
            assert store.queued > 0  # the writer has not caught up: aclose must drain
            await store.aclose()
        assert store.written == 600
        assert (store.spilled, store.dropped, store.queued) == (0, 0, 0)
        assert stored_ids(path) == ids


async def test_close_before_run_spills_the_queue(tmp_path: Path):
    with trio.fail_after(LIMIT):
        store = UsageStore(tmp_path / "usage.db")
        await store.submit(SHAPES["completed"])
        await store.aclose()
        assert spill_ids(store) == ["req-completed"]
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)  # returns at once
        assert not (tmp_path / "usage.db").exists()
        with pytest.raises(RuntimeError, match="only be called once"):
            await store.run()


async def test_submit_after_close_spills_and_next_start_imports(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.submit(SHAPES["completed"])
            await store.aclose()
        await store.submit(SHAPES["upstream_reset"])
        await store.flush()  # closed: returns at once
        assert (store.written, store.spilled) == (1, 1)
        assert spill_ids(store) == ["req-reset"]

        again = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(again, nursery)
            assert (again.imported, again.duplicates, again.rejected) == (1, 0, 0)
            await again.aclose()
        assert again.spill_path is not None
        assert not again.spill_path.exists()
        assert stored_ids(path) == ["req-completed", "req-reset"]
        [reset] = [row for row in read_rows(path) if row["request_id"] == "req-reset"]
        assert record_from_row(reset) == as_stored(SHAPES["upstream_reset"])


# --- cancellation -------------------------------------------------------------------


async def test_submit_from_a_cancelled_task_still_queues(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path)
        reached = False
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.submit(SHAPES["cancelled_mid_stream"])
            reached = True
            await trio.lowlevel.checkpoint()
        assert reached
        assert scope.cancelled_caught
        assert store.queued == 1
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        assert stored_ids(path) == ["req-cancelled"]


async def test_cancelled_writer_spills_batch_in_flight_and_queue(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = GatedStore(path, gather_seconds=0)  # the writer goes straight to the insert
        store.gate.clear()
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.submit(make_record("req-in-flight"))
            await trio.testing.wait_all_tasks_blocked()
            assert store.queued == 0  # the writer took it and waits on the database
            await store.submit(make_record("req-queued"))
            nursery.cancel_scope.cancel()
        assert spill_ids(store) == ["req-in-flight", "req-queued"]
        assert (store.spilled, store.written) == (2, 0)
        await store.submit(make_record("req-after"))
        assert store.spilled == 3
        store.gate.set()  # the abandoned insert now commits: the re-import must not double it
        await join_thread(store)

        again = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(again, nursery)
            await again.aclose()
        assert (again.imported, again.duplicates) == (2, 1)
        assert stored_ids(path) == ["req-after", "req-in-flight", "req-queued"]


class TimedStore(UsageStore):
    """A store that notes, on the Trio side, when each batch went to the database."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[tuple[float, list[str]]] = []

    async def _write(self, rows: list[Row]) -> None:
        self.writes.append((trio.current_time(), [str(row[0]) for row in rows]))
        await super()._write(rows)


async def test_writer_gathers_records_into_one_transaction(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    path = tmp_path / "usage.db"
    store = TimedStore(path, gather_seconds=0.05)
    async with trio.open_nursery() as nursery:
        await writing(store, nursery)
        first = trio.current_time()
        await store.submit(make_record("req-1"))
        await trio.sleep(0.03)
        await store.submit(make_record("req-2"))
        await trio.sleep(0.0199)
        await store.submit(make_record("req-3"))
        await trio.testing.wait_all_tasks_blocked()
        assert store.writes == []  # still gathering: 0.05 s after the first has not passed
        await trio.sleep(0.0002)
        assert store.writes == [(first + 0.05, ["req-1", "req-2", "req-3"])]
        fourth = trio.current_time()
        await store.submit(make_record("req-4"))  # the next record starts a new gathering
        await store.flush()
        assert store.writes[1] == (fourth + 0.05, ["req-4"])
        await store.aclose()
    assert len(store.writes) == 2
    assert stored_ids(path) == ["req-1", "req-2", "req-3", "req-4"]


async def test_gathering_stops_at_a_full_batch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    path = tmp_path / "usage.db"
    store = TimedStore(path, batch_size=2, gather_seconds=0.05, drain_timeout=math.inf)
    for name in ("req-1", "req-2", "req-3"):
        await store.submit(make_record(name))
    async with trio.open_nursery() as nursery:
        await writing(store, nursery)
        start = trio.current_time()
        await store.flush()
        await store.aclose()
    # A full batch goes at once; the rest waits its gathering out.
    assert store.writes == [(start, ["req-1", "req-2"]), (start + 0.05, ["req-3"])]


async def test_cancelled_writer_spills_what_it_was_gathering(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    path = tmp_path / "usage.db"
    store = GatedStore(path, gather_seconds=10.0)
    flushed = False
    async with trio.open_nursery() as nursery:
        await writing(store, nursery)
        await store.submit(make_record("req-gathered"))
        await trio.testing.wait_all_tasks_blocked()
        assert store.queued == 0  # the writer holds it while it gathers

        async def flush() -> None:
            nonlocal flushed
            await store.flush()
            flushed = True

        nursery.start_soon(flush)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert flushed is False  # its marker came after the gathered row, still queued
    assert store.batches == []
    assert spill_ids(store) == ["req-gathered"]
    assert (store.spilled, store.written) == (1, 0)


# --- a database slower than the traffic --------------------------------------------------


async def test_slow_database_never_holds_submit_past_its_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    path = tmp_path / "usage.db"
    store = GatedStore(
        path, queue_size=2, submit_timeout=1.0, drain_timeout=math.inf, gather_seconds=0
    )
    store.gate.clear()
    async with trio.open_nursery() as nursery:
        await writing(store, nursery)
        await store.submit(make_record("req-1"))
        await trio.testing.wait_all_tasks_blocked()  # req-1 is in the slow insert
        start = trio.current_time()
        await store.submit(make_record("req-2"))
        await store.submit(make_record("req-3"))
        assert trio.current_time() == start  # room in the queue: no wait at all
        assert store.queued == 2

        await store.submit(make_record("req-4"))  # queue full
        assert trio.current_time() - start == pytest.approx(1.0, abs=1e-9)
        with trio.CancelScope() as scope:  # a request being cancelled: same bound
            scope.cancel()
            await store.submit(make_record("req-5"))
        assert trio.current_time() - start == pytest.approx(2.0, abs=1e-9)
        assert (store.queued, store.spilled, store.written) == (2, 2, 0)
        assert spill_ids(store) == ["req-4", "req-5"]

        store.gate.set()
        await store.aclose()
    await join_thread(store)
    assert (store.written, store.spilled, store.dropped) == (3, 2, 0)
    assert stored_ids(path) == ["req-1", "req-2", "req-3"]

    again = UsageStore(path, drain_timeout=math.inf)
    async with trio.open_nursery() as nursery:
        await writing(again, nursery)
        assert (again.imported, again.duplicates) == (2, 0)
        await again.aclose()
    await join_thread(again)
    assert stored_ids(path) == ["req-1", "req-2", "req-3", "req-4", "req-5"]
    assert again.spill_path is not None
    assert not again.spill_path.exists()


async def test_drain_is_bounded_and_what_is_left_is_spilled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
):
    path = tmp_path / "usage.db"
    store = GatedStore(path, batch_size=1, drain_timeout=5.0)
    store.gate.clear()
    async with trio.open_nursery() as nursery:
        await writing(store, nursery)
        for i in (1, 2, 3):
            await store.submit(make_record(f"req-{i}"))
        await trio.to_thread.run_sync(store.entered.wait)  # no deadline yet: time stands
        assert store.batches == [["req-1"]]
        start = trio.current_time()
        await store.aclose()
        assert trio.current_time() - start == pytest.approx(5.0, abs=1e-9)
    assert (store.written, store.spilled, store.queued) == (0, 3, 0)
    assert spill_ids(store) == ["req-1", "req-2", "req-3"]
    store.gate.set()  # req-1's insert was only given up on: it commits now
    await join_thread(store)
    assert stored_ids(path) == ["req-1"]

    again = UsageStore(path, drain_timeout=math.inf)
    async with trio.open_nursery() as nursery:
        await writing(again, nursery)
        await again.aclose()
    await join_thread(again)
    assert (again.imported, again.duplicates) == (2, 1)
    assert stored_ids(path) == ["req-1", "req-2", "req-3"]


# --- write errors ---------------------------------------------------------------------


async def test_write_error_is_counted_logged_spilled_and_writing_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = GatedStore(path)
        store.failures.append(sqlite3.OperationalError("disk I/O error"))
        with caplog.at_level(logging.WARNING, logger="trio_gateway.usage"):
            async with trio.open_nursery() as nursery:
                await writing(store, nursery)
                await store.submit(make_record("req-failed"))
                await store.flush()
                await store.submit(make_record("req-next"))
                await store.aclose()
        assert (store.write_errors, store.spilled, store.written) == (1, 1, 1)
        assert stored_ids(path) == ["req-next"]
        assert spill_ids(store) == ["req-failed"]
        messages = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert (
            "ERROR",
            "usage database: writing 1 record(s) failed: OperationalError('disk I/O error');"
            " spilling them",
        ) in messages
        assert any(level == "WARNING" and "spilled to" in text for level, text in messages)


async def test_batch_is_one_transaction_and_bad_rows_are_rejected_not_lost(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path, queue_size=8)
        bad = make_record("req-bad", key_name=None)  # NOT NULL: the database refuses it
        for record in (make_record("req-a"), bad, make_record("req-b")):
            await store.submit(record)  # queued before run: one batch
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        assert (store.write_errors, store.written, store.spilled) == (1, 0, 3)
        assert stored_ids(path) == []  # the whole batch rolled back

        again = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(again, nursery)
            await again.aclose()
        assert (again.imported, again.duplicates, again.rejected) == (2, 0, 1)
        assert stored_ids(path) == ["req-a", "req-b"]
        rejected = tmp_path / "usage.db.spill.jsonl.rejected"  # one for the database
        [line] = rejected.read_bytes().splitlines()
        assert orjson.loads(line)["request_id"] == "req-bad"


async def test_unreadable_spill_lines_are_kept_aside(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        spill = tmp_path / "usage.db.spill.jsonl"
        good = orjson.dumps(dict(zip(COLUMNS, record_to_row(SHAPES["completed"]), strict=True)))
        spill.write_bytes(b'{"request_id": "cut sho\n' + good + b"\n\n[1, 2]\n")
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        assert (store.imported, store.rejected) == (1, 2)
        assert stored_ids(path) == ["req-completed"]
        assert not spill.exists()
        rejected = tmp_path / "usage.db.spill.jsonl.rejected"
        assert rejected.read_bytes() == b'{"request_id": "cut sho\n[1, 2]\n'


async def test_interrupted_import_is_finished_first(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        line = orjson.dumps(dict(zip(COLUMNS, record_to_row(SHAPES["completed"]), strict=True)))
        other = orjson.dumps(
            dict(zip(COLUMNS, record_to_row(SHAPES["upstream_reset"]), strict=True))
        )
        (tmp_path / "usage.db.spill.jsonl.importing").write_bytes(line + b"\n")
        (tmp_path / "usage.db.spill.jsonl").write_bytes(other + b"\n")
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        assert store.imported == 2
        assert stored_ids(path) == ["req-completed", "req-reset"]
        assert [name for name in file_names(tmp_path) if "spill" in name] == []


# --- several processes, one database ------------------------------------------------------

REPOSITORY = Path(__file__).parent.parent


def store_process_main(argv: Sequence[str]) -> None:
    """The body of one process of :func:`run_store_processes` (its only argument is JSON).

    Touches ``ready``, waits for ``go`` to exist, then runs a store on
    ``database`` (``schema``, ``spill_dir``, ``queue_size``, ``submit_timeout``),
    submits ``count`` records named ``<prefix>-NNNNN``, closes the store and
    prints its counters as one JSON line.
    """
    settings = json.loads(argv[0])
    Path(settings["ready"]).touch()
    deadline = time.monotonic() + LIMIT
    while not Path(settings["go"]).exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go")
        time.sleep(0.001)
    counters = trio.run(_store_process, settings)
    print(json.dumps(counters), flush=True)


async def _store_process(settings: dict[str, Any]) -> dict[str, int]:
    store = UsageStore(
        settings["database"],
        schema=settings.get("schema"),
        spill_dir=settings.get("spill_dir"),
        queue_size=settings.get("queue_size", 1024),
        submit_timeout=settings.get("submit_timeout", 1.0),
        retry_interval=math.inf,
    )
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for i in range(settings.get("count", 0)):
                await store.submit(make_record(f"{settings['prefix']}-{i:05}"))
            await store.aclose()
    names = ("written", "spilled", "dropped", "write_errors", "imported", "duplicates", "rejected")
    return {name: getattr(store, name) for name in names} | {"pid": os.getpid()}


async def run_store_processes(folder: Path, settings: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Run one process per entry of ``settings`` (see :func:`store_process_main`), all
    started together; return each one's counters. The caller bounds the wait."""
    code = "import sys; from tests.test_usage_store import store_process_main as m; m(sys.argv[1:])"
    go = folder / "go"
    go.unlink(missing_ok=True)
    results: list[dict[str, int]] = [{} for _ in settings]

    async def one(index: int, ready: Path) -> None:
        command = [
            sys.executable,
            "-c",
            code,
            json.dumps(settings[index] | {"ready": str(ready), "go": str(go)}),
        ]
        done = await trio.run_process(
            command, cwd=REPOSITORY, capture_stdout=True, capture_stderr=True, check=False
        )
        assert done.returncode == 0, done.stderr.decode()
        results[index] = json.loads(done.stdout.splitlines()[-1])

    readies = [folder / f"ready-{index}" for index in range(len(settings))]
    async with trio.open_nursery() as nursery:
        for index, ready in enumerate(readies):
            ready.unlink(missing_ok=True)
            nursery.start_soon(one, index, ready)
        await eventually(lambda: all(ready.exists() for ready in readies))
        go.touch()
    return results


async def eventually(condition: Callable[[], bool], interval: float = 0.01) -> None:
    """Poll ``condition`` until it is true; the caller bounds the wait (``trio.fail_after``)."""
    while True:
        if condition():
            return
        await trio.sleep(interval)


def dead_pids(count: int) -> list[int]:
    """Pids no process can have: above the kernel's pid_max."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return [pid_max + 1 + i for i in range(count)]


def spill_lines(ids: Sequence[str]) -> bytes:
    return spill.encode([record_to_row(make_record(request_id)) for request_id in ids])


async def test_two_processes_write_one_file_and_every_record_lands_once(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        # A tiny queue that never waits: each process spills some of its records to a
        # file of its own, while both write the database at the same time.
        settings = [
            {"database": str(path), "prefix": prefix, "count": 1500, "queue_size": 8,
             "submit_timeout": 0}
            for prefix in ("p1", "p2")
        ]  # fmt: skip
        first, second = await run_store_processes(tmp_path, settings)
        spill_files = [name for name in file_names(tmp_path) if name.endswith(".jsonl")]
        spilled = first["spilled"] + second["spilled"]
        assert spill_files == sorted(
            f"usage.db.spill.{result['pid']}.jsonl"
            for result in (first, second)
            if result["spilled"]
        )
        assert first["written"] + second["written"] + spilled == 3000
        assert first["dropped"] == second["dropped"] == 0

        # A store of this process imports both files: their processes have ended.
        again = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(again, nursery)
            await again.aclose()
        assert (again.imported, again.duplicates, again.rejected) == (spilled, 0, 0)
        ids = [row["request_id"] for row in read_rows(path)]
        assert sorted(ids) == sorted(f"{p}-{i:05}" for p in ("p1", "p2") for i in range(1500))
        assert [name for name in file_names(tmp_path) if ".spill." in name] == []


def write_spill_files(tmp_path: Path, per_file: int) -> list[str]:
    """Spill files of dead processes, the old single name, and an import left half done."""
    ids: list[str] = []
    names = [f"usage.db.spill.{pid}.jsonl" for pid in dead_pids(30)]
    names += ["usage.db.spill.jsonl", "usage.db.spill.jsonl.importing"]
    names += [f"usage.db.spill.{dead_pids(31)[-1]}.jsonl.importing.0123456789ab"]
    for n, name in enumerate(names):
        batch = [f"s{n:02}-{i:03}" for i in range(per_file)]
        (tmp_path / name).write_bytes(spill_lines(batch))
        ids += batch
    return ids


async def test_stores_starting_together_import_each_spilled_line_once(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        ids = write_spill_files(tmp_path, per_file=40)
        settings = [{"database": str(path), "prefix": p, "count": 0} for p in ("a", "b", "c")]
        results = await run_store_processes(tmp_path, settings)
        assert sum(result["imported"] for result in results) == len(ids)
        assert sum(result["duplicates"] for result in results) == 0  # no line imported twice
        assert sorted(row["request_id"] for row in read_rows(path)) == sorted(ids)
        assert [name for name in file_names(tmp_path) if ".spill." in name] == []


async def test_two_stores_of_one_process_starting_together_import_each_line_once(
    tmp_path: Path,
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        ids = write_spill_files(tmp_path, per_file=40)
        stores = [UsageStore(path, batch_size=7), UsageStore(path, batch_size=5)]
        async with trio.open_nursery() as nursery:
            for store in stores:  # both database threads claim files at the same time
                nursery.start_soon(store.run)
            for store in stores:
                await store.flush()
            for store in stores:
                await store.aclose()
        assert sum(store.imported for store in stores) == len(ids)
        assert sum(store.duplicates for store in stores) == 0
        assert sorted(row["request_id"] for row in read_rows(path)) == sorted(ids)


async def test_a_live_process_keeps_its_spill_file_and_ours_and_the_dead_are_imported(
    tmp_path: Path,
):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        [dead] = dead_pids(1)
        live = tmp_path / "usage.db.spill.1.jsonl"  # pid 1 always runs
        live.write_bytes(spill_lines(["live"]))
        (tmp_path / f"usage.db.spill.{os.getpid()}.jsonl").write_bytes(spill_lines(["ours"]))
        (tmp_path / f"usage.db.spill.{dead}.jsonl").write_bytes(spill_lines(["dead"]))
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.aclose()
        assert stored_ids(path) == ["dead", "ours"]
        assert [name for name in file_names(tmp_path) if ".spill." in name] == [live.name]


def test_an_append_never_lands_in_a_claimed_file(tmp_path: Path):
    base = tmp_path / "usage.db"
    path = spill.spill_path(base, os.getpid())
    spill.append(path, spill_lines(["one"]))
    claimed = spill.claim(path, claimed=False)
    assert claimed is not None
    assert claimed.path.name.startswith(f"{path.name}.importing.")
    assert not path.exists()
    spill.append(path, spill_lines(["two"]))  # the name is free: a new file
    assert claimed.path.read_bytes() == spill_lines(["one"])
    assert path.read_bytes() == spill_lines(["two"])
    # While the claim holds its lock, nobody else can claim that file.
    assert spill.claim(claimed.path, claimed=True) is None
    claimed.release()
    again = spill.claim(claimed.path, claimed=True)  # an import that stopped: taken over
    assert again is not None
    again.release()
    assert spill.claim(tmp_path / "missing.jsonl", claimed=False) is None


def test_a_claim_skips_a_file_being_appended_to(tmp_path: Path):
    import fcntl

    path = spill.spill_path(tmp_path / "usage.db", 12345)
    spill.append(path, spill_lines(["one"]))
    with path.open("ab") as appender:  # an append in progress holds the lock
        fcntl.flock(appender.fileno(), fcntl.LOCK_EX)
        assert spill.claim(path, claimed=False) is None
    assert spill.claim(path, claimed=False) is not None


async def test_spilled_records_are_imported_while_running(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = GatedStore(path, retry_interval=0.05)
        store.failures.append(sqlite3.OperationalError("database is locked"))
        async with trio.open_nursery() as nursery:
            await writing(store, nursery)
            await store.submit(make_record("req-failed"))
            await store.flush()
            assert (store.write_errors, store.spilled) == (1, 1)
            await eventually(lambda: store.imported == 1)  # the next pass, 0.05 s later
            await store.aclose()
        assert (store.imported, store.duplicates) == (1, 0)
        assert stored_ids(path) == ["req-failed"]
        assert [name for name in file_names(tmp_path) if ".spill." in name] == []
