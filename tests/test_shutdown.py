"""Shutdown in steps: the first signal drains, the second ends the grace, the third exits.

Rules, beyond those of ``tests/conftest.py``:

* The signal tests run ``trio-gateway serve --config`` as a process, in
  front of a :class:`~trio_gateway.testing.mock_upstream.MockUpstream` that
  streams slowly (an event every 50 ms, far more events than the test
  lasts), with a usage database in ``tmp_path``. Signals go to that process
  only. The test sends the next signal once the gateway has logged that it
  acted on the one before (trio merges signals that arrive together).
* The same steps run in process through :func:`serve`'s two triggers, on a
  real hypercorn (real time: trio's autojump clock would also jump while
  tasks wait on sockets, and fire the grace for no reason). Their exact
  timing is checked in memory, on the mock clock, against the gateway alone.
* The grace (``timeouts.shutdown``) is 60 s everywhere, so that anything
  ending within a few seconds ended because of the second step.
* Every test has an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    STALL,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    ListSink,
    make_config,
)
from trio_gateway._core.config import Timeouts, hash_key
from trio_gateway._core.kinds import FailureType
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.serve import _ShutdownSignals, serve
from trio_gateway.sse import SSEDecoder, SSEEvent
from trio_gateway.testing.mock_upstream import MockUpstream, Script

TIME_LIMIT = 30
UPSTREAM_KEY = "shutdown-upstream-secret"
GRACE = 60
DATA = Path(__file__).parent / "data"
PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}


def payload(kind: str) -> dict[str, Any]:
    if kind == "responses":
        return {"model": PUBLIC_MODEL, "stream": True, "input": "hi"}
    return {"model": PUBLIC_MODEL, "stream": True, "max_tokens": 9, "messages": []}


def assert_ends_with_the_shutdown_error(kind: str, events: list[SSEEvent]) -> None:
    """The last event is the kind's error event for a shutdown; no clean end came before."""
    *before, last = events
    data = orjson.loads(last.data or "")
    if kind == "chat":
        assert (data["error"]["type"], data["error"]["code"]) == ("shutdown", 503)
    elif kind == "messages":
        assert last.event == "error"
        assert data["type"] == "error"
        assert data["error"]["message"] == "the gateway is shutting down"
    else:
        assert (data["type"], data["code"]) == ("error", "shutdown")
    assert before, "the stream ran before it was stopped"
    for event in before:
        assert event.data != "[DONE]"
        assert event.event not in ("message_stop", "response.completed", "error")


@dataclass
class Stream:
    """One streamed answer read by a client, as it arrives."""

    kind: str
    body: bytearray = field(default_factory=bytearray)
    started: trio.Event = field(default_factory=trio.Event)  # some bytes arrived
    grew_after: int | None = None  # set to len(body) to ask for more bytes...
    grew: trio.Event = field(default_factory=trio.Event)  # ...and this is set when they come
    ended: trio.Event = field(default_factory=trio.Event)  # the whole body arrived
    ended_at: float | None = None

    async def run(self, client: httpx.AsyncClient, url: str) -> None:
        """Read the answer to the end (httpx raises if the body is cut). A checkpoint."""
        request = client.stream("POST", url + PATHS[self.kind], json=payload(self.kind))
        async with request as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                self.body += chunk
                self.started.set()
                if self.grew_after is not None and len(self.body) > self.grew_after:
                    self.grew.set()
        self.ended_at = trio.current_time()
        self.ended.set()

    @property
    def events(self) -> list[SSEEvent]:
        decoder = SSEDecoder()
        return decoder.feed(bytes(self.body)) + decoder.close()


async def open_streams(
    nursery: trio.Nursery, client: httpx.AsyncClient, url: str, per_kind: int
) -> list[Stream]:
    """``per_kind`` streams of each kind, each with bytes arrived. A checkpoint."""
    streams = [Stream(kind) for kind in PATHS for _ in range(per_kind)]
    for stream in streams:
        nursery.start_soon(stream.run, client, url)
    for stream in streams:
        await stream.started.wait()
    return streams


# -- trio-gateway serve as a process --------------------------------------------


@dataclass
class ServeProcess:
    """A running ``trio-gateway serve``: its process, URL, and what it wrote to stderr."""

    process: trio.Process
    stderr: bytearray = field(default_factory=bytearray)
    url: str = ""
    stderr_closed: trio.Event = field(default_factory=trio.Event)
    _changed: trio.Event = field(default_factory=trio.Event)

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(65536):
            self.stderr += chunk
            self._changed.set()
            self._changed = trio.Event()
        self.stderr_closed.set()
        self._changed.set()

    async def logged(self, text: bytes) -> None:
        """Return once ``text`` is in the process's stderr. A checkpoint."""
        while text not in self.stderr:
            assert not self.stderr_closed.is_set(), f"never logged {text!r}: {self.stderr!r}"
            await self._changed.wait()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


