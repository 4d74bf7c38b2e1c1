"""The streaming pipeline and the exchange around it, in memory, on a mock clock.

Every test here runs with ``autojump_clock``: time only moves when every task
is blocked, so timeouts fire exactly at their deadline and a test that waits
minutes of gateway time takes milliseconds.
"""

from __future__ import annotations

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
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    AsgiCall,
    BodyStep,
    FakeBody,
    FakeResponse,
    make_gateway,
    paced,
    sse,
)
from trio_gateway._core.config import Timeouts
from trio_gateway._core.kinds import Failure, FailureType
from trio_gateway._proxy.pipeline import (
    _BATCH_BYTES,
    _BATCH_SECONDS,
    KEEPALIVE_COMMENT,
    Watchdog,
    _Batch,
    stream_events,
)
from trio_gateway._proxy.upstream import ExchangeControl
from trio_gateway._rewrite.base import GATEWAY_COMMENT, PassThroughPolicy, StreamRewriter
from trio_gateway._rewrite.messages import MessagesPolicy
from trio_gateway.sse import SSEDecoder

DATA = Path(__file__).parent / "data"
KINDS = {
    "chat": ("/v1/chat/completions", DATA / "chat.sse"),
    "messages": ("/v1/messages", DATA / "messages.sse"),
    "responses": ("/v1/responses", DATA / "responses.sse"),
}
# The event that would claim a clean, complete answer, per kind.
CLEAN_END = {"chat": "[DONE]", "messages": "message_stop", "responses": "response.completed"}


def request_for(kind: str, **kwargs: Any) -> AsgiCall:
    path, _ = KINDS[kind]
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "stream": True, "messages": []}
    if kind == "responses":
        payload = {"model": PUBLIC_MODEL, "stream": True, "input": "hi"}
    return AsgiCall.json(payload, path=path, **kwargs)


def stream_bytes(kind: str) -> bytes:
    return KINDS[kind][1].read_bytes()


def event_payloads(call: AsgiCall) -> list[Any]:
    return [orjson.loads(e.data) for e in call.events if e.data and e.data != "[DONE]"]


def assert_clean_and_rewritten(kind: str, call: AsgiCall) -> None:
    """The whole example stream arrived, rewritten, ending as upstream ended it."""
    assert call.status == 200
    assert call.ended
    text = call.text
    assert UPSTREAM_MODEL.encode() not in text
    assert b'"cost"' not in text
    assert b"is_byok" not in text
    assert b"cost_details" not in text
    assert b"OPENROUTER" not in text
    events = call.events
    if kind == "chat":
        assert events[0].comment == "trio-gateway"
        assert events[-1].data == "[DONE]"
        chunks = event_payloads(call)
        assert all(chunk["model"] == PUBLIC_MODEL for chunk in chunks)
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert content == "Hello world, this is"
        assert chunks[-1]["usage"]["prompt_tokens"] == 42
    elif kind == "messages":
        assert events[-1].event == "message_stop"
        start = orjson.loads(events[0].data or "")
        assert start["message"]["model"] == PUBLIC_MODEL
        assert start["message"]["usage"]["input_tokens"] == 42
        assert [e.event for e in events].count("content_block_delta") == 5
    else:
        assert events[-1].event == "response.completed"
        done = orjson.loads(events[-1].data or "")
        assert done["response"]["model"] == PUBLIC_MODEL
        assert done["response"]["usage"]["output_tokens"] == 5
        assert [orjson.loads(e.data or "")["sequence_number"] for e in events] == list(range(11))


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_is_rewritten_per_kind(kind: str, autojump_clock: trio.testing.MockClock):
    gateway, upstream = make_gateway(FakeResponse(body=[stream_bytes(kind)]))
    call = await request_for(kind).run(gateway)
    assert_clean_and_rewritten(kind, call)
    assert call.response_headers[b"cache-control"] == b"no-cache, no-transform"
    assert call.response_headers[b"x-accel-buffering"] == b"no"
    assert b"content-length" not in call.response_headers
    assert upstream.request_json["model"] == UPSTREAM_MODEL


def every_chunking(data: bytes) -> list[tuple[str, list[bytes]]]:
    """Whole, one byte at a time, and a spread of two-way splits."""
    splits = [(f"split@{i}", [data[:i], data[i:]]) for i in range(1, len(data), 37)]
    return [("whole", [data]), ("bytewise", [bytes([b]) for b in data]), *splits]


