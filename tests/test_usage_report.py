"""``trio-gateway usage``: the report on a known database, its table and JSON, and its errors.

The database is written by the real :class:`UsageStore`, with fixed
``started_wall`` values around ``NOW``, and the report is asked for at
``NOW``. Durations and costs are sums of powers of two, so every figure is
exact.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_gateway._accounting.usage_report import (
    ReportError,
    UsageRow,
    add_usage_arguments,
    format_json,
    format_table,
    main_usage,
    parse_since,
    percentile,
    usage_report,
)
from trio_gateway._accounting.usage_rows import SCHEMA_VERSION
from trio_gateway._accounting.usage_store import UsageStore
from trio_gateway._core.kinds import FailureType, Kind
from trio_gateway._core.record import RequestRecord, Usage

NOW = 1_700_000_000.0
DAY = 86_400.0


def request(
    request_id: str,
    key: str,
    model: str,
    age: float,
    duration: float | None,
    *,
    status: int | None = 200,
    error_type: FailureType | None = None,
    **usage: Any,
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        kind=Kind.CHAT,
        key_name=key,
        public_model=model,
        upstream="openrouter",
        upstream_model=f"vendor/{model}",
        streamed=True,
        started_at=0.0,
        started_wall=NOW - age,
        status=status,
        usage=Usage(**usage),
        ended_at=duration,
        error_type=error_type,
        cancelled=error_type is FailureType.CLIENT_DISCONNECT,
    )


LEFT, BAD_STATUS = FailureType.CLIENT_DISCONNECT, FailureType.UPSTREAM_STATUS
RECORDS = [
    request("a1", "alice", "gpt-fast", 3600, 1.0, input_tokens=100, output_tokens=50, cost=0.25),
    request("a2", "alice", "gpt-fast", 7200, 3.0, input_tokens=200, output_tokens=100, cost=0.5),
    request("a3", "alice", "claude-fast", 60, 0.5, error_type=LEFT, input_tokens=10),
    # Exactly 24 h old: on the window's edge, so inside it.
    request("a4", "alice", "gpt-fast", DAY, 2.0, input_tokens=1, output_tokens=1, cost=0.125),
    request("b1", "bob", "claude-fast", 10, 0.25, status=502, error_type=BAD_STATUS),
    request("b2", "bob", "claude-fast", 20, 0.125, status=429),  # an error without a failure
    request("b3", "bob", "claude-fast", 30, 4.0, input_tokens=1000, output_tokens=2000, cost=1.5),
    request("c1", "carol", "gpt-fast", DAY + 1, 1.0, input_tokens=5, cost=9.0),  # too old
    request("d1", "dave", "gpt-slow", 5, None, status=None),  # never ended, nothing reported
]

BY_KEY = [
    UsageRow("alice", 4, 1, 311, 151, 0.875, 1.0, 3.0),
    UsageRow("bob", 3, 2, 1000, 2000, 1.5, 0.25, 4.0),
    UsageRow("dave", 1, 0, 0, 0, None, None, None),
]
BY_MODEL = [
    UsageRow("claude-fast", 4, 3, 1010, 2000, 1.5, 0.25, 4.0),
    UsageRow("gpt-fast", 3, 0, 301, 151, 0.875, 2.0, 3.0),
    UsageRow("gpt-slow", 1, 0, 0, 0, None, None, None),
]

TABLE_BY_KEY = """\
key    requests  errors  input tokens  output tokens      cost  p50 s  p95 s
-----  --------  ------  ------------  -------------  --------  -----  -----
alice         4       1           311            151  0.875000  1.000  3.000
bob           3       2         1,000          2,000  1.500000  0.250  4.000
dave          1       0             0              0         -      -      -
-----  --------  ------  ------------  -------------  --------  -----  -----
total         8       3         1,311          2,151  2.375000"""


LIMIT = 30  # seconds: the absolute bound of a real-clock run (conftest.py rule 3)


async def build(path: Path, records: list[RequestRecord]) -> None:
    store = UsageStore(path)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for record in records:
                await store.submit(record)
            await store.aclose()
    assert store.written == len(records)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """The known database (a sync fixture, so that sync tests can use it)."""
    path = tmp_path / "usage.db"
    trio.run(build, path, RECORDS)
    return path


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trio-gateway usage")
    add_usage_arguments(parser)
    return main_usage(parser.parse_args(argv), now=NOW)


# --- the report ---------------------------------------------------------------------


def test_report_by_key(database: Path):
    assert usage_report(database, DAY, "key", NOW) == BY_KEY


def test_report_by_model(database: Path):
    assert usage_report(database, DAY, "model", NOW) == BY_MODEL


def test_report_window(database: Path):
    assert usage_report(database, 3600, "key", NOW) == [
        UsageRow("bob", 3, 2, 1000, 2000, 1.5, 0.25, 4.0),
        UsageRow("alice", 2, 1, 110, 50, 0.25, 0.5, 1.0),
        UsageRow("dave", 1, 0, 0, 0, None, None, None),
    ]
    assert usage_report(database, 2 * DAY, "key", NOW) == [
        *BY_KEY[:2],
        UsageRow("carol", 1, 0, 5, 0, 9.0, 1.0, 1.0),  # ties: by name
        BY_KEY[2],
    ]
    assert usage_report(database, 1, "key", NOW + 3 * DAY) == []


async def test_report_reads_a_database_the_gateway_is_writing(tmp_path: Path):
    with trio.fail_after(LIMIT):
        path = tmp_path / "usage.db"
        store = UsageStore(path)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for record in RECORDS:
                await store.submit(record)
            await store.flush()
            assert usage_report(path, DAY, "key", NOW) == BY_KEY
            await store.aclose()


@pytest.mark.parametrize(
    ("values", "p50", "p95"),
    [
        ([7.0], 7.0, 7.0),
        ([1.0, 2.0], 1.0, 2.0),
        ([float(i) for i in range(1, 21)], 10.0, 19.0),
        ([float(i) for i in range(1, 101)], 50.0, 95.0),
        ([float(i) for i in range(1, 102)], 51.0, 96.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], p50: float, p95: float):
    assert percentile(values, 50) == p50
    assert percentile(values, 95) == p95
    assert percentile(values, 100) == values[-1]


@pytest.mark.parametrize(("values", "p"), [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses_nonsense(values: list[float], p: int):
    with pytest.raises(ValueError, match="percentile needs"):
        percentile(values, p)


def test_missing_database(tmp_path: Path):
    with pytest.raises(ReportError, match=r"^no usage database at .*nothing\.db$"):
        usage_report(tmp_path / "nothing.db", DAY, "key", NOW)
    assert not (tmp_path / "nothing.db").exists()  # read-only: nothing created


def test_not_a_usage_database(tmp_path: Path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(ReportError, match="is not a trio-gateway usage database"):
        usage_report(path, DAY, "key", NOW)
    path.write_bytes(b"this is not sqlite at all, not even its header....." * 10)
    with pytest.raises(ReportError, match="cannot read the usage database"):
        usage_report(path, DAY, "key", NOW)


def test_newer_database(database: Path):
    with sqlite3.connect(database) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ReportError, match=r"schema version 3, newer than .* \(2\)"):
        usage_report(database, DAY, "key", NOW)


def test_bad_grouping(database: Path):
    with pytest.raises(ValueError, match="by must be 'key' or 'model'"):
        usage_report(database, DAY, "upstream", NOW)  # type: ignore[arg-type]


# --- formatting ---------------------------------------------------------------------


def test_table():
    assert format_table(BY_KEY, by="key") == TABLE_BY_KEY


def test_table_by_model_names_its_column():
    lines = format_table(BY_MODEL, by="model").splitlines()
    assert lines[0].startswith("model        requests")
    assert lines[2] == (
        "claude-fast         4       3         1,010          2,000  1.500000  0.250  4.000"
    )
    assert lines[-1] == "total               8       3         1,311          2,151  2.375000"
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned


def test_table_without_requests():
    assert format_table([], by="key") == "no requests in this period"


def test_json():
    text = format_json(BY_KEY, by="key")
    assert json.loads(text) == [
        {
            "key": "alice",
            "requests": 4,
            "errors": 1,
            "input_tokens": 311,
            "output_tokens": 151,
            "cost": 0.875,
            "p50_duration": 1.0,
            "p95_duration": 3.0,
        },
        {
            "key": "bob",
            "requests": 3,
            "errors": 2,
            "input_tokens": 1000,
            "output_tokens": 2000,
            "cost": 1.5,
            "p50_duration": 0.25,
            "p95_duration": 4.0,
        },
        {
            "key": "dave",
            "requests": 1,
            "errors": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost": None,
            "p50_duration": None,
            "p95_duration": None,
        },
    ]
    assert [row["model"] for row in json.loads(format_json(BY_MODEL, by="model"))] == [
        "claude-fast",
        "gpt-fast",
        "gpt-slow",
    ]
    assert format_json([], by="key") == "[]"


# --- parse_since ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("30m", 1800.0), ("24h", 86400.0), ("7d", 604800.0), ("1.5h", 5400.0)],
)
def test_parse_since(text: str, seconds: float):
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "24 h", "1w", "24H", "1e3s", "h24"])
def test_parse_since_needs_number_and_unit(text: str):
    with pytest.raises(ValueError, match=r"expected a number and a unit \(s, m, h or d\)"):
        parse_since(text)


@pytest.mark.parametrize("text", ["0h", "0s", "0.0d"])
def test_parse_since_needs_a_period(text: str):
    with pytest.raises(ValueError, match="must be longer than zero"):
        parse_since(text)


# --- the command ----------------------------------------------------------------------


def test_command_prints_table(database: Path, capsys: pytest.CaptureFixture[str]):
    assert run_command(["--database", str(database)]) == 0  # defaults: 24h, by key
    assert capsys.readouterr().out == TABLE_BY_KEY + "\n"


def test_command_prints_json(database: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["--since", "1d", "--by", "model", "--json", "--database", str(database)]
    assert run_command(argv) == 0
    assert capsys.readouterr().out == format_json(BY_MODEL, by="model") + "\n"


def test_command_default_database_is_usage_db(
    database: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(database.parent)
    assert database.name == "usage.db"
    assert run_command(["--since", "1h"]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("bob ")


def test_command_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert run_command(["--database", str(tmp_path / "none.db")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"trio-gateway: usage: no usage database at {tmp_path / 'none.db'}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "yesterday"], "argument --since: expected a number and a unit"),
        (["--since", "0m"], "argument --since: the period must be longer than zero"),
        (["--by", "upstream"], "argument --by: invalid choice: 'upstream'"),
    ],
)
def test_command_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as info:
        run_command(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
