"""The fault matrix: every way an upstream stream can be cut, split or go wrong, per kind.

Two layers, for each streaming kind (chat, messages, responses):

A. **In memory, on the mock clock.** Bodies rendered by
   :func:`~trio_gateway.mock_upstream.render_stream` go through the gateway
   via :class:`tests.helpers.FakeUpstream`, re-cut in every way that matters:
   whole, one byte at a time, and two-way splits. Any chunking must give the
   client the same decoded events as the whole body, and those events must be
   the rewritten answer: public model name, no cost, the full text, the clean
   end last, no upstream comment.

B. **Over loopback sockets.** The gateway (driven in-process by
   :class:`tests.helpers.AsgiCall`) talks real HTTP/1.1 through httpx to
   :class:`~trio_gateway.mock_upstream.MockUpstream`, which resets, truncates
   or stalls at chosen body offsets, or answers with errors and stray HTML.
   The errors are the real httpcore ones. Real clock; every test has an
   absolute ``trio.fail_after``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    AsgiCall,
    FakeResponse,
    make_gateway,
)
from trio_gateway._core.config import (
    GatewayConfig,
    KeyEntry,
    ModelRoute,
    Timeouts,
    Upstream,
    hash_key,
)
from trio_gateway._proxy.app import Gateway
from trio_gateway._rewrite.base import Policy, StreamRewriter
from trio_gateway._rewrite.chat import ChatPolicy
from trio_gateway._rewrite.messages import MessagesPolicy
from trio_gateway._rewrite.responses import ResponsesPolicy
from trio_gateway.sse import SSEDecoder, SSEEvent
from trio_gateway.testing.mock_upstream import (
    Fault,
    MockUpstream,
    Script,
    StreamKind,
    expected_text,
    render_error,
    render_stream,
)

KINDS: tuple[StreamKind, ...] = ("chat", "messages", "responses")
PATHS: dict[StreamKind, str] = {
    "chat": "/v1/chat/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}
# The event that claims a clean, complete answer.
CLEAN_END = {"chat": "[DONE]", "messages": "message_stop", "responses": "response.completed"}
POLICIES: dict[StreamKind, type[Policy]] = {
    "chat": ChatPolicy,
    "messages": MessagesPolicy,
    "responses": ResponsesPolicy,
}
COST_FIELDS = frozenset({"cost", "cost_details", "is_byok"})
UPSTREAM_COMMENT = b"OPENROUTER"  # the mock's comment is ": OPENROUTER PROCESSING"
TIME_LIMIT = 10

# Seven tokens: the text then has 2-, 3- and 4-byte UTF-8 characters (" café",
# " naïve", " 🙂", " 日本語"), so splits land inside them too.
TOKENS = 7


def request_for(kind: StreamKind) -> AsgiCall:
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "stream": True}
    if kind == "chat":
        payload["messages"] = [{"role": "user", "content": "hi"}]
    elif kind == "messages":
        payload |= {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    else:
        payload["input"] = "hi"
    return AsgiCall.json(payload, path=PATHS[kind])


# --- What the client got ------------------------------------------------------------------------


EventKey = tuple[str | None, str | None, str | None, int | None, str | None]


def keys(events: list[SSEEvent]) -> list[EventKey]:
    """The decoded content of each item (everything but the wire bytes)."""
    return [(e.event, e.data, e.id, e.retry, e.comment) for e in events]


def decode(data: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return decoder.feed(data) + decoder.close()


def payload_of(event: SSEEvent) -> Any:
    return orjson.loads(event.data or "")


def json_payloads(events: list[SSEEvent]) -> list[Any]:
    """Every data payload but ``[DONE]``, parsed (so each must be whole JSON)."""
    return [payload_of(e) for e in events if e.data is not None and e.data != "[DONE]"]


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of every object nested in ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def delta_text(kind: StreamKind, events: list[SSEEvent]) -> str:
    """The completion text, joined from the content deltas the way an SDK joins it."""
    parts: list[str] = []
    for event in events:
        if event.data is None or event.data == "[DONE]":
            continue
        payload = payload_of(event)
        if kind == "chat":
            for choice in payload.get("choices") or []:
                parts.append(choice["delta"].get("content") or "")
        elif kind == "messages" and event.event == "content_block_delta":
            parts.append(payload["delta"]["text"])
        elif kind == "responses" and event.event == "response.output_text.delta":
            parts.append(payload["delta"])
    return "".join(parts)


def is_clean_end(kind: StreamKind, event: SSEEvent) -> bool:
    return (event.data if kind == "chat" else event.event) == CLEAN_END[kind]


def assert_rewritten(
    kind: StreamKind, call: AsgiCall, events: list[SSEEvent], *, whole: bool = True
) -> None:
    """No upstream model name, no cost, no upstream comment, in ``events`` and on the wire.

    ``whole``: ``events`` are a whole answer, so they name the model somewhere.
    """
    payloads = json_payloads(events)
    models = [value for payload in payloads for key, value in walk(payload) if key == "model"]
    assert set(models) <= {PUBLIC_MODEL}
    if whole:
        assert models, "a whole answer names its model"
    assert not [key for payload in payloads for key, _ in walk(payload) if key in COST_FIELDS]
    assert {e.comment for e in events if e.comment is not None} <= {"trio-gateway"}
    assert UPSTREAM_MODEL.encode() not in call.text
    assert UPSTREAM_COMMENT not in call.text
    if kind == "responses":
        numbers = [p["sequence_number"] for p in payloads]
        assert numbers == list(range(len(numbers)))


def assert_clean_stream(kind: StreamKind, call: AsgiCall, text: str) -> list[SSEEvent]:
    """A whole, rewritten answer that ends cleanly; returns its events."""
    assert call.status == 200
    assert call.response_headers[b"content-type"].startswith(b"text/event-stream")
    assert call.ended
    events = call.events
    assert_rewritten(kind, call, events)
    assert delta_text(kind, events) == text
    assert is_clean_end(kind, events[-1]), events[-1]
    assert [is_clean_end(kind, e) for e in events].count(True) == 1
    if kind == "chat":
        assert payload_of(events[-2])["usage"]["completion_tokens"] > 0
    return events


# === Layer A: in memory, every chunking =========================================================

LINE_ENDINGS = {"LF": "\n", "CRLF": "\r\n", "CR": "\r"}
STRIDE = 47  # split points between the targeted ones, for all but the plain LF variant
VARIANTS = [
    pytest.param(
        kind,
        LINE_ENDINGS[le],
        bom,
        blank,
        id=f"{kind}-{le}-{'bom' if bom else 'nobom'}-{'blank' if blank else 'noblank'}",
    )
    for kind in KINDS
    for le in LINE_ENDINGS
    for bom in (False, True)
    for blank in (True, False)
]


def split_points(body: bytes, *, every: bool) -> list[int]:
    """Where to cut ``body`` in two.

    ``every``: each point. Otherwise (to keep the layer fast) the points that
    matter most, on both sides of each line-end byte (so between CR and LF,
    just before and after each blank line) and inside each multi-byte UTF-8
    character and the BOM, plus every ``STRIDE``-th point.
    """
    if every:
        return list(range(1, len(body)))
    points = set(range(1, len(body), STRIDE))
    for at, byte in enumerate(body):
        if byte in b"\r\n":
            points |= {at, at + 1}
        elif 0x80 <= byte < 0xC0:  # a continuation byte: cutting here splits a character
            points.add(at)
    return sorted(points - {0, len(body)})


class Replay:
    """A FakeUpstream answer that can be changed between requests (one gateway, many runs)."""

    def __init__(self) -> None:
        self.body: list[bytes] = []

    def __call__(self, request: object) -> FakeResponse:
        return FakeResponse(body=list(self.body))


@pytest.mark.parametrize(("kind", "line_ending", "bom", "final_blank_line"), VARIANTS)
async def test_every_chunking_gives_the_same_client_events(
    kind: StreamKind,
    line_ending: str,
    bom: bool,
    final_blank_line: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Cases: 36 variants (3 kinds x 3 line ends x BOM x final blank line), each
    # whole, byte by byte, and cut in two. Every split point of every variant
    # would be about 99,500 gateway runs (over a minute), so every split point
    # is done only for the plain LF variant of each kind (8,256 runs); the
    # other 33 variants get the targeted points of split_points() and a stride
    # (5,122 runs). With the byte-by-byte runs, about 15 s on 2 cores.
    script = Script(
        tokens=TOKENS, line_ending=line_ending, bom=bom, final_blank_line=final_blank_line
    )
    body = b"".join(render_stream(kind, script, UPSTREAM_MODEL))
    assert UPSTREAM_COMMENT in body  # there is something to rewrite
    assert b'"cost"' in body
    replay = Replay()
    gateway, _ = make_gateway(replay)

    replay.body = [body]
    whole = await request_for(kind).run(gateway)
    expected = keys(assert_clean_stream(kind, whole, expected_text(script)))

    plain = line_ending == "\n" and not bom and final_blank_line
    chunkings: list[tuple[str, list[bytes]]] = [("bytewise", [bytes([b]) for b in body])]
    chunkings += [(f"split@{at}", [body[:at], body[at:]]) for at in split_points(body, every=plain)]
    for name, chunks in chunkings:
        replay.body = chunks
        call = await request_for(kind).run(gateway)
        assert call.status == 200, name
        assert call.ended, name
        assert keys(call.events) == expected, name


def events_of(body: bytes, line_ending: bytes = b"\n") -> list[bytes]:
    """``body`` cut into its items, each with its terminating blank line."""
    blank = line_ending * 2
    return [item + blank for item in body.split(blank) if item]


# Blocks with no data field: nothing in them is parsed or can leak, so they pass
# through. Data that is not JSON ends the stream instead (tests/test_integrity.py).
GARBAGE = {
    "binary-line": b"\x00\xff\xfe garbage\n\n",
    "unknown-field": b"bogus: field\n\n",
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
async def test_garbage_between_events_passes_through(
    kind: StreamKind, garbage: str, chunking: str, autojump_clock: trio.testing.MockClock
) -> None:
    script = Script(tokens=TOKENS)
    items = events_of(b"".join(render_stream(kind, script, UPSTREAM_MODEL)))
    junk = GARBAGE[garbage]
    middle = len(items) // 2
    # After the upstream comment, in the middle, and just before the last event.
    body = b"".join([items[0], junk, *items[1:middle], junk, *items[middle:-1], junk, items[-1]])
    chunks = [body] if chunking == "whole" else [bytes([b]) for b in body]
    gateway, _ = make_gateway(FakeResponse(body=chunks))
    call = await request_for(kind).run(gateway)

    assert call.status == 200
    assert call.ended
    # The garbage is forwarded, as valid UTF-8: invalid sequences become U+FFFD.
    forwarded = junk.decode("utf-8", "replace").encode()
    assert call.text.count(forwarded) == 3
    events = call.events
    clean = [e for e in events if e.raw != forwarded]
    assert len(events) - len(clean) == 3
    assert_rewritten(kind, call, clean)
    assert delta_text(kind, clean) == expected_text(script)
    assert is_clean_end(kind, events[-1])


# A content delta of the first token, and the same with two invalid UTF-8 bytes in it.
FIRST_DELTA = {
    "chat": (b'"content":"Hello"', b'"content":"He\xff\xfello"'),
    "messages": (b'"text":"Hello"}', b'"text":"He\xff\xfello"}'),
    "responses": (b'"delta":"Hello"', b'"delta":"He\xff\xfello"'),
}


def with_invalid_utf8(kind: StreamKind) -> tuple[bytes, str]:
    """A stream whose first content delta holds invalid UTF-8, and the text a client reads."""
    script = Script(tokens=TOKENS)
    body = b"".join(render_stream(kind, script, UPSTREAM_MODEL))
    valid, invalid = FIRST_DELTA[kind]
    assert body.count(valid) == 1
    text = expected_text(script)
    assert text.startswith("Hello")
    # Each invalid byte is a maximal invalid subpart: one U+FFFD each.
    return body.replace(valid, invalid), "He\ufffd\ufffdllo" + text[len("Hello") :]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
async def test_invalid_utf8_in_a_delta_comes_out_as_replacement_characters(
    kind: StreamKind, chunking: str, autojump_clock: trio.testing.MockClock
) -> None:
    body, text = with_invalid_utf8(kind)
    chunks = [body] if chunking == "whole" else [bytes([b]) for b in body]
    gateway, _ = make_gateway(FakeResponse(body=chunks))
    call = await request_for(kind).run(gateway)
    assert_clean_stream(kind, call, text)


@pytest.mark.parametrize(
    "kind",
    ["chat", "messages", "responses"],
)
async def test_invalid_utf8_in_a_delta_leaves_the_client_body_valid_utf8(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    body, text = with_invalid_utf8(kind)
    gateway, _ = make_gateway(FakeResponse(body=[body]))
    call = await request_for(kind).run(gateway)
    assert call.ended
    assert call.response_headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    # What a strict client (both official SDKs) does with each line.
    decoded = call.text.decode("utf-8")
    assert delta_text(kind, decode(decoded.encode())) == text


# === Layer B: over loopback, against MockUpstream ================================================


@pytest.fixture
async def mock(nursery: trio.Nursery) -> MockUpstream:
    upstream = MockUpstream(Script(tokens=TOKENS), api_key=UPSTREAM_KEY)
    with trio.fail_after(TIME_LIMIT):
        await nursery.start(upstream.serve)
    return upstream


@asynccontextmanager
async def gateway_to(
    mock: MockUpstream, timeouts: Timeouts | None = None
) -> AsyncIterator[Gateway]:
    config = GatewayConfig(
        upstreams={"mock": Upstream("mock", mock.base_url, UPSTREAM_KEY)},
        models={PUBLIC_MODEL: ModelRoute(PUBLIC_MODEL, "mock", UPSTREAM_MODEL, free=True)},
        keys=(KeyEntry("tests", hash_key(CLIENT_KEY)),),
        timeouts=timeouts or Timeouts(),
    )
    gateway = Gateway(config)
    try:
        yield gateway
    finally:
        await gateway.aclose()


async def run_against(
    mock: MockUpstream, kind: StreamKind, script: Script, timeouts: Timeouts | None = None
) -> AsgiCall:
    """One request through a fresh gateway to ``mock`` answering ``script``.

    Returns once the mock's connection is closed too. The caller holds the time limit.
    """
    mock.script = script
    async with gateway_to(mock, timeouts) as gateway:
        call = await request_for(kind).run(gateway)
    assert len(mock.connections) == 1
    await mock.connections[0].closed.wait()
    return call


def writes_of(kind: StreamKind, script: Script) -> list[bytes]:
    """The mock's body writes for ``script`` (one per item), faults aside."""
    return render_stream(kind, script, UPSTREAM_MODEL)