@pytest.mark.parametrize("kind", KINDS)
async def test_any_chunking_gives_the_same_client_stream(
    kind: str, autojump_clock: trio.testing.MockClock
):
    data = stream_bytes(kind)
    outputs = set()
    for _, chunks in every_chunking(data):
        gateway, _ = make_gateway(FakeResponse(body=list(chunks)))
        call = await request_for(kind).run(gateway)
        assert_clean_and_rewritten(kind, call)
        outputs.add(call.text)
    assert len(outputs) == 1


@pytest.mark.parametrize(
    ("kind", "untouched"),
    [("messages", "content_block_delta"), ("responses", "response.output_text.delta")],
)
async def test_unchanged_events_pass_byte_for_byte(
    kind: str, untouched: str, autojump_clock: trio.testing.MockClock
):
    data = stream_bytes(kind).replace(b"\n", b"\r\n")  # CRLF: any re-encoding would show
    gateway, _ = make_gateway(FakeResponse(body=[data]))
    call = await request_for(kind).run(gateway)
    decoder = SSEDecoder()
    sent = [e.raw for e in decoder.feed(data) if e.event == untouched]
    received = [e.raw for e in call.events if e.event == untouched]
    assert len(sent) == 5
    assert received == sent
    # ...while the events that carry the model were re-encoded compactly.
    assert b"\r\n" not in next(e.raw for e in call.events if e.event != untouched)


async def test_crlf_split_utf8_split_bom_and_missing_final_blank_line(
    autojump_clock: trio.testing.MockClock,
):
    chunk = {"id": "g", "model": UPSTREAM_MODEL, "choices": [{"delta": {"content": "naïve 🙂"}}]}
    body = b"\xef\xbb\xbf" + b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"
    last = {
        **chunk,
        "id": "last",
        "choices": [{"delta": {"content": "naïve 🙂"}, "finish_reason": "stop"}],
    }
    body += b"data: " + orjson.dumps(last)  # no blank line, no line end
    # Split inside the BOM, inside the emoji, and between CR and LF.
    emoji_at = body.index("🙂".encode()) + 2
    crlf_at = body.index(b"\r\n") + 1
    cuts = sorted({2, emoji_at, crlf_at})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    gateway, _ = make_gateway(FakeResponse(body=pieces))
    call = await request_for("chat").run(gateway)
    payloads = event_payloads(call)
    assert [p["choices"][0]["delta"]["content"] for p in payloads] == ["naïve 🙂"] * 2
    assert payloads[-1]["id"] == "last"
    assert call.text.endswith(b"\n\n"), "the final event goes out terminated"