def write_config(tmp_path: Path, mock: MockUpstream) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[upstreams.mock]
base_url = "{mock.base_url}"
api_key_env = "SHUTDOWN_UPSTREAM_KEY"

[models."{PUBLIC_MODEL}"]
upstream = "mock"
upstream_model = "vendor/model:free"
free = true

[[keys]]
name = "shutdown"
sha256 = "{hash_key(CLIENT_KEY)}"

[timeouts]
shutdown = {GRACE}

[accounting]
database = "usage.db"

[log]
level = "off"
"""
    )
    return config


@asynccontextmanager
async def serve_process(config: Path) -> AsyncIterator[ServeProcess]:
    """Run ``trio-gateway serve`` on a free loopback port; kill it if it is still running
    when the block ends (the tests stop it themselves)."""
    command = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
    process = await trio.lowlevel.open_process(
        [*command, "--bind", "127.0.0.1:0"],
        env={**os.environ, "SHUTDOWN_UPSTREAM_KEY": UPSTREAM_KEY},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert process.stderr is not None
    served = ServeProcess(process)
    try:
        async with process.stderr, trio.open_nursery() as nursery:
            nursery.start_soon(served.collect, process.stderr)
            await served.logged(b"listening on ")
            served.url = bytes(served.stderr).split(b"listening on ", 1)[1].split()[0].decode()
            yield served
            if process.returncode is not None:
                await served.stderr_closed.wait()  # all it wrote, for the test to check
            nursery.cancel_scope.cancel(reason="the test is done with the process")
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def usage_rows(database: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT kind, status, error_type, cancelled FROM requests").fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_signal_stops_every_stream_with_its_error_event_and_record(
    tmp_path: Path, nursery: trio.Nursery, signum: int
):
    """The first signal drains, and the streams go on; the second stops them all at once,
    each with its kind's error event and its record, and the process exits 0 long before
    the grace would have ended."""
    mock = MockUpstream(Script(tokens=10_000, pace=0.05), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with (
            serve_process(write_config(tmp_path, mock)) as served,
            httpx.AsyncClient(headers={"authorization": f"Bearer {CLIENT_KEY}"}) as client,
            trio.open_nursery() as clients,
        ):
            streams = await open_streams(clients, client, served.url, per_kind=3)
            served.signal(signum)
            await served.logged(b"Shutting down: open requests have 60 s to finish")
            for stream in streams:  # the grace: every stream goes on
                stream.grew_after = len(stream.body)
            for stream in streams:
                await stream.grew.wait()
            assert not any(stream.ended.is_set() for stream in streams)
            served.signal(signum)
            second_at = trio.current_time()
            status = await served.process.wait()
            exited_after = trio.current_time() - second_at
    assert b"Grace cut short: every open request is stopped" in served.stderr
    assert status == 0
    assert exited_after < 10  # about 0.07 s here; the grace was 60 s
    for stream in streams:
        assert stream.ended_at is not None
        assert stream.ended_at - second_at < 10
        assert_ends_with_the_shutdown_error(stream.kind, stream.events)
    rows = usage_rows(tmp_path / "usage.db")
    assert sorted(rows) == sorted((stream.kind, 200, "shutdown", 0) for stream in streams)


async def test_a_third_signal_ends_the_process_at_once(tmp_path: Path, nursery: trio.Nursery):
    """A request whose body never comes holds a drain past its second step (the drain
    stops upstream work only); a third signal then ends the process as SIGTERM does."""
    mock = MockUpstream(Script(tokens=10_000, pace=0.05), api_key=UPSTREAM_KEY)
    await nursery.start(mock.serve)
    with trio.fail_after(TIME_LIMIT):
        async with serve_process(write_config(tmp_path, mock)) as served:
            host, port = served.url.removeprefix("http://").rsplit(":", 1)
            client = await trio.open_tcp_stream(host, int(port))
            async with client:
                await client.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
                    b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
                    b"content-length: 1000\r\nexpect: 100-continue\r\n\r\n" % CLIENT_KEY.encode()
                )
                # The 100 comes once hypercorn has handed the request to the app.
                assert (await client.receive_some(1024)).startswith(b"HTTP/1.1 100 ")
                for log in (b"Shutting down", b"Grace cut short"):
                    served.signal(signal.SIGTERM)
                    await served.logged(log)
                served.signal(signal.SIGTERM)
                third_at = trio.current_time()
                status = await served.process.wait()
                exited_after = trio.current_time() - third_at
    assert status == -signal.SIGTERM  # ended by the signal, not by serve returning
    assert exited_after < 5
    assert b"signal again to exit at once" in served.stderr


# -- in process: serve()'s triggers through a real hypercorn ---------------------------


def stalled_streams(request: httpx.Request) -> FakeResponse:
    """The first four events of the kind's example stream, then nothing, for ever."""
    kind = next(kind for kind, path in PATHS.items() if request.url.path.endswith(path[3:]))
    events = (DATA / f"{kind}.sse").read_bytes().split(b"\n\n")
    return FakeResponse(body=[b"".join(event + b"\n\n" for event in events[:4]), STALL])


