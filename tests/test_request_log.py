"""The request log: the line :func:`format_record` makes, and where :class:`RequestLogger` puts it.

Lines written by the worker thread are read back only after ``close()``,
which waits for them, so no test sleeps or polls. The one test that needs
the worker stuck holds it on a ``threading.Event`` with a timeout.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.helpers import CLIENT_KEY, UPSTREAM_KEY
from trio_gateway._accounting.json_log import (
    LOG_FIELDS,
    LOGGER_NAME,
    RequestLogger,
    format_record,
)
from trio_gateway._core.kinds import FailureType, Kind
from trio_gateway._core.record import MAX_UPSTREAM_TEXT, RequestRecord, Usage


def full_record(**changes: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "request_id": "3f2a9c",
        "kind": Kind.CHAT,
        "key_name": "team-a",
        "public_model": "kilo/free-model",
        "upstream": "openrouter",
        "upstream_model": "vendor/model:free",
        "streamed": True,
        "started_at": 100.0,
        "started_wall": 1_700_000_000.5,
        "status": 200,
        "usage": Usage(
            input_tokens=12,
            output_tokens=34,
            cached_tokens=8,
            cache_write_tokens=2,
            reasoning_tokens=5,
            cost=0.0015,
        ),
        "upstream_id": "gen-1732430000-abcdef",
        "finish_reason": "stop",
        "headers_at": 100.25,
        "first_token_at": 100.5,
        "ended_at": 103.0,
        "bytes_to_client": 4096,
        "cancelled": False,
        "error_type": None,
    }
    values.update(changes)
    return RequestRecord(**values)


EXPECTED_LINE = {
    "time": "2023-11-14T22:13:20.500Z",
    "request_id": "3f2a9c",
    "kind": "chat",
    "key_name": "team-a",
    "public_model": "kilo/free-model",
    "upstream": "openrouter",
    "upstream_model": "vendor/model:free",
    "streamed": True,
    "status": 200,
    "input_tokens": 12,
    "output_tokens": 34,
    "cached_tokens": 8,
    "cache_write_tokens": 2,
    "reasoning_tokens": 5,
    "cost": 0.0015,
    "upstream_id": "gen-1732430000-abcdef",
    "finish_reason": "stop",
    "time_to_headers_ms": 250.0,
    "time_to_first_token_ms": 500.0,
    "duration_ms": 3000.0,
    "bytes_to_client": 4096,
    "cancelled": False,
    "error_type": None,
    "attempts": 1,
    "failed_attempts": None,
}


def test_line_is_one_json_object_with_exactly_the_expected_fields() -> None:
    line = format_record(full_record())
    assert "\n" not in line
    assert orjson.loads(line) == EXPECTED_LINE
    # In the documented order: LOG_FIELDS is derived from the record's FIELDS, and
    # EXPECTED_LINE is written out, so a change to either order shows here.
    assert list(orjson.loads(line)) == list(LOG_FIELDS) == list(EXPECTED_LINE)


def test_missing_figures_are_null_and_a_failure_is_named() -> None:
    record = full_record(
        status=None,
        usage=Usage(),
        upstream_id=None,
        finish_reason=None,
        headers_at=None,
        first_token_at=None,
        ended_at=100.0625,
        bytes_to_client=0,
        cancelled=True,
        error_type=FailureType.CLIENT_DISCONNECT,
    )
    line = orjson.loads(format_record(record))
    assert set(line) == set(LOG_FIELDS)
    nulls = {
        "status", "input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens",
        "reasoning_tokens", "cost", "upstream_id", "finish_reason", "time_to_headers_ms",
        "time_to_first_token_ms", "failed_attempts",
    }  # fmt: skip
    assert {name for name, value in line.items() if value is None} == nulls
    assert line["duration_ms"] == 62.5
    assert line["cancelled"] is True
    assert line["error_type"] == "client_disconnect"


@dataclass(slots=True)
class _RecordWithSecrets(RequestRecord):
    """A record that grew fields which must never reach a log line."""

    api_key: str = UPSTREAM_KEY
    client_key: str = CLIENT_KEY
    prompt: str = "PROMPT-TEXT: tell me the launch codes"
    completion: str = "COMPLETION-TEXT: 0000"


def test_line_holds_no_key_and_no_text_whatever_the_record_carries() -> None:
    base = full_record()
    fields = {name: getattr(base, name) for name in RequestRecord.__dataclass_fields__}
    line = format_record(_RecordWithSecrets(**fields))
    assert orjson.loads(line) == EXPECTED_LINE  # only the allowlisted fields
    for secret in (UPSTREAM_KEY, CLIENT_KEY, "sk-", "PROMPT-TEXT", "COMPLETION-TEXT"):
        assert secret not in line
    assert '"key_name":"team-a"' in line  # the key's configured name, never the key


def test_text_from_the_upstream_is_bounded_and_always_serialisable() -> None:
    record = full_record(upstream_id="x" * 100_000, finish_reason="stop\ud800\n{")
    line = format_record(record)
    assert "\n" not in line
    parsed = orjson.loads(line)
    assert parsed["upstream_id"] == "x" * MAX_UPSTREAM_TEXT
    assert parsed["finish_reason"] == "stop?\n{"
    assert len(line) < 2 * MAX_UPSTREAM_TEXT + len(format_record(full_record()))


def test_file_destination_appends_one_line_per_request(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    path.write_text('{"earlier":"line"}\n')
    records = [full_record(request_id=str(n), status=200 + n) for n in range(3)]
    with RequestLogger(str(path), "info") as log:
        for record in records:
            log.log(record)
    assert path.read_text().splitlines() == [
        '{"earlier":"line"}',
        *(format_record(record) for record in records),
    ]


def test_two_loggers_never_write_each_others_lines(tmp_path: Path) -> None:
    first_path, second_path = tmp_path / "a.log", tmp_path / "b.log"
    with RequestLogger(str(first_path)) as first, RequestLogger(str(second_path)) as second:
        first.log(full_record(request_id="a"))
        second.log(full_record(request_id="b"))
    assert [orjson.loads(x)["request_id"] for x in first_path.read_text().splitlines()] == ["a"]
    assert [orjson.loads(x)["request_id"] for x in second_path.read_text().splitlines()] == ["b"]


def test_stderr_destination(capsys: pytest.CaptureFixture[str]) -> None:
    with RequestLogger("-", "info") as log:
        log.log(full_record())
    captured = capsys.readouterr()
    assert captured.err == format_record(full_record()) + "\n"
    assert captured.out == ""


def test_logging_destination_uses_the_named_logger_at_the_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    with RequestLogger("logging", "warning") as log:
        log.log(full_record())
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (LOGGER_NAME, logging.WARNING, format_record(full_record()))
    ]


def test_logging_destination_leaves_level_filtering_to_the_application(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    with RequestLogger("logging", "debug") as log:
        log.log(full_record())
    assert caplog.records == []


def test_off_opens_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    with RequestLogger(str(path), "off") as log:
        log.log(full_record())
    assert not path.exists()


def test_bad_settings_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        RequestLogger("-", "loud")
    with pytest.raises(ValueError, match="max_pending must be at least 1"):
        RequestLogger("-", max_pending=0)
    with pytest.raises(OSError, match="no-such-dir"):
        RequestLogger(str(tmp_path / "no-such-dir" / "requests.log"))


def test_close_writes_what_is_pending_and_later_lines_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "requests.log"
    log = RequestLogger(str(path))
    for n in range(500):
        log.log(full_record(request_id=str(n)))
    log.close()
    log.log(full_record(request_id="late"))
    log.close()  # twice is fine
    ids = [orjson.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == [str(n) for n in range(500)]
    assert log.dropped == 0


async def test_aclose_from_a_trio_task(tmp_path: Path) -> None:
    with trio.fail_after(10):  # a real thread: an absolute bound (conftest.py rule 3)
        path = tmp_path / "requests.log"
        log = RequestLogger(str(path))
        log.log(full_record())
        await log.aclose()
        assert path.read_text() == format_record(full_record()) + "\n"


class _StuckStream:
    """A stderr whose writes wait until ``release`` is set, or give up after 5 s."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.gave_up = False  # a write waited the full 5 s: the caller was held up
        self.lines: list[str] = []
        self.wrote = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        if not self.release.wait(timeout=5):
            self.gave_up = True
        self.lines.append(text)
        self.wrote.set()
        return len(text)

    def flush(self) -> None:
        pass


