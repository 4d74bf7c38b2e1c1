"""The usage database in PostgreSQL: schema, exactly once, outages, several processes, the report.

Rules for this file, on top of ``conftest.py`` and ``test_usage_store.py``:

* Every test runs against the real server at 127.0.0.1:5432 (never a fake),
  in a schema of its own (the ``schema`` fixture: a fresh name, dropped
  afterwards). When the server does not answer, the test fails under CI and
  is skipped elsewhere (``tests/postgres_support.py``).
* An outage is a :class:`~tests.postgres_support.TcpProxy` between the store
  and the server, cut and restored by the test; the shared server is never
  stopped.
* Every async test carries an absolute ``trio.fail_after(LIMIT)``.
"""

from __future__ import annotations

import argparse
import functools
import math
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from tests.postgres_support import (
    POSTGRES_URL,
    TcpProxy,
    drop_schema,
    new_schema,
    query,
    require_postgres,
)
from tests.test_usage_report import DAY, NOW, RECORDS
from tests.test_usage_report import build as build_sqlite
from tests.test_usage_store import (
    SHAPES,
    as_stored,
    eventually,
    file_names,
    make_record,
    run_store_processes,
)
from trio_gateway._accounting.postgres_store import VERSION_TABLE, describe
from trio_gateway._accounting.usage_report import (
    By,
    ReportError,
    add_usage_arguments,
    format_json,
    format_table,
    main_usage,
    usage_report,
)
from trio_gateway._accounting.usage_rows import (
    COLUMNS,
    FIELDS_IN_VERSION,
    POSTGRES_TYPES,
    SCHEMA_VERSION,
    Row,
    record_from_row,
    record_to_row,
    schema_statements,
)
from trio_gateway._accounting.usage_store import SchemaError, UsageStore
from trio_gateway._core.record import FIELDS, RequestRecord

LIMIT = 30  # seconds: the absolute bound of every test here; a normal run takes well under 2


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema no other test uses, dropped with everything in it afterwards."""
    require_postgres()
    name = new_schema()
    try:
        yield name
    finally:
        drop_schema(name)


async def rows_in(schema: str) -> list[dict[str, Any]]:
    statement = f"SELECT {', '.join(COLUMNS)} FROM requests ORDER BY id"
    rows = await trio.to_thread.run_sync(query, schema, statement)
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


async def ids_in(schema: str) -> list[str]:
    return sorted(row["request_id"] for row in await rows_in(schema))


async def write(store: UsageStore, records: Sequence[RequestRecord]) -> None:
    """Run ``store``, submit ``records``, close it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for record in records:
            await store.submit(record)
        await store.aclose()


def spill_names(folder: Path) -> list[str]:
    return [name for name in file_names(folder) if ".spill." in name]


# --- the schema ---------------------------------------------------------------------------


async def test_schema_is_created_on_first_start_from_the_field_list(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        store = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        await write(store, list(SHAPES.values()))
        assert (store.written, store.spilled, store.write_errors) == (len(SHAPES), 0, 0)

        columns = await trio.to_thread.run_sync(
            query,
            schema,
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'requests' ORDER BY ordinal_position",
            (schema,),
        )
        spelled = {"BIGINT": "bigint", "DOUBLE PRECISION": "double precision", "TEXT": "text"}
        assert columns == [
            ("id", "bigint", "NO"),
            *(
                (f.name, spelled[POSTGRES_TYPES[f.codec.sql_type]], "NO" if f.not_null else "YES")
                for f in FIELDS
            ),
        ]
        indexes = await trio.to_thread.run_sync(
            query, schema, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)
        )
        assert sorted(name for (name,) in indexes) == [
            "requests_key_name",
            "requests_pkey",
            "requests_public_model",
            "requests_request_id_key",  # UNIQUE: the conflict target
            "requests_started_wall",
            f"{VERSION_TABLE}_pkey",
        ]
        version = f"SELECT name, version FROM {VERSION_TABLE}"
        assert await trio.to_thread.run_sync(query, schema, version) == [
            ("requests", SCHEMA_VERSION)
        ]
        rows = await rows_in(schema)
        assert [record_from_row(row) for row in rows] == [as_stored(r) for r in SHAPES.values()]
        assert rows[0]["cost"] == 0.000123

        again = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        await write(again, [make_record("req-later")])
        assert await trio.to_thread.run_sync(query, schema, version) == [
            ("requests", SCHEMA_VERSION)
        ]
        assert len(await rows_in(schema)) == len(SHAPES) + 1
        assert spill_names(tmp_path) == []