async def test_end_grace_trigger_stops_open_streams_at_once(nursery: trio.Nursery):
    """``serve(shutdown_trigger=..., end_grace_trigger=...)``: the second trigger stops
    every open stream at once, each with its error event and its record, and serve
    returns, though the grace has most of its 60 s left."""
    sink = ListSink()
    gateway = Gateway(
        make_config(timeouts=Timeouts(shutdown=GRACE)),
        transport=FakeUpstream(stalled_streams),
        sinks=[sink],
    )
    shutdown, end_grace, served = trio.Event(), trio.Event(), trio.Event()

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(
            gateway,
            "127.0.0.1:0",
            shutdown_trigger=shutdown.wait,
            end_grace_trigger=end_grace.wait,
            task_status=task_status,
        )
        served.set()

    with trio.fail_after(TIME_LIMIT):
        [url] = await nursery.start(run_server)
        async with (
            httpx.AsyncClient(headers={"authorization": f"Bearer {CLIENT_KEY}"}) as client,
            trio.open_nursery() as clients,
        ):
            streams = await open_streams(clients, client, url, per_kind=2)
            shutdown.set()
            await trio.testing.wait_all_tasks_blocked()
            assert not served.is_set()
            assert not any(stream.ended.is_set() for stream in streams)
            end_grace.set()
            ended_at = trio.current_time()
            await served.wait()
            took = trio.current_time() - ended_at
    assert took < 5  # about 0.01 s here
    for stream in streams:
        assert_ends_with_the_shutdown_error(stream.kind, stream.events)
    assert sorted(r.kind.label for r in sink.records) == sorted(s.kind for s in streams)
    assert {r.error_type for r in sink.records} == {FailureType.SHUTDOWN}


# -- the steps' timing, on the mock clock ---------------------------------------


async def test_end_grace_stops_every_stream_at_that_instant(
    autojump_clock: trio.testing.MockClock,
):
    """What the second step relies on: drain at t=1 with a 60 s grace, end_grace at t=4,
    and every stream ends at exactly t=4, with its error event and its record."""
    sink = ListSink()
    upstream = FakeUpstream(stalled_streams)
    gateway = Gateway(
        make_config(timeouts=Timeouts(shutdown=GRACE, idle=0)), transport=upstream, sinks=[sink]
    )
    calls = {kind: AsgiCall.json(payload(kind), path=path) for kind, path in PATHS.items()}
    ended_at: dict[str, float] = {}

    async def run(kind: str, call: AsgiCall) -> None:
        await call.run(gateway)
        ended_at[kind] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for kind, call in calls.items():
            nursery.start_soon(run, kind, call)
        await trio.sleep(1)
        nursery.start_soon(partial(gateway.drain, GRACE))
        await trio.sleep(3)
        assert not ended_at
        gateway.end_grace()
    assert ended_at == {kind: pytest.approx(4) for kind in PATHS}
    for kind, call in calls.items():
        assert call.ended
        assert_ends_with_the_shutdown_error(kind, call.events)
    assert [body.closed_at for body in upstream.bodies] == [pytest.approx(4)] * 3
    assert [r.error_type for r in sink.records] == [FailureType.SHUTDOWN] * 3


async def test_signals_step_through_the_shutdown(autojump_clock: trio.testing.MockClock):
    """The first signal is the shutdown trigger, the second the end-grace trigger, and
    the third ends the process (here: is reported to a stand-in)."""
    ended: list[int] = []
    signals = _ShutdownSignals(end_process=ended.append)
    send, receive = trio.open_memory_channel[int](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(signals.receive, receive)
        await send.send(signal.SIGTERM)
        await signals.wait_for(1)
        with trio.move_on_after(10) as waited:
            await signals.wait_for(2)
        assert waited.cancelled_caught
        await send.send(signal.SIGINT)
        await signals.wait_for(2)
        await trio.testing.wait_all_tasks_blocked()
        assert ended == []
        await send.send(signal.SIGTERM)
        await trio.testing.wait_all_tasks_blocked()
        assert ended == [signal.SIGTERM]
        nursery.cancel_scope.cancel()
