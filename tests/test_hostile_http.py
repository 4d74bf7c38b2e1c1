"""Hostile HTTP/1.1 clients against a real hypercorn: smuggling, slow-loris, idle floods, fuzz.

Rules, beyond those of ``tests/conftest.py``:

* The server is the gateway's own :func:`~trio_gateway._server.serve` on
  127.0.0.1 port 0, with an in-memory :class:`~tests.helpers.FakeUpstream`.
  Clients are raw sockets, so each test chooses every byte and every pause.
* Real-socket tests use real time, with timeouts configured to fractions of a
  second and an absolute ``trio.fail_after``; timing bounds are one-sided
  where the machine's load could only make them later.
* Answers are parsed with h11 as a client (:func:`parse_answers`), so "the
  client got a well-formed answer" means what an HTTP/1.1 client would see.
* The request-body deadline is also tested in memory, on the mock clock,
  where its timing is exact.
* Two protocol tests drive the gateway's ``GatewayH11Protocol`` directly, as
  hypercorn's connection task does (``handle``, ``stream_send``), to put
  events in an order a socket cannot be made to produce on demand. They use
  hypercorn's private API, like the module under test, and are the first
  to tell when a hypercorn release changes it.
* One test runs ``trio-gateway serve`` as a process, under a low open-files
  limit that the test process must not share.
* A server that closes a connection with unread input sends RST rather than
  FIN; both count as "closed" (:func:`read_until_closed`).
* The fuzz target (:func:`test_fuzz_hostile_request_bytes`) follows
  ``TRIO_GATEWAY_FUZZ`` like ``tests/test_sse_properties.py``: 25 examples,
  or 3,000 with ``long``. Hypothesis runs synchronously; the gateway runs in
  a Trio loop of its own in a thread, and each example is one fresh
  connection, read until the server closes it (short client timeouts make
  sure it does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import hypercorn.trio
import orjson
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, HTTPResponseBodyEvent, HTTPResponseStartEvent
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    fuzz_settings,
    make_config,
    sse,
)
from trio_gateway._core.config import Timeouts
from trio_gateway._proxy.app import Gateway
from trio_gateway._server.hypercorn_private import GatewayH11Protocol
from trio_gateway._server.serve import hypercorn_config, serve

TIME_LIMIT = 20
CHAT_ANSWER = orjson.dumps(
    {"id": "x", "object": "chat.completion", "model": "vendor/model:free", "choices": []}
)
JSON_ANSWER = FakeResponse(body=[CHAT_ANSWER], content_type="application/json")
CHAT_BODY = orjson.dumps({"model": PUBLIC_MODEL, "messages": []})


# -- answers, as an HTTP/1.1 client parses them ---------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    informational: list[int] = field(default_factory=list)  # 1xx before it

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_answers(data: bytes) -> list[Answer]:
    """Every response in ``data``, the whole of one connection's output, in order.

    Raises (h11.ProtocolError, AssertionError) if the bytes are not a
    sequence of complete HTTP/1.1 responses. Parsing stops after a 101
    (the protocol switched). The answers are read as answers to GET, so no
    test sends HEAD.
    """
    answers: list[Answer] = []
    rest = data
    while rest:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "gw")]))
        client.send(h11.EndOfMessage())
        client.receive_data(rest)
        client.receive_data(b"")  # the connection ended: nothing else will come
        informational: list[int] = []
        head: h11.Response | None = None
        body = b""
        while True:
            event = client.next_event()
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                if event.status_code == 101:
                    return answers
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"the answer ended early: {event!r} in {rest!r}")
        assert head is not None
        answers.append(Answer(head.status_code, dict(head.headers), body, informational))
        rest, _ = client.trailing_data
        if head.status_code >= 200 and not client.our_state == client.their_state == h11.DONE:
            assert not rest, f"bytes after a connection-closing answer: {rest!r}"
    return answers


async def read_until_closed(stream: trio.SocketStream) -> tuple[bytes, float]:
    """All bytes the server sends, and the clock time its side closed. A checkpoint."""
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:  # RST: the server closed with input unread
            break
        if not chunk:
            break
        data += chunk
    return data, trio.current_time()


# -- a served gateway -----------------------------------------------------------


class CountingGateway(Gateway):
    """The gateway, noting the path of every HTTP request that reaches the app."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paths: list[str] = []

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await super().__call__(scope, receive, send)


@dataclass
class Served:
    port: int
    gateway: CountingGateway
    upstream: FakeUpstream

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def exchange(self, data: bytes) -> tuple[list[Answer], bytes]:
        """Send ``data`` at once, read until the server closes. A checkpoint."""
        stream = await self.connect()
        async with stream:
            await stream.send_all(data)
            raw, _ = await read_until_closed(stream)
        return parse_answers(raw), raw


async def start_gateway(
    nursery: trio.Nursery,
    timeouts: Timeouts | None = None,
    respond: FakeResponse | Callable[[Any], FakeResponse] = JSON_ANSWER,
) -> Served:
    """Serve a counting gateway in ``nursery`` on a free loopback port. A checkpoint."""
    upstream = FakeUpstream(respond)
    gateway = CountingGateway(make_config(timeouts=timeouts), transport=upstream)
    urls = await nursery.start(partial(serve, gateway, "127.0.0.1:0"))
    return Served(int(urls[0].rsplit(":", 1)[1]), gateway, upstream)