async def test_chat_strict_client_fixes(autojump_clock: trio.testing.MockClock):
    body = sse(
        {
            "id": "a",
            "model": UPSTREAM_MODEL,
            "choices": [{"delta": {"role": None, "content": "x"}}],
        },
        {"id": "a", "model": UPSTREAM_MODEL, "usage": {"prompt_tokens": 3, "cost": 1.5}},
        {"id": "a", "model": UPSTREAM_MODEL, "choices": [], "usage": {"prompt_tokens_details": {}}},
        "[DONE]",
    )
    gateway, _ = make_gateway(FakeResponse(body=body))
    call = await request_for("chat").run(gateway)
    first, second, third = event_payloads(call)
    assert first["choices"][0]["delta"] == {"content": "x"}
    assert second["choices"] == []
    assert second["usage"] == {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0}}
    assert third["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_paid_model_keeps_cost(autojump_clock: trio.testing.MockClock):
    gateway, _ = make_gateway(FakeResponse(body=[stream_bytes("chat")]), free=False)
    call = await request_for("chat").run(gateway)
    assert event_payloads(call)[-1]["usage"]["cost"] == 0.00123


async def test_done_only_if_upstream_sent_it_and_last(autojump_clock: trio.testing.MockClock):
    data = stream_bytes("chat").replace(b"data: [DONE]\n\n", b"")
    gateway, _ = make_gateway(FakeResponse(body=[data]))
    call = await request_for("chat").run(gateway)
    assert call.ended
    assert all(e.data != "[DONE]" for e in call.events)

    # Sent early, [DONE] is still delivered last.
    early = [*sse("[DONE]"), data]
    gateway, _ = make_gateway(FakeResponse(body=early))
    call = await request_for("chat").run(gateway)
    assert call.events[-1].data == "[DONE]"
    assert [e.data for e in call.events].count("[DONE]") == 1


def cut_points(data: bytes) -> list[int]:
    return sorted({1, 10, len(data) // 3, len(data) // 2, len(data) - 20, len(data) - 1})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "error", [httpx.RemoteProtocolError("peer closed"), httpx.ReadError("reset by peer")]
)
async def test_upstream_failure_mid_stream_ends_with_error_event(
    kind: str, error: Exception, autojump_clock: trio.testing.MockClock
):
    data = stream_bytes(kind)
    for cut in cut_points(data):
        gateway, upstream = make_gateway(FakeResponse(body=[data[:cut], error]))
        call = await request_for(kind).run(gateway)
        assert call.status == 200
        assert call.ended
        last = call.events[-1]
        clean = [e for e in call.events if CLEAN_END[kind] in (e.data or "", e.event)]
        assert not clean, f"cut at {cut}: a failure must not look like a clean end"
        if kind == "chat":
            payload = orjson.loads(last.data or "")
            assert payload["error"]["code"] == 503
            assert payload["error"]["type"] == "upstream_reset"
        elif kind == "messages":
            assert last.event == "error"
            assert orjson.loads(last.data or "")["error"]["type"] == "api_error"
        else:
            assert last.event == "error"
            payload = orjson.loads(last.data or "")
            before = [orjson.loads(e.data or "") for e in call.events[:-1]]
            expected = max((p["sequence_number"] for p in before), default=-1) + 1
            assert payload["sequence_number"] == expected
            assert payload["param"] is None
        assert upstream.bodies[0].closed_at is not None


async def test_idle_timeout_ends_stream_with_error(autojump_clock: trio.testing.MockClock):
    data = stream_bytes("chat")
    timeouts = Timeouts(idle=30, keepalive=0)
    gateway, upstream = make_gateway(FakeResponse(body=[data[:400], STALL]), timeouts=timeouts)
    start = trio.current_time()
    call = await request_for("chat").run(gateway)
    assert trio.current_time() - start == pytest.approx(30)
    error = orjson.loads(call.events[-1].data or "")["error"]
    assert error["type"] == "idle_timeout"
    assert error["code"] == 504
    assert upstream.bodies[0].closed_at == pytest.approx(start + 30)


async def test_keepalive_during_silence_never_splits_an_event(
    autojump_clock: trio.testing.MockClock,
):
    event = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []})[0]
    body: list[BodyStep] = [event[:10], 40.0, event[10:], *sse("[DONE]")]
    gateway, _ = make_gateway(FakeResponse(body=body), timeouts=Timeouts(keepalive=15, idle=100))
    call = await request_for("chat").run(gateway)
    assert call.parts[:2] == [KEEPALIVE_COMMENT, KEEPALIVE_COMMENT]
    assert call.part_times[1] - call.part_times[0] == pytest.approx(15)
    # The event went out whole, after the keepalives.
    assert orjson.loads(call.events[2].data or "")["model"] == PUBLIC_MODEL
    assert call.events[-1].data == "[DONE]"


async def test_keepalive_off(autojump_clock: trio.testing.MockClock):
    body: list[BodyStep] = [60.0, *sse("[DONE]")]
    gateway, _ = make_gateway(FakeResponse(body=body), timeouts=Timeouts(keepalive=float("inf")))
    call = await request_for("chat").run(gateway)
    assert KEEPALIVE_COMMENT not in call.text


async def test_upstream_comments_replaced_by_gateway_comment(
    autojump_clock: trio.testing.MockClock,
):
    body = [b": OPENROUTER PROCESSING\n\n", b":\n", *sse("[DONE]")]
    gateway, _ = make_gateway(FakeResponse(body=body))
    call = await request_for("chat").run(gateway)
    assert call.text == GATEWAY_COMMENT * 2 + b"data: [DONE]\n\n"


@pytest.mark.parametrize("kind", KINDS)
async def test_client_disconnect_closes_upstream_at_once(
    kind: str, autojump_clock: trio.testing.MockClock
):
    events = stream_bytes(kind).split(b"\n\n")
    body: list[Any] = []
    for raw in events[:4]:
        body += [raw + b"\n\n", 1.0]
    body.append(STALL)
    gateway, upstream = make_gateway(FakeResponse(body=body))
    call = request_for(kind)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(2.5)
        left_at = trio.current_time()
        call.disconnect()
    assert upstream.bodies[0].closed_at == left_at
    assert not call.ended


