"""Tests of the mock upstream: its rendered bytes, then its server on real sockets.

Rules for these tests:

* Rendering tests use no I/O: they decode the rendered writes with the
  gateway's own :class:`SSEDecoder`, so the mock and the codec check each other.
* Server tests listen on 127.0.0.1, port 0, in pytest-trio's ``nursery``
  fixture (cancelled when the test ends), and run under ``trio.fail_after(10)``.
* Timing tests use the smallest real delays that still show the behaviour.
* In each fault test one side is chosen to close first.
"""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from trio_gateway.sse import SSEDecoder, SSEEvent
from trio_gateway.testing.mock_upstream import (
    CREATED,
    DEFAULT_MODEL,
    PROMPT_TOKENS,
    WORDS,
    MockRequest,
    MockUpstream,
    Script,
    StreamKind,
    expected_text,
    iter_stream,
    render_embeddings,
    render_error,
    render_json,
    render_stream,
    script_from_request,
    usage_cost,
)

KINDS: tuple[StreamKind, ...] = ("chat", "messages", "responses")
PATHS = {"chat": "/chat/completions", "messages": "/messages", "responses": "/responses"}
EXAMPLES = Path(__file__).with_name("data")  # copies of the reference example streams
MODEL = "vendor/model:free"


def decode(writes: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    items = [item for write in writes for item in decoder.feed(write)]
    return items + decoder.close()


def payloads(items: list[SSEEvent]) -> list[Any]:
    """The JSON of every data event ([DONE] as the string)."""
    return [
        item.data if item.data == "[DONE]" else orjson.loads(item.data or "")
        for item in items
        if item.comment is None
    ]


def text_of(kind: str, items: list[SSEEvent]) -> str:
    out: list[str] = []
    for obj in payloads(items):
        if kind == "chat" and isinstance(obj, dict):
            out.extend(choice["delta"].get("content") or "" for choice in obj["choices"])
        elif kind == "messages" and obj["type"] == "content_block_delta":
            out.append(obj["delta"]["text"])
        elif kind == "responses" and obj["type"] == "response.output_text.delta":
            out.append(obj["delta"])
    return "".join(out)


def usage_of(kind: str, items: list[SSEEvent]) -> dict[str, Any]:
    objs = [obj for obj in payloads(items) if isinstance(obj, dict)]
    if kind == "chat":
        return dict(objs[-1]["usage"])
    if kind == "messages":
        return dict(objs[-2]["usage"])
    return dict(objs[-1]["response"]["usage"])


# --- Rendering --------------------------------------------------------------------------------


def test_chat_stream_sequence() -> None:
    items = decode(render_stream("chat", Script(tokens=5), MODEL))
    assert items[0].comment == "OPENROUTER PROCESSING"
    chunks = payloads(items)
    assert chunks[-1] == "[DONE]"
    first, *deltas, finish, usage_chunk, _ = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"]["content"] for d in deltas] == list(WORDS[:5])
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *deltas])
    assert finish["choices"][0]["finish_reason"] == "stop"
    for chunk in chunks[:-1]:
        assert chunk["id"] == "gen-mock-1"
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["model"], chunk["created"]) == (MODEL, CREATED)
    assert usage_chunk["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 5,
        "total_tokens": PROMPT_TOKENS + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
        "cost": usage_cost(PROMPT_TOKENS, 5),
        "is_byok": False,
        "cost_details": {"upstream_inference_cost": None},
    }


def test_messages_stream_sequence() -> None:
    items = decode(render_stream("messages", Script(tokens=4), MODEL))[1:]
    assert [item.event for item in items] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    objs = payloads(items)
    assert all(obj["type"] == item.event for obj, item in zip(objs, items, strict=True))
    start = objs[0]["message"]
    assert (start["model"], start["id"]) == (MODEL, "msg_mock_1")
    assert start["usage"]["input_tokens"] == PROMPT_TOKENS
    assert start["usage"]["cost"] == usage_cost(PROMPT_TOKENS, 0)
    delta = objs[-2]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 4
    assert delta["usage"]["cost"] == usage_cost(PROMPT_TOKENS, 4)