def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: gw\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body


AUTH = ("authorization", f"Bearer {CLIENT_KEY}")
JSON_TYPE = ("content-type", "application/json")


# -- request smuggling ----------------------------------------------------------

# A chunked body that ends at once, then a whole second request: the smuggled one.
SMUGGLED = request("POST", "/v1/chat/completions", [AUTH, JSON_TYPE, ("content-length", "%d")])
SMUGGLED = SMUGGLED % len(CHAT_BODY) + CHAT_BODY
CHUNKED_THEN_SMUGGLED = b"0\r\n\r\n" + SMUGGLED

# Headers that h11 accepts, and normalises to Content-Length plus Transfer-Encoding: chunked.
BOTH_LENGTHS = {
    "cl-then-te": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "te-then-cl": b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "te-upper-case": b"TRANSFER-ENCODING: CHUNKED\r\nContent-Length: 5\r\n",
    "te-tab-before-value": b"Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n",
    "te-obs-fold": b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n",
    "cl-repeated-list": b"Content-Length: 5, 5\r\nTransfer-Encoding: chunked\r\n",
    "cl-zero": b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
}


@pytest.mark.parametrize(
    ("path", "shape"), [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")]
)
@pytest.mark.parametrize("headers", list(BOTH_LENGTHS.values()), ids=list(BOTH_LENGTHS))
async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    nursery: trio.Nursery, path: str, shape: str, headers: bytes
):
    """400 in the endpoint's shape, then the end of the connection; nothing reaches the app."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        head = f"POST {path} HTTP/1.1\r\nhost: gw\r\n".encode() + headers + b"\r\n"
        answers, _ = await served.exchange(head + CHUNKED_THEN_SMUGGLED)
    [answer] = answers  # one answer, and the connection closed: the second is never served
    assert answer.status == 400
    assert answer.headers[b"connection"] == b"close"
    assert answer.headers[b"content-type"] == b"application/json"
    message = "the request has both Content-Length and Transfer-Encoding"
    if shape == "openai":
        assert answer.json()["error"]["code"] == "ambiguous_length"
        assert answer.json()["error"]["message"] == message
    else:
        assert answer.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message},
        }
    assert served.gateway.paths == []
    assert served.upstream.requests == []


async def test_transfer_encoding_in_http_1_0_is_refused(nursery: trio.Nursery):
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        head = b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        answers, _ = await served.exchange(head + CHUNKED_THEN_SMUGGLED)
    [answer] = answers
    assert (answer.status, answer.json()["error"]["code"]) == (400, "ambiguous_length")
    assert served.gateway.paths == []


# Framing that h11 itself refuses; the gateway's protocol gives the refusal a JSON body
# and turns h11's 501 (for a Transfer-Encoding it does not support) into 400.
REFUSED_BY_H11 = {
    "two-content-lengths": b"Content-Length: 5\r\nContent-Length: 6\r\n",
    "content-length-list": b"Content-Length: 5, 6\r\n",
    "content-length-plus": b"Content-Length: +5\r\n",
    "content-length-negative": b"Content-Length: -1\r\n",
    "content-length-hex": b"Content-Length: 0x5\r\n",
    "te-twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "te-identity-then-chunked": b"Transfer-Encoding: identity, chunked\r\n",
    "te-chunked-not-last": b"Transfer-Encoding: chunked, identity\r\n",
    "te-unknown": b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n",
    "te-space-before-colon": b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
    "nul-in-value": b"x-note: a\x00b\r\n",
    "cr-in-value": b"x-note: a\rb\r\n",
}


@pytest.mark.parametrize("headers", list(REFUSED_BY_H11.values()), ids=list(REFUSED_BY_H11))
async def test_framing_h11_refuses_is_a_400_with_a_json_body(nursery: trio.Nursery, headers: bytes):
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n" + headers + b"\r\n"
        answers, _ = await served.exchange(head + b"hello" + CHUNKED_THEN_SMUGGLED)
    [answer] = answers
    assert answer.status == 400
    assert answer.headers[b"connection"] == b"close"
    assert answer.json()["error"]["code"] == "malformed_request"
    assert served.gateway.paths == []


async def test_request_head_over_the_limit_is_431(nursery: trio.Nursery):
    """An unfinished head over 16 KiB (h11_max_incomplete_size) is refused with JSON.

    h11 applies the limit only to what it holds unfinished: a head that
    arrives whole in one read (hypercorn reads 64 KiB at most) is parsed
    whatever its size. A 100 KB head cannot arrive whole in one read.
    """
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        padding = [(f"x-pad-{i}", "a" * 100) for i in range(1000)]  # about 110 KB
        answers, _ = await served.exchange(request("GET", "/healthz", padding))
    [answer] = answers
    assert answer.status == 431
    assert answer.json()["error"]["code"] == "headers_too_large"
    assert served.gateway.paths == []


async def test_pipelined_requests_are_still_served_in_order(nursery: trio.Nursery):
    """The control: well-framed pipelining works, so one answer above means one served."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        chunked = request(
            "POST",
            "/v1/chat/completions",
            [AUTH, JSON_TYPE, ("transfer-encoding", "chunked")],
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT_BODY), CHAT_BODY),
        )
        last = request("GET", "/healthz", [("connection", "close")])
        answers, _ = await served.exchange(chunked + SMUGGLED + last)
    assert [a.status for a in answers] == [200, 200, 200]
    assert served.gateway.paths == ["/v1/chat/completions", "/v1/chat/completions", "/healthz"]
    assert len(served.upstream.requests) == 2