async def test_stalled_client_releases_upstream(autojump_clock: trio.testing.MockClock):
    data = stream_bytes("chat")
    events = [raw + b"\n\n" for raw in data.split(b"\n\n") if raw]
    timeouts = Timeouts(client_stall=20, keepalive=0)
    gateway, upstream = make_gateway(FakeResponse(body=paced(events)), timeouts=timeouts)
    call = request_for("chat")
    call.reading = trio.Event()  # the client never reads
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(25)
        # The second chunk came at 0.02 s and waited client_stall for the client.
        assert upstream.bodies[0].closed_at == pytest.approx(0.02 + 20)
        assert not call.parts
        call.reading.set()  # the client wakes up: it learns the stream failed
    last = orjson.loads(call.events[-1].data or "")
    assert last["error"]["type"] == "client_stall"
    assert all(e.data != "[DONE]" for e in call.events)


async def test_slow_client_slows_the_upstream_read(autojump_clock: trio.testing.MockClock):
    # 8 KiB events: a batch the writer gathers holds at most 64 KiB of them.
    chunk = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": [], "pad": "x" * 8150})[0]
    assert 8192 <= len(chunk) < 8300
    gateway, upstream = make_gateway(FakeResponse(body=[chunk] * 200 + sse("[DONE]")))
    call = request_for("chat", send_delay=1.0)
    lead = []

    async def watch() -> None:
        while not call.ended:
            if upstream.bodies:
                taken = sum(part.count(b"\n\n") for part in call.parts)  # one event a chunk
                lead.append(upstream.bodies[0].chunks_yielded - taken)
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        nursery.start_soon(watch)
    assert len([event for event in call.events if event.data != "[DONE]"]) == 200
    assert call.events[-1].data == "[DONE]"
    # The reader is never more than the batch in the writer's hands (up to
    # _BATCH_BYTES of chunks that arrived together) and the one chunk waiting
    # to be handed over ahead of what the client has taken.
    assert max(lead) <= -(-_BATCH_BYTES // len(chunk)) + 2  # a batch stops once past the cap
    assert 200 / 10 <= len(call.parts) < 200 / 4  # batches did form


async def test_runaway_event_is_a_rewrite_error(autojump_clock: trio.testing.MockClock):
    body = [b"data: " + b"x" * 1000] * 2000  # never a line end
    gateway, upstream = make_gateway(FakeResponse(body=body), max_event_bytes=64 * 1024)
    call = await request_for("messages").run(gateway)
    last = call.events[-1]
    assert last.event == "error"
    assert "grew past" in orjson.loads(last.data or "")["error"]["message"]
    assert upstream.bodies[0].chunks_yielded < 100
    assert upstream.bodies[0].closed_at is not None


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unreachable"),
        (httpx.ConnectTimeout("slow"), 504, "upstream_timeout"),
        (httpx.RemoteProtocolError("closed"), 502, "upstream_unreachable"),
    ],
)
async def test_failure_before_headers_is_json_error(
    error: Exception, status: int, error_type: str, autojump_clock: trio.testing.MockClock
):
    for kind in KINDS:
        gateway, _ = make_gateway(FakeResponse(error=error))
        call = await request_for(kind).run(gateway)
        assert call.status == status
        body = call.json_body()
        if kind == "messages":
            assert body["type"] == "error"
            assert body["error"]["type"] == "api_error"
        else:
            assert body["error"]["code"] == error_type
        assert UPSTREAM_KEY.encode() not in call.text
        assert b"upstream.invalid" not in call.text


async def test_first_byte_timeout(autojump_clock: trio.testing.MockClock):
    timeouts = Timeouts(first_byte=120)
    gateway, _ = make_gateway(FakeResponse(headers_delay=1e6), timeouts=timeouts)
    start = trio.current_time()
    call = await request_for("chat").run(gateway)
    assert trio.current_time() - start == pytest.approx(120)
    assert call.status == 504
    assert "120 s" in call.json_body()["error"]["message"]