def test_responses_stream_sequence() -> None:
    items = decode(render_stream("responses", Script(tokens=3), MODEL))[1:]
    assert [item.event for item in items] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    objs = payloads(items)
    assert [obj["sequence_number"] for obj in objs] == list(range(len(objs)))
    assert all(obj["type"] == item.event for obj, item in zip(objs, items, strict=True))
    assert objs[0]["response"]["model"] == MODEL
    text = "".join(WORDS[:3])
    assert objs[-4]["text"] == objs[-3]["part"]["text"] == text
    completed = objs[-1]["response"]
    assert completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == text
    assert completed["usage"] == {
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": 3,
        "total_tokens": PROMPT_TOKENS + 3,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
        "cost": usage_cost(PROMPT_TOKENS, 3),
        "is_byok": False,
        "cost_details": {"upstream_inference_cost": None},
    }


def keys_cover(ours: Any, example: Any) -> bool:
    """Whether every key of ``example`` is in ``ours``, recursively, with the same JSON type."""
    if isinstance(example, dict):
        return isinstance(ours, dict) and all(
            key in ours and keys_cover(ours[key], value) for key, value in example.items()
        )
    if isinstance(example, list):
        return isinstance(ours, list) and all(keys_cover(ours[0], item) for item in example[:1])
    if example is None or ours is None:
        return True
    return type(ours) is type(example) or {type(ours), type(example)} == {int, float}


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="the reference examples are not here")
@pytest.mark.parametrize("kind", KINDS)
def test_stream_has_the_shapes_of_the_reference_example(kind: StreamKind) -> None:
    example = decode([(EXAMPLES / f"{kind}.sse").read_bytes()])
    ours = decode(render_stream(kind, Script(tokens=5), MODEL))

    def by_type(items: list[SSEEvent]) -> dict[object, Any]:
        events = [item for item in items if item.comment is None]
        found: dict[object, Any] = {}
        for item, obj in zip(events, payloads(items), strict=True):
            shape = "usage" in obj if isinstance(obj, dict) else obj
            found.setdefault((item.event, shape), obj)
        return found

    ours_by_type = by_type(ours)
    for key, obj in by_type(example).items():
        assert key in ours_by_type, key
        assert keys_cover(ours_by_type[key], obj), key


@pytest.mark.parametrize("kind", KINDS)
def test_stream_text_and_usage(kind: StreamKind) -> None:
    script = Script(tokens=len(WORDS) + 3)
    items = decode(render_stream(kind, script, MODEL))
    assert text_of(kind, items) == expected_text(script)
    usage = usage_of(kind, items)
    assert usage["cost"] == usage_cost(PROMPT_TOKENS, script.tokens)
    assert usage.get("completion_tokens", usage.get("output_tokens")) == script.tokens


def test_expected_text_has_multibyte_utf8() -> None:
    text = expected_text(Script(tokens=len(WORDS)))
    assert {"café", "naïve", "🙂", "日本語"} <= set(text.replace(",", " ").split())
    assert expected_text(Script(tokens=0)) == ""


@pytest.mark.parametrize("kind", KINDS)
def test_json_bodies(kind: StreamKind) -> None:
    script = Script(tokens=7)
    obj = orjson.loads(render_json(kind, script, MODEL))
    assert obj["model"] == MODEL
    text = expected_text(script)
    if kind == "chat":
        assert obj["object"] == "chat.completion"
        assert obj["choices"][0]["message"] == {"role": "assistant", "content": text}
        assert obj["usage"]["completion_tokens"] == 7
    elif kind == "messages":
        assert (obj["type"], obj["stop_reason"]) == ("message", "end_turn")
        assert obj["content"] == [{"type": "text", "text": text}]
        assert obj["usage"]["output_tokens"] == 7
    else:
        assert (obj["object"], obj["status"]) == ("response", "completed")
        assert obj["output"][0]["content"][0]["text"] == text
        assert obj["usage"]["total_tokens"] == PROMPT_TOKENS + 7
    assert obj["usage"]["cost"] == usage_cost(PROMPT_TOKENS, 7)
    assert b'"cost"' not in render_json(kind, Script(cost=False), MODEL)


@pytest.mark.parametrize("kind", KINDS)
def test_one_byte_writes(kind: StreamKind) -> None:
    whole = b"".join(render_stream(kind, Script(), MODEL))
    writes = render_stream(kind, Script(chunk_size=1), MODEL)
    assert all(len(write) == 1 for write in writes)
    assert b"".join(writes) == whole
    assert text_of(kind, decode(writes)) == expected_text(Script())