async def test_stock_hypercorn_serves_the_smuggled_request(nursery: trio.Nursery):
    """Why the gateway's protocol exists, and proof that it is scoped to the gateway's config.

    The same gateway under a plain hypercorn ``Config`` (in the same process,
    after the gateway's protocol was installed) serves the smuggled request.
    """
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)  # installs the gateway's protocol
        upstream = FakeUpstream(JSON_ANSWER)
        gateway = CountingGateway(make_config(), transport=upstream)
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = config.errorlog = None
        urls = await nursery.start(partial(hypercorn.trio.serve, gateway, config))  # type: ignore[arg-type]
        stock = Served(int(urls[0].rsplit(":", 1)[1]), gateway, upstream)
        head = request(
            "GET", "/healthz", [("content-length", "5"), ("transfer-encoding", "chunked")]
        )
        stream = await stock.connect()
        async with stream:
            await stream.send_all(head + CHUNKED_THEN_SMUGGLED)
            data = b""
            answers: list[Answer] = []
            while len(answers) < 2:  # a kept-alive connection: read until both are whole
                data += await stream.receive_some(65536)
                with contextlib.suppress(h11.RemoteProtocolError):
                    answers = parse_answers(data)
    assert [a.status for a in answers] == [200, 200]
    assert gateway.paths == ["/healthz", "/v1/chat/completions"]
    assert served.gateway.paths == []


# -- the reading task and the app: who writes, who closes -----------------------------


@pytest.mark.parametrize(
    "last_request",
    [
        b"GET /healthz HTTP/1.0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n",
    ],
    ids=["http-1.0", "connection-close"],
)
async def test_bytes_after_a_last_request_neither_crash_the_server_nor_cut_its_answer(
    nursery: trio.Nursery, last_request: bytes
):
    """Stock hypercorn's reading task answers such bytes with its own 400 while the app
    answers too; the two tasks race on the socket and a BusyResourceError ends the whole
    server, usually within a few tries. The gateway answers the request, then closes."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        for _ in range(50):
            answers, _ = await served.exchange(last_request + b"XXXX")
            assert [(a.status, a.body) for a in answers] == [(200, b'{"status":"ok"}')]
    assert served.gateway.paths == ["/healthz"] * 50


async def test_a_broken_body_after_an_early_answer_never_cuts_that_answer(nursery: trio.Nursery):
    """The app refuses before reading the body (no key: 401) while the reading task meets a
    malformed chunk: the client gets the whole 401 and then the end of the connection."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        data = request(
            "POST", "/v1/chat/completions", [JSON_TYPE, ("transfer-encoding", "chunked")], b"zz\r\n"
        )
        for _ in range(50):
            answers, _ = await served.exchange(data)
            assert [a.status for a in answers] in ([401], [])
            if answers:
                assert answers[0].json()["error"]["code"] == "invalid_api_key"