def rewritten_prefix(kind: StreamKind, body: bytes) -> list[EventKey]:
    """What the gateway must have sent for ``body`` received so far (nothing finished)."""
    rewriter = StreamRewriter(POLICIES[kind](PUBLIC_MODEL, free=True))
    return keys(decode(rewriter.feed(body)))


def assert_error_ending(
    kind: StreamKind, call: AsgiCall, failure_type: str, *, timeout: bool = False
) -> list[SSEEvent]:
    """A 200 stream that ended with the kind's error event, never the clean end.

    Returns the events before the error.
    """
    assert call.status == 200
    assert call.response_headers[b"content-type"].startswith(b"text/event-stream")
    assert call.ended
    events = call.events
    assert not [e for e in events if is_clean_end(kind, e)], "a failure must not look clean"
    *before, last = events
    assert_rewritten(kind, call, before, whole=False)  # each event before the error is whole
    payload = payload_of(last)
    if kind == "chat":
        assert last.event is None
        error = payload["error"]
        assert error["code"] == (504 if timeout else 503)
        assert error["type"] == failure_type
        seen_chunk = any(e.data is not None for e in before)
        assert payload.get("id") == ("gen-mock-1" if seen_chunk else None)
    elif kind == "messages":
        assert last.event == "error"
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "api_error"
        assert payload["error"]["message"]
    else:
        assert last.event == "error"
        numbers = [p["sequence_number"] for p in json_payloads(before)]
        assert payload["sequence_number"] == max(numbers, default=-1) + 1
        assert payload["code"] == failure_type
        assert payload["param"] is None
    assert UPSTREAM_KEY.encode() not in call.text
    assert b"127.0.0.1" not in call.text
    return before