def test_a_stuck_destination_never_blocks_the_caller_and_drops_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = _StuckStream()
    monkeypatch.setattr(sys, "stderr", stream)
    log = RequestLogger("-", max_pending=2)
    try:
        log.log(full_record(request_id="0"))
        assert stream.entered.wait(timeout=10)  # the worker holds line 0, the queue is empty
        for n in range(1, 6):
            log.log(full_record(request_id=str(n)))  # returns at once though the write hangs
        assert not stream.gave_up
        assert log.dropped == 3  # lines 1 and 2 fit in the queue
    finally:
        stream.release.set()
        log.close()
    ids = [orjson.loads(text)["request_id"] for text in "".join(stream.lines).splitlines()]
    assert ids == ["0", "1", "2"]


async def test_a_cancelled_aclose_returns_and_the_worker_finishes_alone(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    stream = _StuckStream()
    monkeypatch.setattr(sys, "stderr", stream)
    log = RequestLogger("-")
    log.log(full_record())
    assert await trio.to_thread.run_sync(stream.entered.wait, 10)
    with trio.move_on_after(30) as deadline:  # a shutdown deadline
        await log.aclose()
    assert deadline.cancelled_caught
    assert stream.lines == []  # the write is still stuck, and nobody waits for it
    stream.release.set()
    assert await trio.to_thread.run_sync(stream.wrote.wait, 10)
    assert stream.lines == [format_record(full_record()) + "\n"]
    assert not stream.gave_up