# Each asks to close after the answer, so that the connection ends at once.
WEBSOCKET = [
    ("connection", "Upgrade, close"),
    ("upgrade", "websocket"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
]
H2C = [("connection", "Upgrade, HTTP2-Settings, close"), ("upgrade", "h2c"), ("http2-settings", "")]


@pytest.mark.parametrize(
    "headers",
    [WEBSOCKET, WEBSOCKET[:2], H2C],  # the second: a handshake hypercorn refuses, then hangs
    ids=["websocket", "bad-websocket", "h2c"],
)
async def test_upgrade_is_ignored(nursery: trio.Nursery, headers: list[tuple[str, str]]):
    """RFC 9110 7.8: the gateway answers in HTTP/1.1 (stock hypercorn: 500, a hang, h2)."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        answers, _ = await served.exchange(request("GET", "/healthz", headers))
    assert [(a.status, a.informational) for a in answers] == [(200, [])]
    assert served.gateway.paths == ["/healthz"]


async def test_http2_preface_is_refused_and_closed(nursery: trio.Nursery):
    """Stock hypercorn switches to HTTP/2, whose connections these timers do not end."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery)
        answers, _ = await served.exchange(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    [answer] = answers
    assert (answer.status, answer.json()["error"]["code"]) == (400, "unsupported_protocol")
    assert served.gateway.paths == []


# -- slow-loris: the request head ---------------------------------------------------


async def trickle(stream: trio.SocketStream, data: bytes, gap: float) -> None:
    """Send ``data`` a byte at a time, ``gap`` s apart, until done or refused. A checkpoint."""
    for byte in data:
        try:
            await stream.send_all(bytes([byte]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(gap)


def test_hypercorn_config_carries_client_headers():
    """One hypercorn timer: from a connection's start, or an answer's end, to a whole head."""
    gateway = Gateway(make_config(timeouts=Timeouts(client_headers=7.5)))
    assert hypercorn_config(gateway, "127.0.0.1:0").keep_alive_timeout == 7.5


async def test_trickled_request_head_is_cut_off_at_client_headers(nursery: trio.Nursery):
    """Hypercorn's keep-alive timer runs until a whole head has arrived; bytes do not reset it."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery, Timeouts(client_headers=0.5))
        stream = await served.connect()
        async with stream:
            opened = trio.current_time()
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    trickle, stream, request("GET", "/healthz", [("x-pad", "a" * 200)]), 0.02
                )
                data, closed = await read_until_closed(stream)
                inner.cancel_scope.cancel(reason="the server closed the connection")
    assert data == b""  # hypercorn closes without an answer
    assert 0.5 <= closed - opened < 2.0  # about 200 bytes were due over 4 s
    assert served.gateway.paths == []


async def test_client_headers_also_closes_an_idle_kept_alive_connection(nursery: trio.Nursery):
    """The same timer restarts when an answer ends: it is the keep-alive idle time too."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery, Timeouts(client_headers=0.5))
        stream = await served.connect()
        async with stream:
            await stream.send_all(request("GET", "/healthz", []))
            data = b""
            while not data.endswith(b'{"status":"ok"}'):
                data += await stream.receive_some(65536)
            answered = trio.current_time()
            rest, closed = await read_until_closed(stream)
    [answer] = parse_answers(data + rest)
    assert answer.status == 200
    assert 0.5 <= closed - answered < 2.0
    assert served.gateway.paths == ["/healthz"]


# -- slow-loris: the request body ---------------------------------------------------


async def test_trickled_body_is_408_and_the_connection_closes(nursery: trio.Nursery):
    """The gateway's own deadline for the whole body, through hypercorn, in real time."""
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery, Timeouts(request_body=0.5))
        stream = await served.connect()
        headers = [AUTH, JSON_TYPE, ("content-length", str(len(CHAT_BODY)))]
        async with stream:
            await stream.send_all(request("POST", "/v1/chat/completions", headers))
            sent_head = trio.current_time()
            async with trio.open_nursery() as inner:
                inner.start_soon(trickle, stream, CHAT_BODY, 0.05)  # about 2.5 s in all
                data, closed = await read_until_closed(stream)
                inner.cancel_scope.cancel(reason="the server closed the connection")
    [answer] = parse_answers(data)
    assert answer.status == 408
    assert answer.json()["error"]["code"] == "request_timeout"
    assert answer.json()["error"]["message"] == "the request body did not arrive within 0.5 s"
    assert 0.5 <= closed - sent_head < 2.0  # closed well before the body could have ended
    assert served.upstream.requests == []


def trickling(gateway: Gateway, call: AsgiCall, pieces: list[bytes], gap: float) -> Any:
    """An ASGI run of ``call`` whose body arrives as ``pieces``, ``gap`` s apart."""
    pending = list(pieces)

    async def receive() -> dict[str, Any]:
        if pending:
            await trio.sleep(gap)
            piece = pending.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pending)}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            call.status = message["status"]
            call.response_headers = dict(message["headers"])
        else:
            call.parts.append(message.get("body", b""))
            call.part_times.append(trio.current_time())
            call.ended = not message.get("more_body", False)

    return gateway(call.scope, receive, send)


def body_pieces(size: int) -> list[bytes]:
    return [CHAT_BODY[i : i + size] for i in range(0, len(CHAT_BODY), size)]


@pytest.mark.parametrize(
    ("path", "error"),
    [
        (
            "/v1/chat/completions",
            {
                "error": {
                    "message": "the request body did not arrive within 5 s",
                    "type": "invalid_request_error",
                    "code": "request_timeout",
                    "param": None,
                }
            },
        ),
        (
            "/v1/messages",
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "the request body did not arrive within 5 s",
                },
            },
        ),
    ],
)
async def test_body_deadline_is_total_not_per_read(
    autojump_clock: trio.testing.MockClock, path: str, error: dict[str, Any]
):
    """Every piece comes within 1 s, but the whole is not there at 5 s: 408 at exactly 5 s."""
    upstream = FakeUpstream(JSON_ANSWER)
    gateway = Gateway(make_config(timeouts=Timeouts(request_body=5)), transport=upstream)
    call = AsgiCall.json({}, path=path)
    pieces = body_pieces(3)
    assert len(pieces) > 6  # 1 s apart: the last is due after 6 s
    await trickling(gateway, call, pieces, 1.0)
    assert call.status == 408
    assert orjson.loads(call.text) == error
    assert call.part_times == [pytest.approx(5)]
    assert upstream.requests == []