def fault_offsets(kind: StreamKind) -> dict[str, int]:
    """Named body offsets at which to fault, from the first byte to the terminating chunk."""
    writes = writes_of(kind, Script(tokens=TOKENS))
    comment, first, last = len(writes[0]), len(writes[1]), len(writes[-1])
    total = sum(map(len, writes))
    return {
        "0": 0,
        "1": 1,
        "after-comment": comment,
        "first-event+1": comment + 1,
        "first-event-middle": comment + first // 2,
        "first-event-before-blank-line": comment + first - 1,
        "after-first-event": comment + first,
        "middle": total // 2,
        "before-last-event": total - last,
        "inside-last-event": total - last // 2,
        "end-1": total - 1,
        "end": total,  # every body byte out, then the fault instead of the last chunk
    }


def fault_cases() -> list[Any]:
    cases = []
    for kind in KINDS:
        for fault in ("reset", "truncate"):
            for name, at in fault_offsets(kind).items():
                cases.append(pytest.param(kind, fault, at, id=f"{kind}-{fault}-{name}"))
    return cases


@pytest.mark.parametrize(("kind", "fault", "at"), fault_cases())
async def test_fault_mid_stream_ends_with_the_kinds_error_event(
    mock: MockUpstream, kind: StreamKind, fault: Fault, at: int
) -> None:
    script = Script(tokens=TOKENS)
    body = b"".join(writes_of(kind, script))
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(mock, kind, Script(tokens=TOKENS, fault=fault, fault_at=at))
    before = assert_error_ending(kind, call, "upstream_reset")
    sent = rewritten_prefix(kind, body[:at])
    if fault == "truncate":
        # A FIN loses nothing: every item completed before the cut went out.
        assert keys(before) == sent
    else:
        # A RST may drop what was still in flight; what did arrive is in order.
        assert keys(before) == sent[: len(before)]
    assert not mock.connections[0].closed_by_peer  # the mock cut it, as scripted


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fault", ["reset", "truncate"])
async def test_fault_before_response_head_is_a_502_in_the_kinds_shape(
    mock: MockUpstream, kind: StreamKind, fault: Fault
) -> None:
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(mock, kind, Script(fault=fault, fault_at=-1))
    assert call.status == 502
    assert call.response_headers[b"content-type"] == b"application/json"
    body = call.json_body()
    if kind == "messages":
        assert body == {
            "type": "error",
            "error": {"type": "api_error", "message": body["error"]["message"]},
        }
    else:
        assert body["error"]["type"] == "upstream_error"
        assert body["error"]["code"] == "upstream_unreachable"
        assert body["error"]["param"] is None
    assert "127.0.0.1" not in call.text.decode()