def test_chunk_size_recuts_the_whole_body() -> None:
    whole = b"".join(render_stream("chat", Script(), MODEL))
    writes = render_stream("chat", Script(chunk_size=100), MODEL)
    assert [len(w) for w in writes] == [100] * (len(whole) // 100) + [len(whole) % 100]
    assert b"".join(writes) == whole


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("line_ending", ["\r\n", "\r"])
def test_line_endings(kind: StreamKind, line_ending: str) -> None:
    lf = b"".join(render_stream(kind, Script(), MODEL))
    other = render_stream(kind, Script(line_ending=line_ending), MODEL)
    assert b"".join(other) == lf.replace(b"\n", line_ending.encode())
    assert payloads(decode(other)) == payloads(decode([lf]))


def test_bom() -> None:
    plain = render_stream("chat", Script(), MODEL)
    writes = render_stream("chat", Script(bom=True), MODEL)
    assert writes[0] == b"\xef\xbb\xbf" + plain[0]
    assert writes[1:] == plain[1:]
    assert decode(writes) == decode(plain)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_final_blank_line(kind: StreamKind) -> None:
    plain = render_stream(kind, Script(), MODEL)
    writes = render_stream(kind, Script(final_blank_line=False), MODEL)
    assert writes[:-1] == plain[:-1]
    assert writes[-1] == plain[-1][:-1]
    decoder = SSEDecoder()
    fed = [item for write in writes for item in decoder.feed(write)]
    assert len(fed) == len(decode(plain)) - 1  # the last event waits for the stream's end
    assert [i.data for i in fed + decoder.close()] == [i.data for i in decode(plain)]


def test_comment_option() -> None:
    assert (
        render_stream("chat", Script(comment=None), MODEL)
        == render_stream("chat", Script(), MODEL)[1:]
    )
    assert render_stream("chat", Script(comment="keep-alive"), MODEL)[0] == b": keep-alive\n\n"
    assert render_stream("chat", Script(comment=""), MODEL)[0] == b":\n\n"


def test_done_options() -> None:
    kind: StreamKind
    assert render_stream("chat", Script(), MODEL)[-1] == b"data: [DONE]\n\n"
    assert b"[DONE]" not in b"".join(render_stream("chat", Script(send_done=False), MODEL))
    for kind in ("messages", "responses"):
        assert b"[DONE]" not in b"".join(render_stream(kind, Script(), MODEL))
        both = render_stream(kind, Script(send_done_all_kinds=True), MODEL)
        assert both[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("kind", KINDS)
def test_cost_option(kind: StreamKind) -> None:
    body = b"".join(render_stream(kind, Script(cost=False), MODEL))
    assert b"cost" not in body
    assert b"is_byok" not in body


def test_chunks_override_the_rendered_stream() -> None:
    chunks = (b"data: {}\n", b"\n", b"garbage")
    assert render_stream("messages", Script(chunks=chunks, bom=True, chunk_size=1), MODEL) == list(
        chunks
    )


@pytest.mark.parametrize("kind", KINDS)
def test_total_bytes(kind: StreamKind) -> None:
    writes = render_stream(kind, Script(total_bytes=50_000), MODEL)
    size = sum(map(len, writes))
    assert 50_000 <= size < 52_000
    items = decode(writes)
    usage = usage_of(kind, items)
    tokens = usage["completion_tokens" if kind == "chat" else "output_tokens"]
    assert text_of(kind, items) == expected_text(Script(tokens=tokens))
    if kind == "responses":
        numbers = [obj["sequence_number"] for obj in payloads(items)]
        assert numbers == list(range(len(numbers)))


def test_total_bytes_is_lazy() -> None:
    writes = iter_stream("responses", Script(total_bytes=10**15), MODEL)
    first = list(itertools.islice(writes, 20_000))
    assert sum(map(len, first)) > 2_000_000
    assert orjson.loads(first[-1].split(b"data: ")[1])["sequence_number"] == 20_000 - 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens": -1},
        {"pace": -0.1},
        {"chunk_size": 0},
        {"line_ending": "\n\n"},
        {"comment": "a\nb"},
        {"status": 99},
        {"total_bytes": -1},
        {"fault": "explode"},
        {"framing": "gzip"},
        {"garble": "nice"},
    ],
)
def test_script_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|cannot"):
        Script(**kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("style", ["junk", "cut"])
def test_garble_event(kind: StreamKind, style: Any) -> None:
    plain = decode(render_stream(kind, Script(tokens=3), MODEL))
    for index in (0, 2, -1, -2):
        garbled = decode(
            render_stream(kind, Script(tokens=3, garble_event=index, garble=style), MODEL)
        )
        assert [item.event for item in garbled] == [item.event for item in plain]
        events = [i for i, item in enumerate(plain) if item.comment is None]
        hit = events[index]
        for i, (ours, theirs) in enumerate(zip(garbled, plain, strict=True)):
            if i != hit:
                assert ours == theirs
        data, original = garbled[hit].data or "", plain[hit].data or ""
        assert data.endswith("}{ not json")
        assert data.startswith(original[: len(original) // 2] if style == "cut" else "}")
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(data)


def test_garble_json_body() -> None:
    body = render_json("chat", Script(), MODEL)
    assert render_json("chat", Script(garble_event=0), MODEL) == b"}{ not json"
    assert render_json("chat", Script(garble_event=0, garble="cut"), MODEL) == (
        body[: len(body) // 2] + b"}{ not json"
    )


def test_render_embeddings_and_errors() -> None:
    obj = orjson.loads(render_embeddings("emb", ["one two", "three"]))
    assert obj["object"] == "list"
    assert [d["index"] for d in obj["data"]] == [0, 1]
    assert len(obj["data"][0]["embedding"]) == 8
    assert obj["usage"]["prompt_tokens"] == obj["usage"]["total_tokens"] == 3
    assert render_embeddings("emb", ["x"]) == render_embeddings("emb", ["x"])
    assert orjson.loads(render_error("chat", 429, "slow down")) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "code": 429, "param": None}
    }
    assert orjson.loads(render_error("messages", 529, "busy")) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "busy"},
    }