async def test_newer_schema_is_refused(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        await trio.to_thread.run_sync(query, "public", f"CREATE SCHEMA {schema}")
        await trio.to_thread.run_sync(
            query,
            schema,
            f"CREATE TABLE {VERSION_TABLE} (name TEXT PRIMARY KEY, version INTEGER NOT NULL);"
            f" INSERT INTO {VERSION_TABLE} VALUES ('requests', {SCHEMA_VERSION + 1})",
        )
        store = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        await store.submit(SHAPES["completed"])  # queued before run: must not be lost
        async with trio.open_nursery() as nursery:
            with pytest.raises(SchemaError, match=r"schema version 3, newer than .* \(2\)") as info:
                await nursery.start(store.run)
        where = f"postgresql://postgres@127.0.0.1:5432/test (schema {schema})"
        assert str(info.value).startswith(where)
        tables = "SELECT tablename FROM pg_tables WHERE schemaname = %s"
        assert await trio.to_thread.run_sync(query, schema, tables, (schema,)) == [(VERSION_TABLE,)]
        assert store.spilled == 1
        assert spill_names(tmp_path) == [store.spill_path.name if store.spill_path else ""]


async def test_a_requests_table_without_a_version_is_refused(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        await trio.to_thread.run_sync(query, "public", f"CREATE SCHEMA {schema}")
        await trio.to_thread.run_sync(query, schema, "CREATE TABLE requests (x INTEGER)")
        store = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        async with trio.open_nursery() as nursery:
            with pytest.raises(SchemaError, match="not a trio-gateway usage database"):
                await nursery.start(store.run)


async def test_a_version_1_schema_is_brought_up_to_date(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        await trio.to_thread.run_sync(query, "public", f"CREATE SCHEMA {schema}")
        v1_columns = COLUMNS[: FIELDS_IN_VERSION[1]]
        statements = [
            f"CREATE TABLE {VERSION_TABLE} (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
            f"INSERT INTO {VERSION_TABLE} VALUES ('requests', 1)",
            *schema_statements("postgres", 1),
        ]
        for statement in statements:
            await trio.to_thread.run_sync(query, schema, statement)
        row = record_to_row(SHAPES["completed"])[: len(v1_columns)]
        marks = ", ".join(["%s"] * len(v1_columns))
        insert = f"INSERT INTO requests ({', '.join(v1_columns)}) VALUES ({marks})"
        await trio.to_thread.run_sync(query, schema, insert, row)

        store = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        await write(store, [SHAPES["upstream_reset"]])
        version = f"SELECT version FROM {VERSION_TABLE}"
        assert await trio.to_thread.run_sync(query, schema, version) == [(SCHEMA_VERSION,)]
        old, new = await rows_in(schema)
        assert old["request_id"] == "req-completed"
        assert [old[name] for name in COLUMNS[len(v1_columns) :]] == [None] * (
            len(COLUMNS) - len(v1_columns)
        )
        assert new == dict(zip(COLUMNS, record_to_row(SHAPES["upstream_reset"]), strict=True))


# --- exactly once ---------------------------------------------------------------------------


class AckLostStore(UsageStore):
    """A store whose first write commits, then fails as if the commit's answer was lost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose_next = True

    def _write_batch(self, rows: Sequence[Row]) -> int:
        inserted = super()._write_batch(rows)
        if self.lose_next:
            self.lose_next = False
            raise psycopg.OperationalError("the answer to COMMIT was lost")
        return inserted


async def test_a_batch_retried_after_its_commit_is_stored_once(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        store = AckLostStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path, retry_interval=0.05)
        batch = [make_record(f"req-{i}") for i in range(5)]
        for record in batch:
            await store.submit(record)  # queued before run: one batch
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.flush()
            assert (store.write_errors, store.spilled, store.written) == (1, 5, 0)
            # The next pass imports the spilled copy: every row is already there.
            await eventually(lambda: store.duplicates == 5)
            await store.submit(batch[0])  # the same record again, in a later batch
            await store.submit(make_record("req-new"))
            await store.aclose()
        assert (store.imported, store.duplicates, store.written) == (0, 6, 1)
        assert await ids_in(schema) == ["req-0", "req-1", "req-2", "req-3", "req-4", "req-new"]
        assert spill_names(tmp_path) == []


async def test_two_processes_write_one_schema_and_every_record_lands_once(
    schema: str, tmp_path: Path
):
    with trio.fail_after(LIMIT):
        # Both start on an empty schema at the same moment: it is created once.
        settings = [
            {"database": POSTGRES_URL, "schema": schema, "spill_dir": str(tmp_path),
             "prefix": prefix, "count": 2000}
            for prefix in ("p1", "p2")
        ]  # fmt: skip
        results = await run_store_processes(tmp_path, settings)
        assert [result["write_errors"] for result in results] == [0, 0]
        spilled = sum(result["spilled"] for result in results)
        assert sum(result["written"] for result in results) + spilled == 4000

        again = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)  # imports any spill
        await write(again, [])
        assert (again.imported, again.duplicates) == (spilled, 0)
        expected = sorted(f"{p}-{i:05}" for p in ("p1", "p2") for i in range(2000))
        assert await ids_in(schema) == expected
        version = f"SELECT name, version FROM {VERSION_TABLE}"
        assert await trio.to_thread.run_sync(query, schema, version) == [
            ("requests", SCHEMA_VERSION)
        ]


# --- outages ----------------------------------------------------------------------------------


async def test_an_outage_spills_and_recovery_imports(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy()
            await nursery.start(proxy.serve)
            store = UsageStore(proxy.url, schema=schema, spill_dir=tmp_path, retry_interval=0.1)
            await nursery.start(store.run)
            for i in range(5):
                await store.submit(make_record(f"before-{i}"))
            await store.flush()
            assert (store.written, store.spilled) == (5, 0)

            proxy.cut()  # the server is gone: the connection breaks
            for i in range(5):
                await store.submit(make_record(f"during-{i}"))
            await store.flush()
            assert store.unavailable
            assert (store.written, store.spilled, store.dropped) == (5, 5, 0)
            assert store.spill_path is not None
            assert spill_names(tmp_path) == [store.spill_path.name]
            await eventually(lambda: store.write_errors >= 3)  # reconnects keep failing
            await store.submit(make_record("during-5"))  # spilled at once, without a try
            await store.flush()
            assert store.spilled == 6

            proxy.restore()
            await eventually(lambda: store.imported == 6)  # the next pass reconnects, imports
            assert (store.unavailable, store.write_errors >= 3) == (False, True)
            await store.submit(make_record("after"))
            await store.aclose()
            nursery.cancel_scope.cancel()
        assert (store.written, store.spilled, store.imported, store.duplicates) == (6, 6, 6, 0)
        expected = [f"before-{i}" for i in range(5)] + [f"during-{i}" for i in range(6)]
        assert await ids_in(schema) == sorted([*expected, "after"])
        assert spill_names(tmp_path) == []


async def test_a_server_down_at_start_is_an_outage_not_a_failure(schema: str, tmp_path: Path):
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            proxy = TcpProxy()
            await nursery.start(proxy.serve)
            proxy.cut()
            store = UsageStore(proxy.url, schema=schema, spill_dir=tmp_path, retry_interval=0.1)
            await nursery.start(store.run)  # starts anyway
            assert store.unavailable
            assert store.write_errors == 1
            await store.submit(make_record("early"))
            await store.flush()
            assert store.spilled == 1
            proxy.restore()
            await eventually(lambda: store.imported == 1)
            await store.aclose()
            nursery.cancel_scope.cancel()
        assert await ids_in(schema) == ["early"]  # the schema was made at the reconnect


async def test_a_spill_file_left_by_a_dead_process_is_imported(schema: str, tmp_path: Path):
    from tests.test_usage_store import dead_pids, spill_lines
    from trio_gateway._accounting import spill

    with trio.fail_after(LIMIT):
        store = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        assert store.database.spill_base is not None
        [dead] = dead_pids(1)
        path = spill.spill_path(store.database.spill_base, dead)
        path.write_bytes(spill_lines(["from-the-dead"]) + b'{"not": "a record"}\n')
        await write(store, [])
        assert (store.imported, store.rejected) == (1, 1)
        assert await ids_in(schema) == ["from-the-dead"]
        assert spill_names(tmp_path) == [spill.rejected_path(store.database.spill_base).name]


# --- the report ---------------------------------------------------------------------------------


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trio-gateway usage")
    add_usage_arguments(parser)
    return main_usage(parser.parse_args(argv), now=NOW)


async def test_the_report_is_the_same_from_sqlite_and_postgres(
    schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with trio.fail_after(LIMIT):
        sqlite_path = tmp_path / "usage.db"
        await build_sqlite(sqlite_path, RECORDS)
        store = UsageStore(POSTGRES_URL, schema=schema, spill_dir=tmp_path)
        await write(store, list(reversed(RECORDS)))  # another order: the report must not care
        groupings: tuple[By, ...] = ("key", "model")
        for by in groupings:
            for since in (1.0, 3600.0, DAY, 2 * DAY, math.inf):
                from_sqlite = usage_report(sqlite_path, since, by, NOW)
                from_postgres = await trio.to_thread.run_sync(
                    functools.partial(usage_report, POSTGRES_URL, since, by, NOW, schema=schema)
                )
                assert from_postgres == from_sqlite
                assert format_table(from_postgres, by=by) == format_table(from_sqlite, by=by)
                assert format_json(from_postgres, by=by) == format_json(from_sqlite, by=by)
        for options in ([], ["--by", "model", "--json"], ["--since", "1h", "--json"]):
            assert run_command([*options, "--database", str(sqlite_path)]) == 0
            sqlite_out = capsys.readouterr().out
            postgres = ["--database", POSTGRES_URL, "--schema", schema]
            assert await trio.to_thread.run_sync(run_command, [*options, *postgres]) == 0
            assert capsys.readouterr().out == sqlite_out


def test_report_errors_on_postgres(schema: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(ReportError, match=r"\(schema .*\) is not a trio-gateway usage database"):
        usage_report(POSTGRES_URL, DAY, "key", NOW, schema=schema)  # no such schema yet
    query("public", f"CREATE SCHEMA {schema}")
    query(
        schema,
        f"CREATE TABLE {VERSION_TABLE} (name TEXT PRIMARY KEY, version INTEGER NOT NULL);"
        f" INSERT INTO {VERSION_TABLE} VALUES ('requests', {SCHEMA_VERSION + 1})",
    )
    with pytest.raises(ReportError, match=r"schema version 3, newer than .* \(2\)"):
        usage_report(POSTGRES_URL, DAY, "key", NOW, schema=schema)
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres:not-this-password@127.0.0.1:{port}/test"
    assert run_command(["--database", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"trio-gateway: usage: postgresql://postgres@127.0.0.1:{port}/test:"
        " cannot read the usage database: connection failed"
    )
    assert "not-this-password" not in err
    with pytest.raises(ReportError, match=r"^--schema is only for a PostgreSQL database"):
        usage_report("usage.db", DAY, "key", NOW, schema=schema)


def test_messages_and_spill_names_never_hold_the_password(tmp_path: Path):
    url = "postgresql://gateway:s3cret-pw@db.internal:6543/usage?sslmode=require"
    assert describe(url) == "postgresql://gateway@db.internal:6543/usage"
    assert describe(url, "eu") == "postgresql://gateway@db.internal:6543/usage (schema eu)"
    assert describe("postgres://[::1]/x") == "postgresql://[::1]/x"
    store = UsageStore(url, schema="eu", spill_dir=tmp_path)
    assert "s3cret" not in store.database.where
    assert store.spill_path is not None
    assert store.spill_path.parent == tmp_path
    assert store.spill_path.name.startswith("usage-postgres-usage-")
    assert "s3cret" not in str(store.spill_path)
    other = UsageStore(url, schema="us", spill_dir=tmp_path)  # another schema: other files
    assert other.spill_path != store.spill_path
    with pytest.raises(ValueError, match=r"^not a PostgreSQL URL libpq can read$"):
        UsageStore("postgresql://h/db?password_file_typo=s3cret", spill_dir=tmp_path)


# --- through `trio-gateway serve` ---------------------------------------------------------------

CLIENT_KEY = "postgres-client-key-0123"
UPSTREAM_KEY = "postgres-upstream-secret-4567"
MODEL = "pg/free-model"


async def test_two_serve_processes_share_one_schema_and_usage_reports_them(
    schema: str, tmp_path: Path, nursery: trio.Nursery
):
    """Two `serve` on one schema, SDK requests to both, SIGTERM, `usage --database URL`."""
    import json
    import sys

    import openai

    from tests.helpers import serve_command
    from trio_gateway._core.config import hash_key
    from trio_gateway.testing.mock_upstream import MockUpstream, Script

    mock = MockUpstream(Script(tokens=4), api_key=UPSTREAM_KEY)
    with trio.fail_after(LIMIT):
        await nursery.start(mock.serve)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[upstreams.mock]
base_url = "{mock.base_url}"
api_key_env = "PG_UPSTREAM_KEY"

[models."{MODEL}"]
upstream = "mock"
upstream_model = "vendor/model:free"
free = true

[[keys]]
name = "alice"
sha256 = "{hash_key(CLIENT_KEY)}"

[accounting]
database = "{POSTGRES_URL}"
schema = "{schema}"
spill_dir = "spill"

[log]
level = "off"
"""
    )
    env = {"PG_UPSTREAM_KEY": UPSTREAM_KEY}
    with trio.fail_after(LIMIT):
        async with serve_command(config, env) as first, serve_command(config, env) as second:

            def use(url: str) -> None:
                with openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0) as oa:
                    for _ in range(3):
                        list(oa.chat.completions.create(model=MODEL, stream=True, messages=[]))

            async with trio.open_nursery() as clients:
                clients.start_soon(trio.to_thread.run_sync, use, first.url)
                clients.start_soon(trio.to_thread.run_sync, use, second.url)
    assert (first.status, second.status) == (0, 0), (first.output, second.output)
    command = [sys.executable, "-m", "trio_gateway", "usage", "--json", "--by", "key"]
    with trio.fail_after(LIMIT):
        report = await trio.run_process(
            [*command, "--database", POSTGRES_URL, "--schema", schema], capture_stdout=True
        )
    (alice,) = json.loads(report.stdout)
    assert (alice["key"], alice["requests"], alice["errors"]) == ("alice", 6, 0)
    assert alice["output_tokens"] == 6 * 4
    stored = await trio.to_thread.run_sync(query, schema, "SELECT * FROM requests")
    assert len(stored) == 6
    for row in stored:  # key names only: neither key reaches the database
        assert not any(key in str(value) for value in row for key in (CLIENT_KEY, UPSTREAM_KEY))
    assert spill_names(tmp_path / "spill") == []


async def test_serve_refuses_a_url_libpq_cannot_read(tmp_path: Path):
    import sys

    config = tmp_path / "gateway.toml"
    config.write_text(
        """
[upstreams.mock]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "PG_UPSTREAM_KEY"

[models.m]
upstream = "mock"
upstream_model = "m"

[auth]
allow_anonymous = true

[accounting]
database = "postgresql://gateway:s3cret@db.internal/usage?passwrd=s3cret"
"""
    )
    command = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
    with trio.fail_after(LIMIT):
        done = await trio.run_process(
            command,
            env={"PG_UPSTREAM_KEY": "k", "PATH": ""},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.decode() == (
        "trio-gateway: config error: accounting.database: not a PostgreSQL URL libpq can read\n"
    )
