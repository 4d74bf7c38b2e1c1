"""In-memory doubles for both ends of the gateway, driven by the Trio clock.

* :class:`FakeUpstream` is an httpx transport whose response bodies are
  scripts of byte chunks, pauses, errors and stalls, so a test chooses every
  chunk boundary and every fault (httpx's ASGITransport would buffer the
  whole body and hide all of that).
* :class:`AsgiCall` plays the client side of one ASGI request: it feeds the
  request body, records what the app sends, and can disconnect, or stop
  reading, at a chosen moment.
* :class:`ListSink` keeps the records a gateway leaves, and
  :func:`start_serving` puts a gateway on a real hypercorn for the tests
  that drive it with real clients.

Both only ever wait on Trio primitives, so under
``MockClock(autojump_threshold=0)`` every timeout fires deterministically
and at once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from hypothesis import HealthCheck, settings

from trio_gateway._core.config import (
    GatewayConfig,
    KeyEntry,
    ModelRoute,
    Timeouts,
    Upstream,
    hash_key,
)
from trio_gateway._core.record import RequestRecord
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.serve import serve
from trio_gateway.sse import SSEDecoder, SSEEvent

FUZZ_LONG = os.environ.get("TRIO_GATEWAY_FUZZ") == "long"
CLIENT_KEY = "client-key-for-tests"
UPSTREAM_KEY = "sk-upstream-secret-for-tests"
PUBLIC_MODEL = "kilo/free-model"
UPSTREAM_MODEL = "vendor/model:free"


class ListSink:
    """A record sink that keeps every record it is given.

    ``submit`` is what the usage store's is to a request: a schedule point
    that no cancellation interrupts. With ``block`` it never returns (a
    stuck sink).
    """

    def __init__(self, *, block: bool = False) -> None:
        self.records: list[RequestRecord] = []
        self.block = block
        self._changed = trio.Event()

    async def submit(self, record: RequestRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()
        if self.block:
            await trio.sleep_forever()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def nth(self, count: int, *, limit: float = 20.0) -> RequestRecord:
        """The ``count``-th record, once it has arrived. A checkpoint, bounded by ``limit``."""
        with trio.fail_after(limit):
            while len(self.records) < count:
                await self._changed.wait()
        return self.records[count - 1]


async def start_serving(nursery: trio.Nursery, gateway: Gateway) -> tuple[str, trio.Event]:
    """Serve ``gateway`` with hypercorn on 127.0.0.1 at a free port, in ``nursery``.

    A checkpoint. Returns its URL, and the event that stops it (a graceful
    shutdown) once set.
    """
    stop = trio.Event()
    urls = await nursery.start(partial(serve, gateway, "127.0.0.1:0", shutdown_trigger=stop.wait))
    return urls[0], stop


class Stall:
    """A body step: stop sending and never finish (until the reader gives up)."""


STALL = Stall()
BodyStep = bytes | float | BaseException | Stall


@dataclass
class FakeResponse:
    """What the fake upstream answers: status, headers and a body script."""

    body: Sequence[BodyStep] = ()
    status: int = 200
    content_type: str = "text/event-stream"
    headers_delay: float = 0.0  # seconds before the response headers
    error: BaseException | None = None  # raised instead of answering
    extra_headers: dict[str, str] = field(default_factory=dict)


class FakeBody(httpx.AsyncByteStream):
    """A response body that plays its script and records how it was consumed."""

    def __init__(self, steps: Sequence[BodyStep]) -> None:
        self.steps = steps
        self._next = 0
        self.chunks_yielded = 0
        self.closed_at: float | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        # A plain iterator, not an async generator: nothing to finalize if abandoned.
        while self._next < len(self.steps):
            step = self.steps[self._next]
            self._next += 1
            if isinstance(step, bytes):
                self.chunks_yielded += 1
                return step
            if isinstance(step, float):
                await trio.sleep(step)
            elif isinstance(step, Stall):
                await trio.sleep_forever()
            else:
                raise step
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()


class FakeUpstream(httpx.AsyncBaseTransport):
    """An httpx transport that answers every request from ``respond``."""

    def __init__(self, respond: FakeResponse | Callable[[httpx.Request], FakeResponse]) -> None:
        self._respond = respond
        self.requests: list[httpx.Request] = []
        self.bodies: list[FakeBody] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        answer = (
            self._respond if isinstance(self._respond, FakeResponse) else self._respond(request)
        )
        if answer.headers_delay:
            await trio.sleep(answer.headers_delay)
        if answer.error is not None:
            raise answer.error
        body = FakeBody(answer.body)
        self.bodies.append(body)
        headers = {"content-type": answer.content_type, **answer.extra_headers}
        return httpx.Response(answer.status, headers=headers, stream=body)

    @property
    def request_json(self) -> dict[str, Any]:
        value = orjson.loads(self.requests[-1].content)
        assert isinstance(value, dict)
        return value


def fuzz_settings(examples: int, long_examples: int) -> settings:
    """Hypothesis settings for a property: ``long_examples`` under ``TRIO_GATEWAY_FUZZ=long``.

    Applied per test, never loaded globally. Deadlines are off: the machine is
    shared and noisy, and a slow example is not a bug.
    """
    return settings(
        max_examples=long_examples if FUZZ_LONG else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def fuzz_seed(fixed: int) -> int:
    """A fuzz seed: ``TRIO_GATEWAY_FUZZ_SEED`` if set, random under long, else ``fixed``."""
    return int(os.environ.get("TRIO_GATEWAY_FUZZ_SEED", "0")) or (
        random.randrange(1 << 32) if FUZZ_LONG else fixed
    )


def paced(chunks: Sequence[bytes], gap: float = 0.01) -> list[BodyStep]:
    """``chunks`` as if each came in a network read of its own, ``gap`` seconds apart.

    Without pauses every chunk is there at once, like many chunks in one read,
    and the writer may gather them all into one send.
    """
    return [step for chunk in chunks for step in (gap, chunk)]


def make_config(
    *,
    free: bool = True,
    timeouts: Timeouts | None = None,
    max_event_bytes: int = 1024 * 1024,
    max_body_bytes: int = 1024 * 1024,
    auth: str = "bearer",
) -> GatewayConfig:
    return GatewayConfig(
        upstreams={
            "vendor": Upstream(
                "vendor",
                "https://upstream.invalid/api/v1",
                UPSTREAM_KEY,
                "bearer" if auth == "bearer" else "x-api-key",
            )
        },
        models={PUBLIC_MODEL: ModelRoute(PUBLIC_MODEL, "vendor", UPSTREAM_MODEL, free=free)},
        keys=(KeyEntry("tests", hash_key(CLIENT_KEY)),),
        timeouts=timeouts or Timeouts(),
        max_event_bytes=max_event_bytes,
        max_body_bytes=max_body_bytes,
    )


def make_gateway(
    respond: FakeResponse | Callable[[httpx.Request], FakeResponse], **config: Any
) -> tuple[Gateway, FakeUpstream]:
    upstream = FakeUpstream(respond)
    return Gateway(make_config(**config), transport=upstream), upstream


@dataclass
class AsgiCall:
    """One ASGI HTTP request played against an app, entirely in memory."""

    method: str = "POST"
    path: str = "/v1/chat/completions"
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body_chunk_size: int | None = None  # deliver the request body in pieces
    send_delay: float = 0.0  # seconds each body send takes: a slow client
    # Like hypercorn: report http.disconnect once the whole response went out.
    disconnect_when_done: bool = False
    status: int | None = None
    response_headers: dict[bytes, bytes] = field(default_factory=dict)
    parts: list[bytes] = field(default_factory=list)
    part_times: list[float] = field(default_factory=list)
    ended: bool = False
    disconnected: trio.Event = field(default_factory=trio.Event)
    reading: trio.Event = field(default_factory=trio.Event)  # cleared: the client stalls

    def __post_init__(self) -> None:
        self.reading.set()

    @classmethod
    def json(cls, payload: dict[str, Any], **kwargs: Any) -> AsgiCall:
        headers = [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
            *kwargs.pop("headers", []),
        ]
        return cls(body=orjson.dumps(payload), headers=headers, **kwargs)

    @property
    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "headers": self.headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
        }

    async def run(self, app: Gateway) -> AsgiCall:
        """Play the request to the end (or until the app returns). A checkpoint."""
        size = self.body_chunk_size or max(len(self.body), 1)
        pending = [self.body[i : i + size] for i in range(0, len(self.body), size)] or [b""]

        async def receive() -> MutableMapping[str, Any]:
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            await self.disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.response_headers = dict(message["headers"])
                return
            # Like hypercorn: a body send is not cancellable (it is shielded there).
            with trio.CancelScope(shield=True):
                await self.reading.wait()
                if self.send_delay:
                    await trio.sleep(self.send_delay)
            if self.disconnected.is_set():
                return  # hypercorn drops what is sent to a closed connection
            self.parts.append(message.get("body", b""))
            self.part_times.append(trio.current_time())
            if not message.get("more_body", False):
                self.ended = True
                if self.disconnect_when_done:
                    self.disconnected.set()

        await app(self.scope, receive, send)
        return self

    def disconnect(self) -> None:
        self.disconnected.set()

    @property
    def text(self) -> bytes:
        return b"".join(self.parts)

    @property
    def events(self) -> list[SSEEvent]:
        decoder = SSEDecoder()
        return decoder.feed(self.text) + decoder.close()

    def json_body(self) -> Any:
        return orjson.loads(self.text)


def sse(*events: dict[str, Any] | str, event_names: bool = False) -> list[bytes]:
    """Wire bytes of each event: a dict becomes JSON data, a str is sent as is."""
    out = []
    for item in events:
        if isinstance(item, str):
            out.append(f"data: {item}\n\n".encode())
        else:
            name = f"event: {item['type']}\n" if event_names else ""
            out.append(name.encode() + b"data: " + orjson.dumps(item) + b"\n\n")
    return out


@dataclass
class ServeCommand:
    """A running ``trio-gateway serve``: its URL, everything it wrote, and its exit status."""

    url: str
    output: bytearray  # stderr, then stdout once the process has ended
    status: int | None = None


async def _collect(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        into += chunk


@asynccontextmanager
async def serve_command(config: Path, env: Mapping[str, str]) -> AsyncIterator[ServeCommand]:
    """Run ``trio-gateway serve --config`` on a free loopback port; SIGTERM it on exit.

    Its output is read all along (a full pipe would block it) into ``output``.
    """
    command = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
    process = await trio.lowlevel.open_process(
        [*command, "--bind", "127.0.0.1:0"],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    stderr, stdout = process.stderr, process.stdout
    assert stderr is not None
    assert stdout is not None
    printed = bytearray()
    async with stderr, stdout, trio.open_nursery() as nursery:
        banner = bytearray()
        while b"listening on" not in banner:
            banner += await stderr.receive_some(4096)
        url = bytes(banner).split(b"listening on ", 1)[1].split()[0].decode()
        running = ServeCommand(url, banner)
        nursery.start_soon(_collect, stderr, running.output)
        nursery.start_soon(_collect, stdout, printed)
        try:
            yield running
        finally:
            process.send_signal(signal.SIGTERM)
            running.status = await process.wait()
    running.output += printed