async def test_client_disconnect_before_headers_cancels_request(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = make_gateway(FakeResponse(headers_delay=1e6))
    call = request_for("chat")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(5)
        call.disconnect()
    assert trio.current_time() == pytest.approx(5)
    assert call.status is None
    assert len(upstream.requests) == 1


async def test_shutdown_drain_ends_open_streams_with_error(
    autojump_clock: trio.testing.MockClock,
):
    data = stream_bytes("messages")
    gateway, upstream = make_gateway(FakeResponse(body=[data[:300], STALL]))
    call = request_for("messages")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(1)
        await gateway.drain(grace=10)
    assert trio.current_time() == pytest.approx(11)
    last = call.events[-1]
    assert last.event == "error"
    assert "shutting down" in orjson.loads(last.data or "")["error"]["message"]
    assert upstream.bodies[0].closed_at == pytest.approx(11)


async def test_drain_returns_early_when_streams_finish(autojump_clock: trio.testing.MockClock):
    data = stream_bytes("chat")
    gateway, _ = make_gateway(FakeResponse(body=[data[:300], 3.0, data[300:]]))
    call = request_for("chat")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(1)
        await gateway.drain(grace=100)
        assert trio.current_time() == pytest.approx(3)
    assert_clean_and_rewritten("chat", call)


async def test_connect_timeout_goes_with_every_upstream_request(
    autojump_clock: trio.testing.MockClock,
):
    # httpcore reads the timeouts from each request, and requests go to the
    # transport without an httpx client: each must carry them itself.
    gateway, upstream = make_gateway(
        FakeResponse(body=sse("[DONE]")), timeouts=Timeouts(connect=7, first_byte=99)
    )
    for _ in range(2):
        await request_for("chat").run(gateway)
    for request in upstream.requests:
        # read is None: idle is the gateway's own scope, per chunk.
        timeout = {"connect": 7, "pool": 7, "write": 99, "read": None}
        assert request.extensions["timeout"] == timeout


def test_nothing_parses_sse_with_splitlines_or_aiter_lines():
    # str.splitlines() splits on U+2028, U+0085, form feed...; httpx's aiter_lines
    # likewise. Only the codec finds SSE line ends.
    package = Path(__file__).parent.parent / "trio_gateway"
    sources = sorted(package.rglob("*.py"))  # recursive: the code lives in subpackages
    assert package / "_proxy" / "pipeline.py" in sources
    assert package / "_rewrite" / "base.py" in sources
    offenders = [
        str(path.relative_to(package))
        for path in sources
        if "splitlines(" in path.read_text() or "aiter_lines" in path.read_text()
    ]
    assert offenders == []


async def test_drain_stops_a_request_waiting_for_upstream_headers(
    autojump_clock: trio.testing.MockClock,
):
    gateway, _ = make_gateway(FakeResponse(headers_delay=1e6))
    call = request_for("messages")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(1)
        await gateway.drain(grace=5)
    assert trio.current_time() == pytest.approx(6)
    assert call.status == 503
    assert call.json_body()["error"]["type"] == "overloaded_error"
    # A request that arrives once the grace has run out is stopped at once.
    late = await request_for("chat").run(gateway)
    assert late.status == 503
    assert trio.current_time() == pytest.approx(6)


async def test_drain_stops_a_whole_body_read(autojump_clock: trio.testing.MockClock):
    answer = FakeResponse(body=[b'{"model": "x", ', STALL], content_type="application/json")
    gateway, upstream = make_gateway(answer)
    call = AsgiCall.json({"model": PUBLIC_MODEL, "messages": []})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(1)
        await gateway.drain(grace=2)
    assert call.status == 503
    assert "shutting down" in call.json_body()["error"]["message"]
    assert upstream.bodies[0].closed_at == pytest.approx(3)


async def test_upstream_is_closed_before_the_error_event_goes_out(
    autojump_clock: trio.testing.MockClock,
):
    data = stream_bytes("chat")
    body: list[BodyStep] = [data[:300], httpx.ReadError("reset")]
    gateway, upstream = make_gateway(FakeResponse(body=body))
    call = await request_for("chat", send_delay=10.0).run(gateway)
    closed_at = upstream.bodies[0].closed_at
    assert closed_at is not None
    # Sending each part takes the slow client 10 s; the upstream was already
    # closed when the error event started on its way.
    assert closed_at <= call.part_times[-1] - 10
    assert "error" in orjson.loads(call.events[-1].data or "")


@pytest.mark.parametrize(
    ("kind", "terminal"), [("messages", "message_stop"), ("responses", "response.completed")]
)
async def test_terminal_event_is_held_until_the_upstream_ends_cleanly(
    kind: str, terminal: str, autojump_clock: trio.testing.MockClock
):
    data = stream_bytes(kind)
    # Everything arrives, terminal event included, then the connection breaks.
    gateway, _ = make_gateway(FakeResponse(body=[data, httpx.RemoteProtocolError("cut")]))
    call = await request_for(kind).run(gateway)
    names = [e.event for e in call.events]
    assert terminal not in names
    assert names[-1] == "error"
    if kind == "responses":
        numbers = [orjson.loads(e.data or "")["sequence_number"] for e in call.events]
        assert numbers == list(range(len(numbers))), "the error event numbers on from the last sent"


async def test_streamed_transcription_of_a_free_model_loses_its_cost(
    autojump_clock: trio.testing.MockClock,
):
    event = {"type": "transcript.text.done", "text": "hi", "usage": {"seconds": 3, "cost": 0.1}}
    gateway, _ = make_gateway(FakeResponse(body=sse(event)))
    boundary = "b0undary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{PUBLIC_MODEL}\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    call = AsgiCall(
        path="/v1/audio/transcriptions",
        body=form,
        headers=[
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"authorization", f"Bearer {CLIENT_KEY}".encode()),
        ],
    )
    await call.run(gateway)
    assert orjson.loads(call.events[0].data or "")["usage"] == {"seconds": 3}