# --- The server -------------------------------------------------------------------------------


async def start(nursery: trio.Nursery, script: Any = None, **kwargs: Any) -> MockUpstream:
    mock = MockUpstream(script or Script(), **kwargs)
    await nursery.start(mock.serve)
    return mock


def client(mock: MockUpstream, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=mock.base_url, trust_env=False, **kwargs)


async def stream_into(received: bytearray, mock: MockUpstream, kind: StreamKind) -> None:
    """Stream a response of ``kind`` with httpx, appending its raw body to ``received``."""
    async with (
        client(mock) as http,
        http.stream("POST", PATHS[kind], json=request_body(kind, stream=True)) as response,
    ):
        async for data in response.aiter_raw():
            received += data


def request_body(kind: str, *, stream: bool) -> dict[str, Any]:
    """A minimal request of ``kind``, as its SDK would send it."""
    if kind == "responses":
        return {"model": MODEL, "stream": stream, "input": "hi"}
    body: dict[str, Any] = {"model": MODEL, "stream": stream}
    body["messages"] = [{"role": "user", "content": "hi"}]
    if kind == "messages":
        body["max_tokens"] = 64
    return body


@pytest.mark.parametrize("kind", KINDS)
async def test_http_stream(nursery: trio.Nursery, kind: StreamKind) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(tokens=20))
        async with client(mock) as http:
            response = await http.post(PATHS[kind], json=request_body(kind, stream=True))
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.content == b"".join(render_stream(kind, Script(tokens=20), MODEL))
        assert text_of(kind, decode([response.content])) == expected_text(Script(tokens=20))


@pytest.mark.parametrize("kind", KINDS)
async def test_http_json(nursery: trio.Nursery, kind: StreamKind) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(tokens=3, model="other/model"))
        async with client(mock) as http:
            response = await http.post(PATHS[kind], json=request_body(kind, stream=False))
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.content == render_json(kind, Script(tokens=3), "other/model")


def parse_chunked(raw: bytes) -> tuple[bytes, list[bytes], bool]:
    """Split a raw HTTP/1.1 response into its head and its chunks; say if it ended."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return head, chunks, True
        chunks.append(rest[:size])
        rest = rest[size + 2 :]
    return head, chunks, False


def raw_request(path: str, body: dict[str, Any], *, close: bool = True) -> bytes:
    payload = orjson.dumps(body)
    head = f"POST /v1{path} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n" + ("Connection: close\r\n" if close else "")
    return head.encode() + b"\r\n" + payload


async def raw_exchange(mock: MockUpstream, body: dict[str, Any]) -> bytes:
    """Send one request on a new connection and read until the mock closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", mock.port)
    async with stream:
        await stream.send_all(raw_request(PATHS["chat"], body))
        received = bytearray()
        while data := await stream.receive_some():
            received += data
    return bytes(received)


