"""``serve --workers N``: one parent, N worker processes, one port.

Rules, beyond those of ``tests/conftest.py``:

* Every test runs ``trio-gateway serve`` as a process on 127.0.0.1 port 0,
  in front of a :class:`~trio_gateway.testing.mock_upstream.MockUpstream` in
  the test's own Trio run, with its usage database in ``tmp_path``. The
  parent prints ``trio-gateway listening on URL`` once every worker is
  ready; nothing is sent before.
* What one worker did is read from outside it, never from a header it adds:
  its pid from ``/proc`` (the parent's children), the listening socket from
  ``/proc/net/tcp`` and ``/proc/<pid>/fd``, and its own figures from its own
  files in the metrics folder (``PROMETHEUS_MULTIPROC_DIR``, read from
  ``/proc/<pid>/environ``), before ``/metrics`` sums them.
* Signals go to the parent only (except where a test kills one worker); the
  test sends the next one once every worker has logged that it acted on the
  one before.
* Every test has an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CLIENT_KEY, PUBLIC_MODEL
from tests.redis_support import eventually, require_redis
from tests.test_shutdown import (
    PATHS,
    ServeProcess,
    Stream,
    assert_ends_with_the_shutdown_error,
    payload,
)
from trio_gateway._cli import main
from trio_gateway._core.config import hash_key
from trio_gateway.testing.mock_upstream import MockUpstream, Script

TIME_LIMIT = 40
UPSTREAM_KEY = "workers-upstream-secret"
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}
REQUESTS = "trio_gateway_requests_total"
ACTIVE = "trio_gateway_active_streams"
REFUSAL = (
    "trio-gateway: config error: limits: workers = 2 needs [limits] redis_url; "
    "rate limits would be enforced per worker\n"
)


def write_config(
    tmp_path: Path,
    mock: MockUpstream | None,
    *,
    workers: int | None = None,
    grace: float = 60,
    rpm: int | None = None,
    redis_url: str | None = None,
) -> Path:
    config = tmp_path / "gateway.toml"
    server = f"[server]\nworkers = {workers}\n" if workers is not None else ""
    limit = f"rpm = {rpm}\n" if rpm is not None else ""
    limits = (
        f'[limits]\nredis_url = "{redis_url}"\nredis_prefix = "test-workers-{os.getpid()}:"\n'
        if redis_url is not None
        else ""
    )
    config.write_text(
        f"""{server}
[upstreams.mock]
base_url = "{mock.base_url if mock is not None else "http://127.0.0.1:9/v1"}"
api_key_env = "WORKERS_UPSTREAM_KEY"

[models."{PUBLIC_MODEL}"]
upstream = "mock"
upstream_model = "vendor/model:free"
free = true

[[keys]]
name = "workers"
sha256 = "{hash_key(CLIENT_KEY)}"
{limit}
[timeouts]
shutdown = {grace}

[accounting]
database = "usage.db"

[log]
level = "off"