class _Collected:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ended = False

    async def send(self, data: bytes) -> None:
        self.parts.append(data)

    async def end(self, data: bytes) -> None:
        self.parts.append(data)
        self.ended = True


async def test_stream_stopped_before_its_first_read_ends_with_error(
    autojump_clock: trio.testing.MockClock,
):
    upstream_body = FakeBody([stream_bytes("messages")])
    response = httpx.Response(200, stream=upstream_body)
    control = ExchangeControl()
    control.stop(Failure(FailureType.SHUTDOWN, "the gateway is shutting down"))
    client = _Collected()
    rewriter = StreamRewriter(MessagesPolicy(PUBLIC_MODEL, free=True))
    result = await stream_events(response, rewriter, client, Timeouts(), control)
    assert result.failure == control.failure
    assert client.ended
    assert client.parts[-1].startswith(b"event: error\n")
    assert upstream_body.chunks_yielded == 0
    assert upstream_body.closed_at is not None


async def test_client_body_is_valid_utf8_whatever_the_upstream_sent(
    autojump_clock: trio.testing.MockClock,
):
    delta = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}'
    body = [
        b"event: content_block_delta\nid: \xff1\ndata: " + delta + b"\n\n",
        b"x-unknown: \xc3\n\n",
        b"event: message_stop\ndata: {}\n\n",
    ]
    gateway, _ = make_gateway(FakeResponse(body=body))
    call = await request_for("messages").run(gateway)
    text = call.text.decode("utf-8")  # what both official SDKs do, strictly
    assert "id: \ufffd1\n" in text
    assert "x-unknown: \ufffd\n" in text
    assert call.events[-1].event == "message_stop"


async def test_upstream_failure_while_the_client_is_stalled_is_still_a_failure(
    autojump_clock: trio.testing.MockClock,
):
    event = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []})[0]
    body: list[BodyStep] = [event, 5.0, httpx.ReadError("reset")]
    timeouts = Timeouts(client_stall=20, keepalive=0)
    gateway, upstream = make_gateway(FakeResponse(body=body), timeouts=timeouts)
    call = request_for("chat")
    call.reading = trio.Event()  # the client takes nothing...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(40)
        closed_at = upstream.bodies[0].closed_at
        call.reading.set()  # ...until long after the upstream failed
    assert closed_at == pytest.approx(5)
    assert call.ended
    # The failure was never handed over (the writer was stuck), yet the stream
    # must not end as if it were complete.
    assert "error" in orjson.loads(call.events[-1].data or "")


async def test_client_disconnect_during_a_whole_answer_closes_upstream(
    autojump_clock: trio.testing.MockClock,
):
    answer = FakeResponse(body=[b'{"model": "x", ', STALL], content_type="application/json")
    gateway, upstream = make_gateway(answer)
    call = AsgiCall.json({"model": PUBLIC_MODEL, "messages": []})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(7)
        call.disconnect()
    assert upstream.bodies[0].closed_at == pytest.approx(7)
    assert call.status is None  # nothing was sent: the answer was never whole


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
async def test_upstream_key_echoed_in_a_stream_is_redacted(
    chunk_size: int, autojump_clock: trio.testing.MockClock
):
    echo = UPSTREAM_KEY
    body = b"".join(
        sse(
            {"id": "1", "model": UPSTREAM_MODEL, "choices": [{"delta": {"content": echo}}]},
            # Needs no change, so it passes through byte for byte, but for the key.
            f'{{"id":"1","choices":[],"note":"it quotes Bearer {echo}"}}',
            {"id": "1", "choices": [], "usage": {"prompt_tokens": 1, "note": echo}},
            "[DONE]",
        )
    )
    chunks: list[BodyStep] = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    gateway, _ = make_gateway(FakeResponse(body=chunks))
    call = await request_for("chat").run(gateway)
    assert call.status == 200
    assert UPSTREAM_KEY.encode() not in call.text
    assert call.text.count(b"[redacted]") == 3
    assert b'data: {"id":"1","choices":[],"note":"it quotes Bearer [redacted]"}\n\n' in call.text
    assert call.events[-1].data == "[DONE]"