async def receive_body(stream: trio.SocketStream, size: int) -> bytes:
    """Read a chunked response until ``size`` body bytes came; return the body so far."""
    received = bytearray()
    while True:
        body = b"".join(parse_chunked(bytes(received))[1])
        if len(body) >= size:
            return body
        received += await stream.receive_some()


async def test_each_write_is_one_chunk(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(chunk_size=7))
        raw = await raw_exchange(mock, request_body("chat", stream=True))
        head, chunks, ended = parse_chunked(raw)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert ended
        assert chunks == render_stream("chat", Script(chunk_size=7), MODEL)


async def test_truncate_splits_a_write_at_the_exact_offset(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        writes = render_stream("chat", Script(), MODEL)
        fault_at = len(writes[0]) + len(writes[1]) + 10
        mock = await start(nursery, Script(fault="truncate", fault_at=fault_at))
        _, chunks, ended = parse_chunked(
            await raw_exchange(mock, request_body("chat", stream=True))
        )
        assert not ended
        assert chunks == [writes[0], writes[1], writes[2][:10]]
        await mock.connections[0].closed.wait()
        assert not mock.connections[0].closed_by_peer


async def test_truncate_seen_by_httpx(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(fault="truncate", fault_at=300))
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            await stream_into(received, mock, "chat")
        assert bytes(received) == b"".join(render_stream("chat", Script(), MODEL))[:300]


@pytest.mark.parametrize("fault_at", [-1, 0, 250])
async def test_reset(nursery: trio.Nursery, fault_at: int) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(fault="reset", fault_at=fault_at))
        received = bytearray()
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await stream_into(received, mock, "chat")
        assert len(received) <= max(fault_at, 0)  # a RST may discard bytes not yet read
        await mock.connections[0].closed.wait()
        assert not mock.connections[0].closed_by_peer


async def test_stall_until_the_client_closes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(fault="stall", fault_at=150))
        stream = await trio.open_tcp_stream("127.0.0.1", mock.port)
        with stream.socket:
            await stream.send_all(raw_request(PATHS["chat"], request_body("chat", stream=True)))
            body = await receive_body(stream, 150)
            with trio.move_on_after(0.05):
                pytest.fail(f"the stalled stream sent more: {await stream.receive_some()!r}")
            connection = mock.connections[0]
            assert not connection.closed.is_set()
            closed_by_client_at = trio.current_time()
        with trio.fail_after(1):
            await connection.closed.wait()
        assert body == b"".join(render_stream("chat", Script(), MODEL))[:150]
        assert connection.closed_by_peer
        assert connection.closed_at is not None
        assert 0 <= connection.closed_at - closed_by_client_at < 0.2


@pytest.mark.parametrize("kind", KINDS)
async def test_client_close_while_pacing_stops_the_stream(
    nursery: trio.Nursery, kind: StreamKind
) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(tokens=100_000, pace=0.01))
        stream = await trio.open_tcp_stream("127.0.0.1", mock.port)
        with stream.socket:
            await stream.send_all(raw_request(PATHS[kind], request_body(kind, stream=True)))
            await receive_body(stream, 1)
            closed_by_client_at = trio.current_time()
        connection = mock.connections[0]
        with trio.fail_after(1):
            await connection.closed.wait()
        assert connection.closed_by_peer
        assert connection.closed_at is not None
        assert 0 <= connection.closed_at - closed_by_client_at < 0.2


async def test_pace_and_first_byte_delay(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(tokens=3, pace=0.01, first_byte_delay=0.05))
        async with client(mock) as http:
            started = trio.current_time()
            async with http.stream(
                "POST", PATHS["chat"], json=request_body("chat", stream=True)
            ) as r:
                first_byte = trio.current_time() - started
                await r.aread()
            total = trio.current_time() - started
        assert first_byte >= 0.05
        writes = len(render_stream("chat", Script(tokens=3), MODEL))
        assert total >= 0.05 + 0.01 * (writes - 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_api_key(nursery: trio.Nursery, kind: StreamKind) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, api_key="sk-mock")
        async with client(mock) as http:
            denied = await http.post(PATHS[kind], json=request_body(kind, stream=False))
            wrong = await http.post(
                PATHS[kind], json=request_body(kind, stream=False), headers={"x-api-key": "nope"}
            )
            bearer = await http.post(
                PATHS[kind],
                json=request_body(kind, stream=False),
                headers={"authorization": "Bearer sk-mock"},
            )
            x_api_key = await http.post(
                PATHS[kind], json=request_body(kind, stream=False), headers={"x-api-key": "sk-mock"}
            )
        assert (denied.status_code, wrong.status_code) == (401, 401)
        if kind == "messages":
            assert denied.json()["type"] == "error"
            assert denied.json()["error"]["type"] == "authentication_error"
        else:
            assert denied.json()["error"]["type"] == "authentication_error"
            assert denied.json()["error"]["code"] == 401
        assert (bearer.status_code, x_api_key.status_code) == (200, 200)