async def test_body_within_the_deadline_is_served(autojump_clock: trio.testing.MockClock):
    upstream = FakeUpstream(JSON_ANSWER)
    gateway = Gateway(make_config(timeouts=Timeouts(request_body=5)), transport=upstream)
    call = AsgiCall.json({})
    pieces = body_pieces((len(CHAT_BODY) + 3) // 4)
    assert len(pieces) == 4
    await trickling(gateway, call, pieces, 1.2)  # whole at 4.8 s
    assert call.status == 200
    assert upstream.request_json["model"] == "vendor/model:free"


async def test_request_body_zero_turns_the_deadline_off(autojump_clock: trio.testing.MockClock):
    upstream = FakeUpstream(JSON_ANSWER)
    gateway = Gateway(make_config(timeouts=Timeouts(request_body=0)), transport=upstream)
    call = AsgiCall.json({})
    await trickling(gateway, call, body_pieces(8), 3600.0)  # hours
    assert call.status == 200
    assert len(upstream.requests) == 1


# -- thousands of idle connections ---------------------------------------------------

IDLE_CONNECTIONS = 2000
IDLE_TIME_LIMIT = 60  # the test sizes its timer to the machine (below); this caps it all


async def open_idle(port: int, count: int) -> tuple[list[trio.socket.SocketType], list[float]]:
    """``count`` connections that send nothing, and when each connect returned. A checkpoint."""
    socks: list[trio.socket.SocketType] = []
    opened: list[float] = []
    for _ in range(count):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        opened.append(trio.current_time())
        socks.append(sock)
    return socks, opened


async def test_thousands_of_idle_connections_neither_block_nor_stay(nursery: trio.Nursery):
    """2,000 connections that send nothing: a real request is still served at once, and
    the server closes each idle one ``client_headers`` after it opened, not before.

    The time bounds come from this machine's speed at the moment, as measured: opening
    a tenth as many connections first sets ``client_headers`` to three times the time
    that opening all of them should take (3 s at least, 15 s at most), so they are
    still open when the request goes out, loaded machine or not. The server starts
    each timer when it accepts, at or after the client's connect: the lower bound is
    tight, and the upper one allows for accepting and closing them all.
    """
    chat = request(
        "POST",
        "/v1/chat/completions",
        [AUTH, JSON_TYPE, ("content-length", str(len(CHAT_BODY))), ("connection", "close")],
        CHAT_BODY,
    )
    with trio.fail_after(IDLE_TIME_LIMIT):
        probe = await start_gateway(nursery, Timeouts(client_headers=IDLE_TIME_LIMIT))
        started = trio.current_time()
        socks, _ = await open_idle(probe.port, IDLE_CONNECTIONS // 10)
        expected = (trio.current_time() - started) * 10  # about 0.5 s on an idle machine
        for sock in socks:
            sock.close()
        client_headers = min(15.0, max(3.0, 3 * expected))
        served = await start_gateway(nursery, Timeouts(client_headers=client_headers))
        started = trio.current_time()
        socks, opened = await open_idle(served.port, IDLE_CONNECTIONS)
        opening = trio.current_time() - started
        closed: dict[int, float] = {}

        async def wait_closed(index: int, sock: trio.socket.SocketType) -> None:
            with sock:
                assert await sock.recv(1) == b""  # a FIN: closed, not reset
                closed[index] = trio.current_time()

        async with trio.open_nursery() as waiters:
            for index, sock in enumerate(socks):
                waiters.start_soon(wait_closed, index, sock)
            started = trio.current_time()
            answers, _ = await served.exchange(chat)
            took = trio.current_time() - started
            open_meanwhile = IDLE_CONNECTIONS - len(closed)
    assert [a.status for a in answers] == [200]
    # Blocked behind an idle connection, the request would wait until its timer ran out.
    assert took < client_headers / 2, (took, client_headers)
    assert open_meanwhile >= IDLE_CONNECTIONS // 2, (open_meanwhile, opening, client_headers)
    assert len(closed) == IDLE_CONNECTIONS
    lived = [closed[index] - opened[index] for index in range(IDLE_CONNECTIONS)]
    assert min(lived) >= client_headers
    assert max(lived) < client_headers + 2 * (opening + took) + 1, (max(lived), opening, took)
    assert served.gateway.paths == ["/v1/chat/completions"]


# -- clients that close: the connection is let go at once ---------------------------

STREAM_BODY = orjson.dumps({"model": PUBLIC_MODEL, "stream": True, "messages": []})
CHUNK = {"id": "x", "object": "chat.completion.chunk", "model": "vendor/model:free"}
STREAM_ANSWER = FakeResponse(
    body=sse({**CHUNK, "choices": [{"index": 0, "delta": {"content": "hi"}}]}, "[DONE]")
)
KEPT_ALIVE = {
    "healthz": request("GET", "/healthz", []),
    "json": request(
        "POST",
        "/v1/chat/completions",
        [AUTH, JSON_TYPE, ("content-length", str(len(CHAT_BODY)))],
        CHAT_BODY,
    ),
    "stream": request(
        "POST",
        "/v1/chat/completions",
        [AUTH, JSON_TYPE, ("content-length", str(len(STREAM_BODY)))],
        STREAM_BODY,
    ),
}
# When the client sends its FIN: at once after the last byte of the answer, a little
# later (the connection idle by then), or having read only the head.
CLOSE_AT = ["at-once", "after-1ms", "after-20ms", "before-the-body"]


def json_or_stream(upstream_request: Any) -> FakeResponse:
    return STREAM_ANSWER if orjson.loads(upstream_request.content).get("stream") else JSON_ANSWER


async def read_answer(stream: trio.SocketStream, *, head_only: bool = False) -> None:
    """Read one answer, or only its head, as an HTTP/1.1 client does. A checkpoint."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "gw")]))
    client.send(h11.EndOfMessage())
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            assert data, "the server closed before its answer was whole"
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
            if head_only:
                return
        elif isinstance(event, h11.EndOfMessage):
            assert client.our_state is client.their_state is h11.DONE  # kept alive
            return


@pytest.mark.parametrize("what", list(KEPT_ALIVE))
async def test_a_client_that_closes_a_kept_alive_connection_is_let_go_at_once(
    nursery: trio.Nursery, what: str
):
    """The client closes its side after an answer; the server closes its own within 100 ms.

    Stock hypercorn's trio worker kept the socket in CLOSE_WAIT until its keep-alive
    timer (``client_headers``, here 5 s) ran out whenever the FIN came once the answer
    was complete, which is how HTTP clients let a connection go: a race the ``at-once``
    rounds lose about half the time, and the later ones always.
    """
    with trio.fail_after(TIME_LIMIT):
        served = await start_gateway(nursery, Timeouts(client_headers=5), respond=json_or_stream)
        for round_ in range(3):
            for close_at in CLOSE_AT:
                stream = await served.connect()
                async with stream:
                    await stream.send_all(KEPT_ALIVE[what])
                    await read_answer(stream, head_only=close_at == "before-the-body")
                    if close_at.startswith("after-"):
                        await trio.sleep(float(close_at.removeprefix("after-").rstrip("ms")) / 1000)
                    fin_at = trio.current_time()
                    await stream.send_eof()
                    took = math.inf
                    with trio.move_on_after(1):
                        _, closed_at = await read_until_closed(stream)
                        took = closed_at - fin_at
                    assert took < 0.1, f"round {round_}, {close_at}: open {took:.3f} s after FIN"
    assert len(served.gateway.paths) == 3 * len(CLOSE_AT)


LOW_FILE_LIMIT = 64


def _lower_file_limit() -> None:  # runs in the child, before it executes Python
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_FILE_LIMIT, LOW_FILE_LIMIT))


async def test_clients_that_close_do_not_use_up_a_low_file_limit(tmp_path: Path):
    """``trio-gateway serve`` with 64 open files allowed, and 150 clients one after the
    other, each closing its kept-alive connection 5 ms after its answer. Before the fix
    every one of them held a descriptor for ``client_headers`` (10 s): accept failed
    with EMFILE after about 50, and the next client waited those 10 s for an answer."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[upstreams.u]\nbase_url = "https://upstream.invalid/v1"\napi_key_env = "LOW_LIMIT_KEY"\n'
        '[models."m"]\nupstream = "u"\nupstream_model = "m"\n'
        f'[[keys]]\nname = "k"\nsha256 = "{"0" * 64}"\n'
        '[accounting]\ndatabase = ":memory:"\n[log]\nlevel = "off"\n'
    )
    command = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
    process = await trio.lowlevel.open_process(
        [*command, "--bind", "127.0.0.1:0"],
        env={**os.environ, "LOW_LIMIT_KEY": "unused"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        preexec_fn=_lower_file_limit,
    )
    assert process.stderr is not None
    try:
        with trio.fail_after(TIME_LIMIT):
            banner = b""
            while b"listening on http://127.0.0.1:" not in banner:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, banner
                banner += chunk
            port = int(banner.split(b"listening on http://127.0.0.1:")[1].split()[0])
            for index in range(150):
                with trio.move_on_after(2) as waited:  # about 2 ms each here
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    async with stream:
                        await stream.send_all(request("GET", "/healthz", []))
                        await read_answer(stream)
                        await trio.sleep(0.005)  # the client's choice: close a little later
                assert not waited.cancelled_caught, f"client {index} waited over 2 s"
    finally:
        process.terminate()
        with trio.CancelScope(shield=True):
            await process.wait()
        await process.stderr.aclose()


class _AppTasks:
    """Stands in for a connection's task group: records what the protocol gives the app."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def spawn_app(self, app: Any, config: Any, scope: Any, send: Any) -> Any:
        async def put(message: Any) -> None:
            self.messages.append(message)

        return put


def gateway_protocol(sent: list[Event]) -> GatewayH11Protocol:
    """The gateway's HTTP/1.1 protocol for one connection, its output going to ``sent``."""

    async def send(event: Event) -> None:
        sent.append(event)

    config = hypercorn_config(Gateway(make_config()), "127.0.0.1:0")
    return GatewayH11Protocol(
        app=None,
        config=config,
        context=WorkerContext(None),
        task_group=_AppTasks(),
        connection_state=ConnectionState({}),
        ssl=False,
        client=("127.0.0.1", 50000),
        server=("127.0.0.1", 8080),
        send=send,
    )


async def test_end_of_input_on_an_idle_connection_stops_the_keep_alive_timer():
    """The protocol, driven as hypercorn's TCPServer drives it: an answer, the connection
    kept alive (the timer starts), then the reading task meets the client's FIN. The
    timer must stop, or the socket stays open until it fires."""
    sent: list[Event] = []
    protocol = gateway_protocol(sent)
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-length", b"2")],
    }
    body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"ok", "more_body": False}
    with trio.fail_after(TIME_LIMIT):
        await protocol.handle(RawData(request("GET", "/healthz", [])))
        assert protocol.stream is not None
        await protocol.stream.app_send(start)
        await protocol.stream.app_send(body)
        assert sent[-1] == Updated(idle=True)  # kept alive: hypercorn's timer runs
        sent.clear()
        await protocol.handle(RawData(b""))  # what TCPServer._read_data does at EOF...
        await protocol.handle(Closed())  # ...before it returns
    assert sent == [Updated(idle=False)]