async def test_a_batch_is_full_at_its_size_or_after_its_time(
    autojump_clock: trio.testing.MockClock,
):
    """Gathering stops at 64 KiB, or once it has taken 5 ms of passes (docs/architecture.md).

    The figures are written out: a test that read them from the constants
    would pass whatever the constants became.
    """
    assert (_BATCH_BYTES, _BATCH_SECONDS) == (64 * 1024, 0.005)
    batch = _Batch()
    assert not batch.full(), "an empty batch waits for its first chunk"
    batch.add(b"x" * 100, arrived_at=trio.current_time())
    assert not batch.full()
    autojump_clock.jump(0.0049)
    assert not batch.full(), "a batch may gather for 5 ms"
    autojump_clock.jump(0.0002)
    assert batch.full(), "a busy scheduler must not hold an event back for more than 5 ms"
    assert batch.take() == b"x" * 100
    batch.add(b"y" * (64 * 1024 - 1), arrived_at=trio.current_time())
    assert not batch.full()
    batch.add(b"y", arrived_at=trio.current_time())
    assert batch.full(), "a batch is full at 64 KiB"


# --- The watchdog: every timer at its exact deadline -------------------------------------------


async def test_a_stall_that_begins_while_the_watchdog_sleeps_fires_on_time(
    autojump_clock: trio.testing.MockClock,
):
    # The watchdog last looked at 0 s, when only the idle timer (300 s) ran. A
    # hand-over that begins at 10 s must still time out at exactly 10 + 60 s.
    first, second = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []}) * 2
    timeouts = Timeouts(idle=300, client_stall=60, keepalive=0)
    body: list[BodyStep] = [first, 10.0, second, STALL]
    gateway, upstream = make_gateway(FakeResponse(body=body), timeouts=timeouts)
    call = request_for("chat")
    call.reading = trio.Event()  # the client takes nothing: the first send never returns
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(100)
        assert upstream.bodies[0].closed_at == start + 70
        call.reading.set()
    assert orjson.loads(call.events[-1].data or "")["error"]["type"] == "client_stall"


async def test_keepalives_count_from_the_last_chunk_exactly(
    autojump_clock: trio.testing.MockClock,
):
    event = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []})[0]
    body: list[BodyStep] = [7.0, event, 22.0, event, 31.0, *sse("[DONE]")]
    gateway, _ = make_gateway(FakeResponse(body=body), timeouts=Timeouts(keepalive=15, idle=100))
    start = trio.current_time()
    call = await request_for("chat").run(gateway)
    keepalives = [
        t - start
        for part, t in zip(call.parts, call.part_times, strict=True)
        if part == KEEPALIVE_COMMENT
    ]
    # Silence 0-7: none. Silence 7-29: one at 22. Silence 29-60: at 44 and 59.
    assert keepalives == [22.0, 44.0, 59.0]


async def test_idle_counts_from_the_last_chunk_exactly(autojump_clock: trio.testing.MockClock):
    event = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []})[0]
    body: list[BodyStep] = [10.0, event, 15.0, event, STALL]
    timeouts = Timeouts(idle=30, keepalive=12)
    gateway, upstream = make_gateway(FakeResponse(body=body), timeouts=timeouts)
    start = trio.current_time()
    call = await request_for("chat").run(gateway)
    assert upstream.bodies[0].closed_at == start + 25 + 30
    assert orjson.loads(call.events[-1].data or "")["error"]["type"] == "idle_timeout"
    # Keepalives went on meanwhile (at 22, 37 and 49 s), each a whole item between events.
    times = [t - start for part, t in zip(call.parts, call.part_times, strict=True)]
    keepalives = [t for part, t in zip(call.parts, times, strict=True) if part == KEEPALIVE_COMMENT]
    assert keepalives == [22.0, 37.0, 49.0]