async def test_keep_alive_and_recorded_requests(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery)
        async with client(mock) as http:
            first = await http.post(
                PATHS["chat"], json=request_body("chat", stream=True), headers={"X-Trace": "abc"}
            )
            second = await http.post(
                PATHS["messages"] + "?beta=true", json=request_body("messages", stream=False)
            )
        assert (first.status_code, second.status_code) == (200, 200)
        assert len(mock.connections) == 1
        assert [request.connection for request in mock.requests] == [0, 0]
        one, two = mock.requests
        assert (one.method, one.path) == ("POST", "/v1/chat/completions")
        assert two.path == "/v1/messages?beta=true"
        assert one.header("x-trace") == one.header("X-Trace") == "abc"
        assert ("x-trace", "abc") in one.headers
        assert one.json == request_body("chat", stream=True)
        assert orjson.loads(one.body) == one.json
        assert one.header("content-type") == "application/json"


@pytest.mark.parametrize("kind", KINDS)
async def test_error_status(nursery: trio.Nursery, kind: StreamKind) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(status=429))
        async with client(mock) as http:
            response = await http.post(PATHS[kind], json=request_body(kind, stream=True))
        assert response.status_code == 429
        assert response.headers["content-type"] == "application/json"
        assert response.content == render_error(kind, 429, "mock upstream error 429")