@pytest.mark.parametrize("kind", KINDS)
async def test_no_response_head_within_first_byte_is_a_504(
    mock: MockUpstream, kind: StreamKind
) -> None:
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(
            mock, kind, Script(fault="stall", fault_at=-1), Timeouts(first_byte=0.3)
        )
    assert call.status == 504
    body = call.json_body()
    if kind == "messages":
        assert body["error"]["type"] == "api_error"
    else:
        assert body["error"]["code"] == "upstream_timeout"
    assert mock.connections[0].closed_by_peer, "the gateway hung up on the silent upstream"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_error_status_passes_through_with_its_body(
    mock: MockUpstream, kind: StreamKind, status: int
) -> None:
    error = render_error(kind, status, f"the provider says no ({status})")
    assert b"model" not in error
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(mock, kind, Script(status=status, error_body=error))
    assert call.status == status
    assert call.response_headers[b"content-type"] == b"application/json"
    assert call.text == error, "a model-free error body goes out unchanged"


HTML = (b"<html><head><title>502 Bad Gateway</title></head>", b"<body>cloudflare</body></html>")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", [200, 502, 503])
async def test_html_answer_becomes_a_json_error_in_the_kinds_shape(
    mock: MockUpstream, kind: StreamKind, status: int
) -> None:
    page = b"".join(HTML)
    if status == 200:  # a chunked 200 with an HTML page instead of the event stream
        script = Script(content_type="text/html", chunks=HTML)
    else:
        script = Script(status=status, content_type="text/html", error_body=page)
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(mock, kind, script)
    assert call.status == (502 if status == 200 else status)  # never a 200 with no answer
    assert call.response_headers[b"content-type"] == b"application/json"
    assert call.response_headers[b"content-length"] == b"%d" % len(call.text)  # sent whole
    assert b"cloudflare" not in call.text
    body = orjson.loads(call.text)
    error = body["error"]
    if kind == "messages":
        assert body["type"] == "error"
    else:
        assert error["code"] == "upstream_invalid"
    assert "not a JSON object" in error["message"]
    assert call.ended


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["after-head", "middle"])
async def test_stalled_upstream_ends_with_idle_timeout_error(
    mock: MockUpstream, kind: StreamKind, where: str
) -> None:
    at = 0 if where == "after-head" else fault_offsets(kind)["middle"]
    body = b"".join(writes_of(kind, Script(tokens=TOKENS)))
    start = time.monotonic()
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(
            mock, kind, Script(tokens=TOKENS, fault="stall", fault_at=at), Timeouts(idle=0.3)
        )
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 3
    before = assert_error_ending(kind, call, "idle_timeout", timeout=True)
    assert keys(before) == rewritten_prefix(kind, body[:at])
    if kind == "messages":
        assert "0.3 s" in payload_of(call.events[-1])["error"]["message"]
    connection = mock.connections[0]
    assert connection.closed_by_peer, "the gateway closed the stalled upstream"


@pytest.mark.parametrize("kind", KINDS)
async def test_long_stream_arrives_complete(mock: MockUpstream, kind: StreamKind) -> None:
    # 64 KiB writes keep it to about a second a kind (one write per event would
    # be ~20,000-40,000 sends); events still straddle the writes.
    with trio.fail_after(TIME_LIMIT):
        call = await run_against(mock, kind, Script(total_bytes=5_000_000, chunk_size=65536))
    assert len(call.text) > 4_000_000
    events = call.events
    if kind == "chat":
        tokens = payload_of(events[-2])["usage"]["completion_tokens"]
    elif kind == "messages":
        tokens = next(payload_of(e) for e in events if e.event == "message_delta")["usage"][
            "output_tokens"
        ]
    else:
        tokens = payload_of(events[-1])["response"]["usage"]["output_tokens"]
    assert tokens > 10_000
    assert_clean_stream(kind, call, expected_text(Script(tokens=tokens)))