async def test_one_watchdog_times_every_stream_of_a_gateway_exactly(
    autojump_clock: trio.testing.MockClock,
):
    # Three streams begin at 0, 4 and 9 s; each sends one event, then nothing.
    # Each has its own keepalives (12 s after its event, then 24) and its own
    # idle timeout (30 s after its event), though one task times them all.
    event = sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []})[0]
    gateway, upstream = make_gateway(
        FakeResponse(body=[event, STALL]), timeouts=Timeouts(idle=30, keepalive=12)
    )
    calls = [request_for("chat") for _ in range(3)]
    starts: list[float] = []
    async with trio.open_nursery() as nursery:
        for call, delay in zip(calls, [0, 4, 5], strict=True):
            await trio.sleep(delay)
            starts.append(trio.current_time())
            nursery.start_soon(call.run, gateway)
    watchdog = gateway._exchanger._watchdog
    for call, body, start in zip(calls, upstream.bodies, starts, strict=True):
        assert body.closed_at == start + 30
        keepalives = [
            t - start
            for part, t in zip(call.parts, call.part_times, strict=True)
            if part == KEEPALIVE_COMMENT
        ]
        assert keepalives == [12.0, 24.0]
        assert orjson.loads(call.events[-1].data or "")["error"]["type"] == "idle_timeout"
    assert gateway._exchanger._watchdog is watchdog  # one per run, not one per stream
    assert watchdog.size == 0  # every stream left it when it fired


async def test_a_stream_with_shorter_timers_wakes_a_sleeping_watchdog(
    autojump_clock: trio.testing.MockClock,
):
    # The watchdog sleeps towards the first stream's first look (1000 s). A
    # second stream, with a 5 s idle timeout, arrives at 2 s: it must still
    # time out at exactly 7 s.
    watchdog = Watchdog()
    slow_body, quick_body = FakeBody([STALL]), FakeBody([STALL])
    ended: dict[str, float] = {}

    async def stream(name: str, body: FakeBody, timeouts: Timeouts) -> None:
        response = httpx.Response(200, stream=body)
        rewriter = StreamRewriter(MessagesPolicy(PUBLIC_MODEL, free=True))
        result = await stream_events(
            response, rewriter, _Collected(), timeouts, ExchangeControl(), watchdog=watchdog
        )
        assert result.failure is not None
        assert result.failure.type is FailureType.IDLE_TIMEOUT
        ended[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run)
        async with trio.open_nursery() as streams:
            streams.start_soon(stream, "slow", slow_body, Timeouts(idle=1000, keepalive=2000))
            await trio.sleep(2)
            streams.start_soon(stream, "quick", quick_body, Timeouts(idle=5, keepalive=2000))
        nursery.cancel_scope.cancel(reason="test over")
    assert ended == {"quick": start + 7, "slow": start + 1000}
    assert quick_body.closed_at == start + 7


async def test_ended_streams_do_not_pile_up_in_the_watchdog(
    autojump_clock: trio.testing.MockClock,
):
    # 500 streams that end at once, with timers minutes long: the heap is
    # rebuilt without them once they are over half of it, not kept for minutes.
    watchdog = Watchdog()
    answer = b"".join(sse({"id": "a", "model": UPSTREAM_MODEL, "choices": []}, "[DONE]"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog.run)
        for _ in range(500):
            response = httpx.Response(200, stream=FakeBody([answer]))
            rewriter = StreamRewriter(PassThroughPolicy(PUBLIC_MODEL, free=True))
            result = await stream_events(
                response, rewriter, _Collected(), Timeouts(), ExchangeControl(), watchdog=watchdog
            )
            assert result.failure is None
            assert watchdog.size <= 64
        nursery.cancel_scope.cancel(reason="test over")


async def test_a_chunk_whose_only_change_is_the_model_keeps_every_other_byte(
    autojump_clock: trio.testing.MockClock,
):
    compact = (
        b'id: 4\r\ndata: {"id":"a","model":"' + UPSTREAM_MODEL.encode() + b'","choices":[]}\r\n\r\n'
    )
    spaced = b'data: {"id": "b", "model": "' + UPSTREAM_MODEL.encode() + b'", "choices": []}\n\n'
    finish = sse(
        {"id": "c", "model": UPSTREAM_MODEL, "choices": [{"delta": {}, "finish_reason": "stop"}]}
    )
    gateway, _ = make_gateway(FakeResponse(body=[compact, spaced, *finish]))
    call = await request_for("chat").run(gateway)
    # The compact chunk: only the model's bytes swapped; its CRLF and id line stay.
    expected = compact.replace(UPSTREAM_MODEL.encode(), PUBLIC_MODEL.encode())
    assert call.text.startswith(expected)
    # The spaced one takes the slow path: re-serialised compactly, same meaning.
    assert orjson.loads(call.events[1].data or "") == {
        "id": "b",
        "model": PUBLIC_MODEL,
        "choices": [],
    }
    assert UPSTREAM_MODEL.encode() not in call.text