{limits}"""
    )
    return config


@asynccontextmanager
async def serve_workers(config: Path, *options: str) -> AsyncIterator[ServeProcess]:
    """Run ``trio-gateway serve`` on a free loopback port with ``options``; yield once it
    listens. Kill it, and its workers, if they are still running when the block ends."""
    command = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
    process = await trio.lowlevel.open_process(
        [*command, "--bind", "127.0.0.1:0", *options],
        env={**os.environ, "WORKERS_UPSTREAM_KEY": UPSTREAM_KEY},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert process.stderr is not None
    served = ServeProcess(process)
    workers: set[int] = set()
    try:
        async with process.stderr, trio.open_nursery() as nursery:
            nursery.start_soon(served.collect, process.stderr)
            await served.logged(b"listening on ")
            served.url = bytes(served.stderr).split(b"listening on ", 1)[1].split()[0].decode()
            workers = worker_pids(process.pid)
            yield served
            if process.returncode is not None:
                await served.stderr_closed.wait()  # all it wrote, for the test to check
            nursery.cancel_scope.cancel(reason="the test is done with the process")
    finally:
        for pid in workers | (worker_pids(process.pid) if process.returncode is None else set()):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


# -- reading a worker from outside ----------------------------------------------------


def worker_pids(parent: int) -> set[int]:
    """The live child processes of ``parent``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def listening_inode(url: str) -> str:
    """The inode of the socket listening on ``url``'s port, from /proc/net/tcp."""
    port = int(url.rsplit(":", 1)[1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on {url}")


def holds_socket(pid: int, inode: str) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return True
        except OSError:
            continue
    return False


def metrics_dir(worker: int) -> Path:
    """The metrics folder the parent gave ``worker``, from its environment."""
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    [value] = [v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value.split(b"=", 1)[1].decode())


def own_figures(directory: Path, pid: int) -> dict[str, float]:
    """One worker's own figures, from its own files alone: sample name -> sum over labels."""
    files = [str(path) for path in directory.glob(f"*_{pid}.db")]
    figures: dict[str, float] = {}
    merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
    for metric in merged:
        for sample in metric.samples:
            figures[sample.name] = figures.get(sample.name, 0.0) + sample.value
    return figures


def scraped(text: str) -> dict[str, float]:
    """A /metrics answer, parsed by Prometheus's parser: sample name -> sum over labels."""
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures[sample.name] = figures.get(sample.name, 0.0) + sample.value
    return figures


def usage_rows(database: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT kind, status, error_type FROM requests").fetchall()
    conn.close()
    return rows


async def logged_times(served: ServeProcess, text: bytes, times: int) -> None:
    """Return once ``text`` is in the process's stderr ``times`` times. A checkpoint."""
    while served.stderr.count(text) < times:
        assert not served.stderr_closed.is_set(), f"{text!r} not {times} times: {served.stderr!r}"
        await trio.sleep(0.01)


async def counted(url: str, requests: int) -> bool:
    """Whether /metrics counts ``requests`` requests (a request is counted when its record
    is made, just after its last byte). A checkpoint."""
    async with httpx.AsyncClient() as client:
        figures = scraped((await client.get(url + "/metrics")).text)
    return figures.get(REQUESTS) == requests


async def refused(url: str) -> bool:
    """Whether a new connection to ``url`` is refused. A checkpoint."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return True
    await stream.aclose()
    return False


async def chat(client: httpx.AsyncClient, url: str) -> None:
    """One whole streamed chat answer. A checkpoint."""
    response = await client.post(url + PATHS["chat"], json=payload("chat"))
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")


async def streams_in_every_worker(
    nursery: trio.Nursery, client: httpx.AsyncClient, url: str, workers: set[int], each: int
) -> list[Stream]:
    """Open streams, three kinds at a time, until every worker sends at least ``each``
    (its own live gauge says so); every one has bytes arrived. A checkpoint."""
    directory = metrics_dir(next(iter(workers)))
    streams: list[Stream] = []
    while True:
        batch = [Stream(kind) for kind in PATHS]
        for stream in batch:
            nursery.start_soon(stream.run, client, url)
        for stream in batch:
            await stream.started.wait()
        streams += batch
        counts = {pid: own_figures(directory, pid)[ACTIVE] for pid in workers}
        if min(counts.values()) >= each:
            assert sum(counts.values()) == len(streams)
            return streams


# -- the tests -------------------------------------------------------------------------


async def test_two_workers_share_one_port_and_both_serve(tmp_path: Path, nursery: trio.Nursery):
    """Both workers hold the one listening socket the parent made, and requests spread
    over both: each worker's own request counter is above zero, and they add up."""
    mock = MockUpstream(Script(tokens=20, pace=0.005), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(write_config(tmp_path, mock, workers=2)) as served,
            httpx.AsyncClient(headers=AUTH, limits=httpx.Limits(max_keepalive_connections=0)) as c,
        ):
            workers = worker_pids(served.process.pid)
            assert len(workers) == 2
            inode = listening_inode(served.url)
            assert all(holds_socket(pid, inode) for pid in [served.process.pid, *workers])
            async with trio.open_nursery() as clients:
                for _ in range(40):
                    clients.start_soon(chat, c, served.url)
            directory = metrics_dir(next(iter(workers)))
            counts: dict[int, float] = {}

            async def counted_all() -> bool:
                # A request is counted when its record is made, just after its last byte.
                counts.update({pid: own_figures(directory, pid)[REQUESTS] for pid in workers})
                return sum(counts.values()) == 40

            await eventually(counted_all)
            served.signal(signal.SIGTERM)
            status = await served.process.wait()
    assert min(counts.values()) > 0, counts
    assert sum(counts.values()) == 40
    assert status == 0
    assert bytes(served.stderr).count(b"trio-gateway listening on ") == 1
    assert not directory.exists()  # the parent removed the metrics folder
    assert len(usage_rows(tmp_path / "usage.db")) == 40


async def test_the_first_signal_drains_every_worker_with_error_events_and_records(
    tmp_path: Path, nursery: trio.Nursery
):
    """One SIGTERM to the parent: every worker drains; after the grace (2 s) each open
    stream, in both workers, ends with its kind's shutdown error event and leaves its
    record, and the parent exits 0 once both workers have."""
    mock = MockUpstream(Script(tokens=10_000, pace=0.05), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(write_config(tmp_path, mock, workers=2, grace=2)) as served,
            httpx.AsyncClient(headers=AUTH) as client,
            trio.open_nursery() as clients,
        ):
            workers = worker_pids(served.process.pid)
            streams = await streams_in_every_worker(clients, client, served.url, workers, 2)
            served.signal(signal.SIGTERM)
            signalled_at = trio.current_time()
            status = await served.process.wait()
            exited_after = trio.current_time() - signalled_at
    assert status == 0
    assert 2 <= exited_after < 10
    assert bytes(served.stderr).count(b"Shutting down: open requests have 2 s") == 2
    for stream in streams:
        assert stream.ended_at is not None
        assert stream.ended_at - signalled_at >= 2  # the grace was kept
        assert_ends_with_the_shutdown_error(stream.kind, stream.events)
    rows = usage_rows(tmp_path / "usage.db")
    assert sorted(rows) == sorted((stream.kind, 200, "shutdown") for stream in streams)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_signal_cuts_every_workers_grace(
    tmp_path: Path, nursery: trio.Nursery, signum: int
):
    """The first signal drains both workers and the streams go on, while new connections
    are refused; the second, forwarded to both, stops every stream at once with its error
    event and record, and the parent exits 0 long before the 60 s grace."""
    mock = MockUpstream(Script(tokens=10_000, pace=0.05), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(write_config(tmp_path, mock, workers=2)) as served,
            httpx.AsyncClient(headers=AUTH) as client,
            trio.open_nursery() as clients,
        ):
            workers = worker_pids(served.process.pid)
            streams = await streams_in_every_worker(clients, client, served.url, workers, 2)
            served.signal(signum)
            await logged_times(served, b"Shutting down: open requests have 60 s", 2)
            await eventually(partial(refused, served.url))  # as with one process
            for stream in streams:  # the grace: every stream goes on
                stream.grew_after = len(stream.body)
            for stream in streams:
                await stream.grew.wait()
            assert not any(stream.ended.is_set() for stream in streams)
            served.signal(signum)
            second_at = trio.current_time()
            status = await served.process.wait()
            exited_after = trio.current_time() - second_at
    assert bytes(served.stderr).count(b"Grace cut short: every open request is stopped") == 2
    assert status == 0
    assert exited_after < 10
    for stream in streams:
        assert stream.ended_at is not None
        assert stream.ended_at - second_at < 10
        assert_ends_with_the_shutdown_error(stream.kind, stream.events)
    rows = usage_rows(tmp_path / "usage.db")
    assert sorted(rows) == sorted((stream.kind, 200, "shutdown") for stream in streams)


async def test_a_killed_worker_is_logged_and_replaced_and_the_port_keeps_serving(
    tmp_path: Path, nursery: trio.Nursery
):
    """SIGKILL one worker: the other goes on serving; the parent logs the death with the
    pid and the signal, starts a replacement on the same socket, and marks the dead
    worker's live gauges dead; a SIGTERM later, the parent still exits 0."""
    mock = MockUpstream(Script(tokens=5), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(write_config(tmp_path, mock, workers=2)) as served,
            httpx.AsyncClient(headers=AUTH, limits=httpx.Limits(max_keepalive_connections=0)) as c,
        ):
            before = worker_pids(served.process.pid)
            directory = metrics_dir(next(iter(before)))
            victim = min(before)
            assert (directory / f"gauge_livesum_{victim}.db").exists()
            os.kill(victim, signal.SIGKILL)
            await served.logged(f"(pid {victim}) was killed by SIGKILL; starting another".encode())
            for _ in range(10):  # served all the while, by the other worker
                await chat(c, served.url)
            await served.logged(b") is serving")
            after = worker_pids(served.process.pid)
            [replacement] = after - before
            assert holds_socket(replacement, listening_inode(served.url))
            assert not (directory / f"gauge_livesum_{victim}.db").exists()
            for _ in range(20):
                await chat(c, served.url)
            served.signal(signal.SIGTERM)
            status = await served.process.wait()
    assert status == 0
    assert re.search(rb"worker [12] \(pid %d\) is serving" % replacement, served.stderr)
    assert len(usage_rows(tmp_path / "usage.db")) == 30


async def test_metrics_sum_over_the_workers(tmp_path: Path, nursery: trio.Nursery):
    """Whichever worker answers a scrape, /metrics shows the whole gateway: requests_total
    is the K requests sent, the live stream gauge the streams open in both workers, and
    the usage store's counters every record (each worker copies its own every second)."""
    slow, fast = Script(tokens=10_000, pace=0.05), Script(tokens=5)
    mock = MockUpstream(fast, api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    k = 24
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(write_config(tmp_path, mock, workers=2)) as served,
            httpx.AsyncClient(headers=AUTH, limits=httpx.Limits(max_keepalive_connections=0)) as c,
        ):
            workers = worker_pids(served.process.pid)
            async with trio.open_nursery() as clients:
                for _ in range(k):
                    clients.start_soon(chat, c, served.url)
            await eventually(partial(counted, served.url, k))
            directory = metrics_dir(next(iter(workers)))
            for pid in workers:
                assert own_figures(directory, pid)[REQUESTS] > 0
            for _ in range(10):  # new connections: both workers answer some
                figures = scraped((await c.get(served.url + "/metrics")).text)
                assert figures[REQUESTS] == k
                assert figures[ACTIVE] == 0
            await trio.sleep(1.5)  # every worker has copied its store's figures
            figures = scraped((await c.get(served.url + "/metrics")).text)
            assert figures["trio_gateway_usage_records_written_total"] == k
            mock.script = slow
            async with trio.open_nursery() as clients:
                streams = await streams_in_every_worker(clients, c, served.url, workers, 1)
                for _ in range(10):
                    figures = scraped((await c.get(served.url + "/metrics")).text)
                    assert figures[ACTIVE] == len(streams)
                    assert figures["trio_gateway_upstream_open_exchanges"] == len(streams)
                clients.cancel_scope.cancel(reason="the clients leave")
            served.signal(signal.SIGTERM)
            status = await served.process.wait()
    assert status == 0


async def test_a_worker_that_fails_at_start_stops_the_gateway_with_its_status(
    tmp_path: Path, nursery: trio.Nursery
):
    """A usage database that is not one: each worker fails at start with the config
    error's status, and so does the parent, which never says it listens."""
    mock = MockUpstream(Script(tokens=5), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    config = write_config(tmp_path, mock, workers=2)
    (tmp_path / "usage.db").write_bytes(b"not a database, " * 100)
    with trio.fail_after(TIME_LIMIT):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)],
            env={**os.environ, "WORKERS_UPSTREAM_KEY": UPSTREAM_KEY},
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    assert b"trio-gateway: config error: accounting.database: " in result.stderr
    assert b"before it was ready; stopping" in result.stderr
    assert b"listening on" not in result.stderr


async def test_the_parent_gives_up_after_five_failures_in_a_row(
    tmp_path: Path, nursery: trio.Nursery
):
    """A replacement that cannot start (its config file is gone) is retried with a
    growing delay; after five failures in a row the parent stops the other worker and
    exits with the failure's status."""
    mock = MockUpstream(Script(tokens=5), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    config = write_config(tmp_path, mock, workers=2)
    with trio.fail_after(TIME_LIMIT):
        async with serve_workers(config) as served:
            config.unlink()
            os.kill(min(worker_pids(served.process.pid)), signal.SIGKILL)
            status = await served.process.wait()
    assert status == 2
    log = bytes(served.stderr)
    assert b"starting another in 0.1 s" in log
    assert b"starting another in 0.8 s" in log
    assert b"5 failures in a row: stopping" in log
    assert log.count(b"Shutting down") == 1  # the other worker drained


async def test_workers_drain_when_the_parent_is_killed(tmp_path: Path, nursery: trio.Nursery):
    """kill -9 of the parent: each worker sees its control socket close, drains as on a
    first signal (a 1 s grace here), ends its open streams with their error events,
    writes their records, and exits. The metrics folder is left behind (nothing can
    remove it after kill -9): the test removes it."""
    mock = MockUpstream(Script(tokens=10_000, pace=0.05), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(write_config(tmp_path, mock, workers=2, grace=1)) as served,
            httpx.AsyncClient(headers=AUTH) as client,
            trio.open_nursery() as clients,
        ):
            workers = worker_pids(served.process.pid)
            left_behind = metrics_dir(next(iter(workers)))
            streams = await streams_in_every_worker(clients, client, served.url, workers, 1)
            served.process.kill()
            await served.process.wait()
            for stream in streams:
                await stream.ended.wait()
            # The workers hold the parent's stderr pipe: it closes when the last one exits.
            await served.stderr_closed.wait()
    assert not any(alive(pid) for pid in workers)
    assert left_behind.exists()
    shutil.rmtree(left_behind)
    assert bytes(served.stderr).count(b"the parent process has gone; shutting down") == 2
    for stream in streams:
        assert_ends_with_the_shutdown_error(stream.kind, stream.events)
    rows = usage_rows(tmp_path / "usage.db")
    assert sorted(rows) == sorted((stream.kind, 200, "shutdown") for stream in streams)


# -- rate limits need a shared store ---------------------------------------------------


@pytest.mark.parametrize("where", ["file", "flag"])
def test_workers_with_rate_limits_and_no_redis_refuse_to_start(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """Per-worker buckets would admit N times each limit: refused, in one line, exit 2."""
    monkeypatch.setenv("WORKERS_UPSTREAM_KEY", UPSTREAM_KEY)
    workers = 2 if where == "file" else None
    config = write_config(tmp_path, None, workers=workers, rpm=60)
    flag = ["--workers", "2"] if where == "flag" else []
    assert main(["serve", "--config", str(config), *flag]) == 2
    assert capsys.readouterr().err == REFUSAL


def test_the_workers_flag_overrides_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """``--workers 1`` with ``workers = 2`` and limits in the file: one process, so the
    limits are fine; here the bad bind that follows is what stops it."""
    monkeypatch.setenv("WORKERS_UPSTREAM_KEY", UPSTREAM_KEY)
    config = write_config(tmp_path, None, workers=2, rpm=60)
    assert main(["serve", "--config", str(config), "--workers", "1", "--bind", "nowhere"]) == 2
    assert capsys.readouterr().err == (
        "trio-gateway: config error: server.bind: expected HOST:PORT, got 'nowhere'\n"
    )


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5", "-1"])
def test_a_bad_workers_flag_is_refused(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--config", str(tmp_path / "gateway.toml"), "--workers", value])
    assert info.value.code == 2
    assert (
        f"argument --workers: expected a whole number from 1 to 64, got {value!r}"
        in capsys.readouterr().err
    )


async def test_workers_with_rate_limits_start_when_redis_holds_them(
    tmp_path: Path, nursery: trio.Nursery
):
    """With ``[limits] redis_url`` the same file starts two workers, and the limit is one
    for the whole gateway: rpm = 6 admits six requests over both workers, then 429."""
    redis_url = require_redis()
    mock = MockUpstream(Script(tokens=5), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    config = write_config(tmp_path, mock, workers=2, rpm=6, redis_url=redis_url)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_workers(config) as served,
            httpx.AsyncClient(headers=AUTH, limits=httpx.Limits(max_keepalive_connections=0)) as c,
        ):
            statuses = []
            for _ in range(10):
                response = await c.post(served.url + PATHS["chat"], json=payload("chat"))
                statuses.append(response.status_code)
            directory = metrics_dir(next(iter(worker_pids(served.process.pid))))
            per_worker = [
                own_figures(directory, pid).get(REQUESTS, 0)
                for pid in worker_pids(served.process.pid)
            ]
            served.signal(signal.SIGTERM)
            status = await served.process.wait()
    assert statuses == [200] * 6 + [429] * 4
    assert sum(per_worker) == 10
    assert status == 0