async def test_an_answer_that_ends_after_a_reset_closes_the_connection():
    """The reading task meets a reset (no EOF reaches h11) between the last byte of an
    answer and the end of the app's task: the connection closes rather than wait for a
    next request that cannot come."""
    sent: list[Event] = []
    protocol = gateway_protocol(sent)
    with trio.fail_after(TIME_LIMIT):
        await protocol.handle(RawData(request("GET", "/healthz", [])))
        await protocol.stream_send(
            Response(stream_id=1, status_code=200, headers=[(b"content-length", b"2")])
        )
        await protocol.stream_send(Body(stream_id=1, data=b"ok"))
        await protocol.stream_send(EndBody(stream_id=1))
        await protocol.handle(Closed())  # TCPServer._read_data: BrokenResourceError, then this
        sent.clear()
        await protocol.stream_send(StreamClosed(stream_id=1))  # the app's task ends
    assert sent == [Closed()]


# -- fuzz: hostile bytes on the raw request path ---------------------------------------

FUZZ_PROFILE = fuzz_settings(25, 3000)
FUZZ_TIMEOUTS = Timeouts(client_headers=0.25, request_body=0.25, shutdown=1)


@dataclass
class ThreadedServer:
    """A gateway served by its own Trio loop in a thread, for synchronous clients."""

    port: int
    gateway: CountingGateway
    errors: list[logging.LogRecord]


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def threaded_server() -> Iterator[ThreadedServer]:
    """The gateway with short client timeouts, so every connection ends by itself soon."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        upstream = FakeUpstream(JSON_ANSWER)
        gateway = CountingGateway(make_config(timeouts=FUZZ_TIMEOUTS), transport=upstream)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                partial(serve, gateway, "127.0.0.1:0", shutdown_trigger=stop.wait)
            )
            state.update(
                port=int(urls[0].rsplit(":", 1)[1]),
                gateway=gateway,
                stop=stop,
                token=trio.lowlevel.current_trio_token(),
            )
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), name="fuzzed gateway")
    thread.start()
    assert started.wait(TIME_LIMIT)
    errors: list[logging.LogRecord] = []
    handler = _Collect(errors)  # added once the server's logger exists: hypercorn resets it
    logging.getLogger("hypercorn.error").addHandler(handler)
    try:
        yield ThreadedServer(state["port"], state["gateway"], errors)
    finally:
        logging.getLogger("hypercorn.error").removeHandler(handler)
        trio.from_thread.run_sync(state["stop"].set, trio_token=state["token"])
        thread.join(TIME_LIMIT)
        assert not thread.is_alive()


def exchange_sync(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sends until it closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIME_LIMIT / 4) as sock:
        with contextlib.suppress(OSError):  # refused before it read everything, and closed
            sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed with input unread
                break
            except TimeoutError:
                raise AssertionError(f"the server neither answered nor closed: {data!r}") from None
            if not chunk:
                break
            received += chunk
    return received


# Pieces of hostile requests. Each part is well-formed most of the time (so that
# requests get past h11 and reach the app, the upstream and pipelining), and
# otherwise drawn from bytes a parser must be careful with.
_MOSTLY = st.integers(0, 9).map(lambda n: n < 9)
_NASTY = st.sampled_from(
    [b"\r", b"\n", b"\x00", b"\r\n", b" ", b"\t", b":", b"\r\n ", b"\xff", b",", b"\x7f"]
)
_TOKEN = st.text("abcxyzABC0189-_.!", min_size=1, max_size=10).map(str.encode)
_JUNK = st.lists(_NASTY | _TOKEN | st.binary(max_size=8), max_size=4).map(b"".join)
_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get", b"CONNECT"])
_TARGETS = st.sampled_from(
    [
        b"/healthz",
        b"/metrics",
        b"/v1/models",
        b"/v1/chat/completions",
        b"/v1/messages",
        b"/v1/responses",
        b"/v1/embeddings",
        b"/v1/audio/transcriptions",
        b"/nope",
        b"*",
        b"http://gw/v1/chat/completions",
        b"/v1/chat/completions?x=%ff",
        b"/v1/%2e%2e/admin",
        b"/%00",
    ]
)
_VERSIONS = st.sampled_from([b"HTTP/1.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"])
_NAMES = st.sampled_from(
    [
        b"Content-Length",
        b"Transfer-Encoding",
        b"Content-Type",
        b"Authorization",
        b"x-api-key",
        b"Expect",
        b"Connection",
        b"Upgrade",
        b"Trailer",
        b"Host",
    ]
)
_VALUES = st.sampled_from(
    [
        b"chunked",
        b"identity",
        b"gzip, chunked",
        b"0",
        b"5",
        b"5, 6",
        b"-1",
        b"99999999999999999999999",
        b"application/json",
        b"multipart/form-data; boundary=b",
        b"Bearer",
        b"Bearer wrong-key",
        b"100-continue",
        b"close",
        b"keep-alive",
        b"Upgrade",
        b"websocket",
        b"h2c",
    ]
)
_SEPARATORS = st.sampled_from([b":", b" : ", b":\t", b":\r\n ", b""])
_PAYLOADS = st.sampled_from(
    [
        CHAT_BODY,
        orjson.dumps({"model": PUBLIC_MODEL, "stream": True, "messages": []}),
        orjson.dumps({"model": "no/such-model", "messages": []}),
        orjson.dumps({"model": ["not", "a", "string"]}),
        b"[]",
        b"{",
        b"\xff\xfe",
        b"",
    ]
)


_HARMLESS = st.sampled_from(
    [
        b"Accept: */*",
        b"User-Agent: fuzz/1.0",
        b"Expect: 100-continue",
        b"Connection: close",
        b"Connection: keep-alive",
        b"Connection: Upgrade, close",
        b"Upgrade: websocket",
        b"Upgrade: h2c",
        b"x-api-key: " + CLIENT_KEY.encode(),
        b"X-Note:",
        b"X-Note: \xe2\x82\xac \xff",
    ]
)


@st.composite
def _header(draw: st.DrawFn) -> bytes:
    if draw(_MOSTLY):
        return draw(_HARMLESS)
    name = draw(_NAMES | _TOKEN | _JUNK)
    return name + draw(_SEPARATORS | st.just(b": ")) + draw(_VALUES | _JUNK)


@st.composite
def _framed_body(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """Framing headers and the body as framed: right, wrong, doubled or missing."""
    payload = draw(_PAYLOADS | st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "chunked", "both", "none", "short", "long"]))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [payload] if part)
    chunked += b"0\r\n\r\n"
    if framing == "length":
        return [b"Content-Length: %d" % len(payload)], payload
    if framing == "chunked":
        return [b"Transfer-Encoding: chunked"], chunked
    if framing == "both":
        return [b"Content-Length: %d" % len(payload), b"Transfer-Encoding: chunked"], chunked
    if framing == "short":  # declares more than it sends: the body deadline ends it
        return [b"Content-Length: %d" % (len(payload) + 7)], payload
    if framing == "long":  # sends more than it declares: the rest is the next request
        return [b"Content-Length: %d" % (len(payload) // 2)], payload
    return [], payload


@st.composite
def hostile_request(draw: st.DrawFn) -> bytes:
    """One HTTP/1.1 request, mostly well-formed, with hostile parts drawn in."""
    method = draw(_METHODS) if draw(_MOSTLY) else draw(_TOKEN | _JUNK)
    target = draw(_TARGETS) if draw(_MOSTLY) else draw(_JUNK)
    version = b"HTTP/1.1" if draw(_MOSTLY) else draw(_VERSIONS | _JUNK)
    line = method + b" " + target + b" " + version
    if not draw(_MOSTLY):
        line = draw(st.sampled_from([line + b" ", b" " + line, line.replace(b" ", b"  ")]))
    headers = [b"Host: gw"] if draw(_MOSTLY) else []
    if draw(_MOSTLY):
        headers.append(b"Authorization: Bearer " + CLIENT_KEY.encode())
    if draw(_MOSTLY):
        headers.append(b"Content-Type: application/json")
    framing, body = draw(_framed_body())
    headers += framing + draw(st.lists(_header(), max_size=3))
    if not draw(_MOSTLY):
        headers += [b"x-pad-%d: %s" % (i, b"a" * 40) for i in range(draw(st.integers(1, 400)))]
    headers = draw(st.permutations(headers))
    end = b"\r\n" if draw(_MOSTLY) else b"\n"
    data = line + end + b"".join(header + end for header in headers) + end + body
    if not draw(_MOSTLY):
        data = data[: draw(st.integers(0, len(data)))]  # cut anywhere
    return data


@pytest.mark.slow
@FUZZ_PROFILE
@given(requests=st.lists(hostile_request(), min_size=1, max_size=3))
def test_fuzz_hostile_request_bytes(threaded_server: ThreadedServer, requests: list[bytes]):
    """Any bytes a client sends: well-formed HTTP/1.1 answers, never a 5xx, still serving.

    Budget: TRIO_GATEWAY_FUZZ=long runs 3,000 examples instead of 25.
    """
    data = b"".join(requests)  # pipelined
    answers = parse_answers(exchange_sync(threaded_server.port, data))
    assert all(answer.status < 500 for answer in answers), answers
    assert not threaded_server.errors, threaded_server.errors[0].getMessage()
    health = request("GET", "/healthz", [("connection", "close")])
    [answer] = parse_answers(exchange_sync(threaded_server.port, health))
    assert answer.status == 200