async def test_error_body_and_content_type(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        script = Script(
            status=502, error_body=b"<html>bad gateway</html>", content_type="text/html"
        )
        mock = await start(nursery, script)
        async with client(mock) as http:
            response = await http.post(PATHS["chat"], json=request_body("chat", stream=True))
        assert response.status_code == 502
        assert response.headers["content-type"] == "text/html"
        assert response.content == b"<html>bad gateway</html>"


async def test_callable_script(nursery: trio.Nursery) -> None:
    def script(request: MockRequest) -> Script:
        assert request.json is not None
        return Script(tokens=int(request.json["model"].split("-")[1]))

    with trio.fail_after(10):
        mock = await start(nursery, script)
        async with client(mock) as http:
            two = await http.post(PATHS["chat"], json={"model": "m-2"})
            five = await http.post(PATHS["chat"], json={"model": "m-5"})
        assert two.json()["choices"][0]["message"]["content"] == expected_text(Script(tokens=2))
        assert five.json()["usage"]["completion_tokens"] == 5


async def test_embeddings_transcriptions_models_and_unknown_paths(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(tokens=4))
        async with client(mock) as http:
            one = await http.post("/embeddings", json={"model": "emb", "input": "a b"})
            many = await http.post("/embeddings", json={"model": "emb", "input": ["a", "b"]})
            files = {"file": ("a.wav", b"RIFF\x00\xff binary", "audio/wav")}
            heard = await http.post(
                "/audio/transcriptions", data={"model": "whisper-1"}, files=files
            )
            as_text = await http.post(
                "/audio/transcriptions",
                data={"model": "whisper-1", "response_format": "text"},
                files=files,
            )
            models = await http.get("/models")
            missing = await http.post("/nowhere", json={})
            wrong_method = await http.get("/chat/completions")
        assert one.content == render_embeddings("emb", ["a b"])
        assert many.content == render_embeddings("emb", ["a", "b"])
        assert heard.json() == {"text": expected_text(Script(tokens=4))}
        assert as_text.text == expected_text(Script(tokens=4))
        assert as_text.headers["content-type"].startswith("text/plain")
        assert (mock.requests[2].header("content-type") or "").startswith("multipart/form-data")
        assert b"RIFF\x00\xff binary" in mock.requests[2].body
        assert models.json()["data"][0]["id"] == DEFAULT_MODEL
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
        assert wrong_method.status_code == 405


async def test_total_bytes_over_http(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(total_bytes=500_000))
        received = bytearray()
        await stream_into(received, mock, "responses")
        assert 500_000 <= len(received) < 502_000


async def test_cli(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        command = [
            sys.executable,
            "-m",
            "trio_gateway.testing.mock_upstream",
            "--port",
            "0",
            "--tokens",
            "3",
        ]
        run = functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        process: trio.Process = await nursery.start(run)
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await process.stdout.receive_some(1)
        prefix = b"mock upstream listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        assert line.endswith(b"/v1\n")
        async with httpx.AsyncClient(
            base_url=line[len(b"mock upstream listening on ") :].decode().strip(), trust_env=False
        ) as http:
            response = await http.post(PATHS["chat"], json={"model": "m", "stream": True})
        assert text_of("chat", decode([response.content])) == expected_text(Script(tokens=3))
        process.terminate()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_eof_ends_the_body_cleanly_in_each_framing(
    nursery: trio.Nursery, kind: StreamKind, framing: Any
) -> None:
    with trio.fail_after(10):
        whole = b"".join(render_stream(kind, Script(), MODEL))
        mock = await start(nursery, Script(fault="eof", fault_at=321, framing=framing))
        async with client(mock) as http:
            response = await http.post(PATHS[kind], json=request_body(kind, stream=True))
        assert response.content == whole[:321]
        framed = {
            "chunked": ("transfer-encoding", "chunked"),
            "length": ("content-length", "321"),
            "close": ("connection", "close"),
        }[framing]
        assert response.headers[framed[0]] == framed[1]
        if framing == "close":
            assert "content-length" not in response.headers
            assert "transfer-encoding" not in response.headers


async def test_framing_without_a_fault_and_for_json(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        scripts = iter(
            [Script(framing="length"), Script(framing="close"), Script(framing="chunked")]
        )
        mock = await start(nursery, lambda request: next(scripts))
        async with client(mock) as http:
            sized = await http.post(PATHS["chat"], json=request_body("chat", stream=True))
            closed = await http.post(PATHS["chat"], json=request_body("chat", stream=False))
            chunked = await http.post(PATHS["chat"], json=request_body("chat", stream=False))
        assert sized.content == b"".join(render_stream("chat", Script(), MODEL))
        assert sized.headers["content-length"] == str(len(sized.content))
        assert closed.content == chunked.content == render_json("chat", Script(), MODEL)
        assert closed.headers["connection"] == "close"
        assert chunked.headers["transfer-encoding"] == "chunked"


async def test_truncate_short_of_the_content_length(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(fault="truncate", fault_at=50))
        async with client(mock) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post(PATHS["chat"], json=request_body("chat", stream=False))


async def test_script_from_request(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, script_from_request(Script(tokens=2)))
        async with client(mock) as http:
            plain = await http.post(PATHS["chat"], json=request_body("chat", stream=True))
            asked = {"tokens": 4, "fault": "eof", "fault_at": 100, "framing": "length"}
            body = request_body("chat", stream=True) | {"mock_script": asked}
            cut = await http.post(PATHS["chat"], json=body)
            wrong: list[object] = [{"chunks": []}, {"tokens": 1.5}, {"fault": "explode"}, [1]]
            bad = [
                await http.post(
                    PATHS["chat"], json=request_body("chat", stream=True) | {"mock_script": value}
                )
                for value in wrong
            ]
        assert text_of("chat", decode([plain.content])) == expected_text(Script(tokens=2))
        assert cut.content == b"".join(render_stream("chat", Script(tokens=4), MODEL))[:100]
        for response in bad:
            assert response.status_code == 400
            assert "mock_script" in response.json()["error"]["message"]


async def test_stats_count_open_and_busy_connections(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        mock = await start(nursery, Script(fault="stall", fault_at=10))
        stream = await trio.open_tcp_stream("127.0.0.1", mock.port)
        async with client(mock) as http:
            with stream.socket:
                await stream.send_all(raw_request(PATHS["chat"], request_body("chat", stream=True)))
                await receive_body(stream, 10)
                stalled = (await http.get(f"http://127.0.0.1:{mock.port}/mock/stats")).json()
            await mock.connections[0].closed.wait()
            after = (await http.get(f"http://127.0.0.1:{mock.port}/mock/stats")).json()
        assert stalled == {"accepted": 2, "open": 1, "busy": 1, "requests": 2}
        # httpx keeps its connection for the second request: it is the one asking.
        assert after == {"accepted": 2, "open": 0, "busy": 0, "requests": 3}
