"""A fake LLM provider that is scriptable, deterministic and exact to the byte.

The gateway's demo, tests and benchmarks use it as their upstream. A
:class:`Script` says what the next response looks like: how many tokens,
how fast, cut into which writes, and which fault to inject at which byte.

Theory of operation
===================

1. **Two layers.** The rendering functions (:func:`render_stream`,
   :func:`iter_stream`, :func:`render_json`, :func:`render_embeddings`,
   :func:`render_transcription`, :func:`render_error`) do no I/O and never
   touch trio, so a test can build an upstream body without a server.
   :class:`MockUpstream` is the only trio code: it puts those bytes on a
   socket, write by write.
2. **Who owns the sockets.** :meth:`MockUpstream.serve` owns the listening
   socket. Every accepted socket belongs to exactly one connection task,
   which closes it with a synchronous ``with`` whatever happens. Inside it
   run two tasks: the *reader*, the only caller of ``recv()``, which feeds
   every byte to the connection's h11 state machine; and the *exchanger*,
   the only caller of ``send()``, which reads requests from h11 and writes
   the responses. h11 does the HTTP/1.1 framing and keep-alive; the mock
   owns the socket, so it chooses every write, reset and stall itself.
3. **One write, one send.** Each body write of the script is one h11
   ``Data`` event, hence one chunk of the chunked encoding, handed to the
   kernel as one ``send()`` (looped only if the kernel takes it in part).
   ``TCP_NODELAY`` is set, so writes are not coalesced by Nagle.
4. **Faults.** ``fault_at`` counts body bytes: the payload, not the chunk
   framing. The mock sends exactly that many (splitting a write if it must)
   and then: ``reset`` sets ``SO_LINGER`` to 0 and closes, so the kernel
   sends a RST; ``truncate`` closes normally (FIN) without the terminating
   zero-length chunk (or short of the ``content-length``); ``eof`` ends the
   body *cleanly* there: the terminating chunk, or a ``content-length`` of
   ``fault_at`` bytes announced in the head, or the close of a body
   delimited by the close (then it is the same as ``truncate``); ``stall``
   sends nothing more and waits until the peer closes. A ``fault_at`` past
   the end of the body faults just before its end; a negative one faults
   before the response head.
   **Framing** (``Script.framing``) says how the body is delimited:
   ``chunked`` (a stream's default), ``length`` (a JSON answer's default;
   a stream is then rendered whole first), or ``close``: no length and no
   chunks, the body ends when the mock closes (the response is written
   around h11, which would never choose that framing for an HTTP/1.1 client).
   **Garbage** (``Script.garble_event``) replaces the data of one event
   (of a JSON answer: the body) with bytes that are not JSON (``junk``), or
   with its first half followed by junk (``cut``).
5. **Noticing the peer.** The reader is parked in ``recv()`` for the whole
   life of the connection, also while the exchanger paces, stalls or waits
   for a first-byte delay. A FIN (``recv`` returns ``b""``) or a RST
   (``ECONNRESET``) marks :attr:`MockConnection.closed_by_peer`, stamps
   ``closed_at`` and cancels the connection's cancel scope, which stops the
   response at once: no more events are generated. A ``send()`` that fails
   with ``EPIPE`` / ``ECONNRESET`` does the same. The latency is one trio
   scheduler pass after the kernel delivers the FIN or RST: well under a
   millisecond on loopback. A client that half-closes (``shutdown(SHUT_WR)``)
   counts as gone; HTTP clients do not do that.
6. **Speed.** The delta events of each kind are rendered once per (model,
   line ending) and cached; a response is a lazy generator over them, so
   ``total_bytes`` streams of gigabytes cycle a few prerendered events and
   never build the body in memory.
7. **A script per request, and counts.** :func:`script_from_request` (the
   CLI's ``--script-from-request``) lets each request choose its own script
   in a ``"mock_script"`` object of its JSON body: a gateway forwards the
   body's fields, not the client's headers, so a load generator behind a
   gateway can still ask for one fault per request. ``GET /mock/stats``
   answers the mock's own counts: connections accepted, open (the asking
   one left out) and busy (a response in progress, a stall included), and
   requests received.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import email.parser
import email.policy
import functools
import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import h11
import orjson
import trio

__all__ = [
    "CREATED",
    "DEFAULT_MODEL",
    "PROMPT_TOKENS",
    "REQUEST_FIELD",
    "WORDS",
    "Fault",
    "Framing",
    "Garble",
    "MockConnection",
    "MockRequest",
    "MockUpstream",
    "Script",
    "StreamKind",
    "expected_text",
    "iter_stream",
    "main",
    "render_embeddings",
    "render_error",
    "render_json",
    "render_stream",
    "render_transcription",
    "script_from_request",
    "usage_cost",
]

StreamKind = Literal["chat", "messages", "responses"]
Fault = Literal["reset", "truncate", "stall", "eof"]
Framing = Literal["chunked", "length", "close"]
Garble = Literal["junk", "cut"]

PROMPT_TOKENS = 42
"""The input token count of every response."""
CREATED = 1732430000
"""The fixed ``created`` / ``created_at`` timestamp."""
DEFAULT_MODEL = "mock/model"
"""The model when neither the script nor the request names one."""
WORDS = ("Hello", " world", ",", " café", " naïve", " 🙂", " 日本語", " mock", " stream", ". ")
"""The content deltas, in order, cycled: token ``i`` is ``WORDS[i % len(WORDS)]``."""

_CHAT_ID = "gen-mock-1"
_MESSAGE_ID = "msg_mock_1"
_RESPONSE_ID = "resp_mock_1"
_ITEM_ID = "msg_mock_item_1"
_PROVIDER = "Mock"
_BOM = b"\xef\xbb\xbf"
_STREAM_KINDS = ("chat", "messages", "responses")
_FAULTS = ("reset", "truncate", "stall", "eof")
_FRAMINGS = ("chunked", "length", "close")
_GARBLES = ("junk", "cut")
_JUNK = b"}{ not json"


@dataclass(frozen=True)
class Script:
    """What the mock answers to one request. Every field has a harmless default."""

    tokens: int = 12
    """Content deltas in a stream (and tokens in a JSON answer)."""
    pace: float = 0.0
    """Seconds between body writes (0: as fast as possible)."""
    first_byte_delay: float = 0.0
    """Seconds before the response head."""
    chunk_size: int | None = None
    """None: one write per event; n: the whole body re-cut into n-byte writes."""
    chunks: tuple[bytes, ...] | None = None
    """Exact body writes, replacing the rendered body (for the fault matrix)."""
    line_ending: str = "\n"
    """The line end of the rendered SSE: ``"\\n"``, ``"\\r\\n"`` or ``"\\r"``."""
    bom: bool = False
    """Start a rendered stream with a UTF-8 BOM."""
    final_blank_line: bool = True
    """False: the last event of a rendered stream lacks its blank line."""
    comment: str | None = "OPENROUTER PROCESSING"
    """An SSE comment sent first in a stream (None: none)."""
    send_done: bool = True
    """Chat: end the stream with ``data: [DONE]``."""
    send_done_all_kinds: bool = False
    """Messages and Responses: end with ``data: [DONE]`` too (as some aggregators do)."""
    cost: bool = True
    """Add OpenRouter's ``cost``, ``is_byok`` and ``cost_details`` to every usage.

    The cost is :func:`usage_cost`; Messages' ``message_start`` carries the
    input's cost alone, its ``message_delta`` the total.
    """
    status: int = 200
    """A non-2xx status answers with the kind's error JSON (or ``error_body``)."""
    error_body: bytes | None = None
    """The exact body of a non-2xx answer."""
    content_type: str | None = None
    """Override the response's content-type."""
    fault: Fault | None = None
    """Inject a fault after ``fault_at`` body bytes: see the module docstring."""
    fault_at: int = 0
    """Body bytes sent before the fault; negative: before the response head."""
    framing: Framing | None = None
    """How the body is delimited; None: ``chunked`` for a stream, ``length`` for JSON."""
    garble_event: int | None = None
    """Garble the data of this event (0: the first after the comment; negative: from
    the end). Of a JSON answer, any number garbles the whole body."""
    garble: Garble = "junk"
    """``junk``: the data becomes bytes that are not JSON; ``cut``: its first half, then junk."""
    total_bytes: int | None = None
    """Stream deltas until at least this many body bytes are out, then the tail.

    Usage then counts the deltas sent; the Responses ``.done`` events and the
    final ``response`` carry an empty text, which would be as large as the stream.
    """
    model: str | None = None
    """The model in responses; None echoes the request's (or :data:`DEFAULT_MODEL`)."""

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError("tokens must not be negative")
        if self.pace < 0 or self.first_byte_delay < 0:
            raise ValueError("pace and first_byte_delay must not be negative")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if self.line_ending not in ("\n", "\r\n", "\r"):
            raise ValueError(f"line_ending must be LF, CRLF or CR, not {self.line_ending!r}")
        if self.comment is not None and ("\n" in self.comment or "\r" in self.comment):
            raise ValueError("comment cannot contain a line break")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status, not {self.status}")
        if self.total_bytes is not None and self.total_bytes < 0:
            raise ValueError("total_bytes must not be negative")
        if self.fault is not None and self.fault not in _FAULTS:
            raise ValueError(f"fault must be one of {_FAULTS} or None, not {self.fault!r}")
        if self.framing is not None and self.framing not in _FRAMINGS:
            raise ValueError(f"framing must be one of {_FRAMINGS} or None, not {self.framing!r}")
        if self.garble not in _GARBLES:
            raise ValueError(f"garble must be one of {_GARBLES}, not {self.garble!r}")


# --- Rendering: pure functions, no I/O -------------------------------------------------------


def expected_text(script: Script) -> str:
    """The completion text of ``script``: all its deltas, concatenated."""
    return _text(script.tokens)


def _text(tokens: int) -> str:
    whole, rest = divmod(tokens, len(WORDS))
    return "".join(WORDS) * whole + "".join(WORDS[:rest])


def usage_cost(input_tokens: int, output_tokens: int) -> float:
    """The ``cost`` the mock reports: one micro-dollar per input token, two per output."""
    return (input_tokens + 2 * output_tokens) / 1_000_000


def _cost_fields(cost: float) -> dict[str, object]:
    return {"cost": cost, "is_byok": False, "cost_details": {"upstream_inference_cost": None}}


def _frame(le: bytes, data: bytes, name: bytes | None = None) -> bytes:
    """One SSE event: an optional ``event:`` line, one ``data:`` line, a blank line."""
    if name is None:
        return b"data: " + data + le + le
    return b"event: " + name + le + b"data: " + data + le + le


def _typed(le: bytes, obj: dict[str, object]) -> bytes:
    """An event named after its ``type``, as Messages and Responses send them."""
    name = obj["type"]
    assert isinstance(name, str)
    return _frame(le, orjson.dumps(obj), name.encode())


# Chat Completions


def _chat_chunk(model: str, content: str, finish: str | None = None, usage: object = None) -> bytes:
    obj: dict[str, object] = {
        "id": _CHAT_ID,
        "provider": _PROVIDER,
        "model": model,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": content},
                "finish_reason": finish,
                "native_finish_reason": finish,
                "logprobs": None,
            }
        ],
    }
    if usage is not None:
        obj["usage"] = usage
    return orjson.dumps(obj)


def _chat_usage(tokens: int, cost: bool) -> dict[str, object]:
    usage: dict[str, object] = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    if cost:
        usage |= _cost_fields(usage_cost(PROMPT_TOKENS, tokens))
    return usage


def _chat_head(model: str, le: bytes, script: Script) -> list[bytes]:
    return [_frame(le, _chat_chunk(model, ""))]


@functools.lru_cache(maxsize=256)
def _chat_deltas(model: str, le: bytes) -> tuple[bytes, ...]:
    return tuple(_frame(le, _chat_chunk(model, word)) for word in WORDS)


def _chat_tail(model: str, le: bytes, script: Script, tokens: int, text: str) -> list[bytes]:
    return [
        _frame(le, _chat_chunk(model, "", "stop")),
        _frame(le, _chat_chunk(model, "", None, _chat_usage(tokens, script.cost))),
    ]


def _chat_json(model: str, script: Script) -> bytes:
    return orjson.dumps(
        {
            "id": _CHAT_ID,
            "provider": _PROVIDER,
            "model": model,
            "object": "chat.completion",
            "created": CREATED,
            "choices": [
                {
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop",
                    "native_finish_reason": "stop",
                    "message": {"role": "assistant", "content": expected_text(script)},
                }
            ],
            "usage": _chat_usage(script.tokens, script.cost),
        }
    )


# Anthropic Messages


def _messages_usage(tokens: int, cost: bool) -> dict[str, object]:
    usage: dict[str, object] = {
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if cost:
        usage |= _cost_fields(usage_cost(PROMPT_TOKENS, tokens))
    return usage


def _message(model: str, content: list[object], stop: str | None, usage: object) -> object:
    return {
        "id": _MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }


def _messages_head(model: str, le: bytes, script: Script) -> list[bytes]:
    # message_start carries the input side: one output token so far, the input's cost.
    usage = _messages_usage(1, cost=False)
    if script.cost:
        usage |= _cost_fields(usage_cost(PROMPT_TOKENS, 0))
    return [
        _typed(le, {"type": "message_start", "message": _message(model, [], None, usage)}),
        _typed(
            le,
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _typed(le, {"type": "ping"}),
    ]


@functools.lru_cache(maxsize=256)
def _messages_deltas(model: str, le: bytes) -> tuple[bytes, ...]:
    return tuple(
        _typed(
            le,
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": word},
            },
        )
        for word in WORDS
    )


def _messages_tail(model: str, le: bytes, script: Script, tokens: int, text: str) -> list[bytes]:
    usage: dict[str, object] = {"output_tokens": tokens}
    if script.cost:
        usage |= _cost_fields(usage_cost(PROMPT_TOKENS, tokens))
    return [
        _typed(le, {"type": "content_block_stop", "index": 0}),
        _typed(
            le,
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": usage,
            },
        ),
        _typed(le, {"type": "message_stop"}),
    ]


def _messages_json(model: str, script: Script) -> bytes:
    content: list[object] = [{"type": "text", "text": expected_text(script)}]
    usage = _messages_usage(script.tokens, script.cost)
    return orjson.dumps(_message(model, content, "end_turn", usage))


# OpenAI Responses

_RESPONSES_HEAD_EVENTS = 4  # sequence numbers 0..3 come before the first delta


def _responses_usage(tokens: int, cost: bool) -> dict[str, object]:
    usage: dict[str, object] = {
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": tokens,
        "total_tokens": PROMPT_TOKENS + tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    if cost:
        usage |= _cost_fields(usage_cost(PROMPT_TOKENS, tokens))
    return usage


def _response(model: str, status: str, output: list[object], usage: object) -> object:
    return {
        "id": _RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
    }


def _output_text(text: str) -> dict[str, object]:
    return {"type": "output_text", "text": text, "annotations": []}


def _output_item(status: str, content: list[object]) -> dict[str, object]:
    return {
        "id": _ITEM_ID,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _part_ids() -> dict[str, object]:
    return {"item_id": _ITEM_ID, "output_index": 0, "content_index": 0}


def _responses_head(model: str, le: bytes, script: Script) -> list[bytes]:
    started = _response(model, "in_progress", [], None)
    return [
        _typed(le, {"type": "response.created", "sequence_number": 0, "response": started}),
        _typed(le, {"type": "response.in_progress", "sequence_number": 1, "response": started}),
        _typed(
            le,
            {
                "type": "response.output_item.added",
                "sequence_number": 2,
                "output_index": 0,
                "item": _output_item("in_progress", []),
            },
        ),
        _typed(
            le,
            {
                "type": "response.content_part.added",
                "sequence_number": 3,
                **_part_ids(),
                "part": _output_text(""),
            },
        ),
    ]


@functools.lru_cache(maxsize=256)
def _responses_delta_parts(le: bytes) -> tuple[bytes, tuple[bytes, ...]]:
    """The bytes before the sequence number, and after it for each word."""
    name = b"response.output_text.delta"
    before = b"event: " + name + le + b'data: {"type":"' + name + b'","sequence_number":'
    after = tuple(
        b"," + orjson.dumps({**_part_ids(), "delta": word})[1:] + le + le for word in WORDS
    )
    return before, after


def _responses_tail(model: str, le: bytes, script: Script, tokens: int, text: str) -> list[bytes]:
    seq = _RESPONSES_HEAD_EVENTS + tokens
    item = _output_item("completed", [_output_text(text)])
    usage = _responses_usage(tokens, script.cost)
    return [
        _typed(
            le,
            {
                "type": "response.output_text.done",
                "sequence_number": seq,
                **_part_ids(),
                "text": text,
            },
        ),
        _typed(
            le,
            {
                "type": "response.content_part.done",
                "sequence_number": seq + 1,
                **_part_ids(),
                "part": _output_text(text),
            },
        ),
        _typed(
            le,
            {
                "type": "response.output_item.done",
                "sequence_number": seq + 2,
                "output_index": 0,
                "item": item,
            },
        ),
        _typed(
            le,
            {
                "type": "response.completed",
                "sequence_number": seq + 3,
                "response": _response(model, "completed", [item], usage),
            },
        ),
    ]


def _responses_json(model: str, script: Script) -> bytes:
    item = _output_item("completed", [_output_text(expected_text(script))])
    usage = _responses_usage(script.tokens, script.cost)
    return orjson.dumps(_response(model, "completed", [item], usage))


def _delta_renderer(kind: StreamKind, model: str, le: bytes) -> Callable[[int], bytes]:
    """Return ``delta(i)``: the event bytes of content delta ``i``, from prerendered parts."""
    if kind == "responses":
        before, after = _responses_delta_parts(le)
        count = len(after)
        return lambda i: before + b"%d" % (_RESPONSES_HEAD_EVENTS + i) + after[i % count]
    events = _chat_deltas(model, le) if kind == "chat" else _messages_deltas(model, le)
    count = len(events)
    return lambda i: events[i % count]


_HEADS: dict[str, Callable[[str, bytes, Script], list[bytes]]] = {
    "chat": _chat_head,
    "messages": _messages_head,
    "responses": _responses_head,
}
_TAILS: dict[str, Callable[[str, bytes, Script, int, str], list[bytes]]] = {
    "chat": _chat_tail,
    "messages": _messages_tail,
    "responses": _responses_tail,
}
_JSON: dict[str, Callable[[str, Script], bytes]] = {
    "chat": _chat_json,
    "messages": _messages_json,
    "responses": _responses_json,
}


def _check_kind(kind: str) -> None:
    if kind not in _STREAM_KINDS:
        raise ValueError(f"kind must be one of {_STREAM_KINDS}, not {kind!r}")


def _events(kind: StreamKind, script: Script, model: str) -> Iterator[bytes]:
    """The events of a stream, one bytes each, the last one with its blank line."""
    le = script.line_ending.encode()
    sent = len(_BOM) if script.bom else 0
    if script.comment is not None:
        comment = (b": " + script.comment.encode() if script.comment else b":") + le + le
        sent += len(comment)
        yield comment
    for event in _HEADS[kind](model, le, script):
        sent += len(event)
        yield event
    delta = _delta_renderer(kind, model, le)
    if script.total_bytes is None:
        tokens = script.tokens
        for i in range(tokens):
            yield delta(i)
        text = expected_text(script)
    else:
        tokens = 0
        while sent < script.total_bytes:
            event = delta(tokens)
            tokens += 1
            sent += len(event)
            yield event
        # The full text would be as large as the stream: the done events carry none.
        text = ""
    yield from _TAILS[kind](model, le, script, tokens, text)
    done = script.send_done if kind == "chat" else script.send_done_all_kinds
    if done:
        yield _frame(le, b"[DONE]")


def _garbled(data: bytes, style: Garble) -> bytes:
    """``data`` made into something that is not JSON: junk, or its first half and junk."""
    return (data[: len(data) // 2] if style == "cut" else b"") + _JUNK


def _garble_event(event: bytes, style: Garble, le: bytes) -> bytes:
    """``event`` with the value of its data line garbled (the mock's events have one)."""
    at = event.find(b"data: ")
    if at < 0:
        return event
    start = at + len(b"data: ")
    end = event.find(le, start)
    end = len(event) if end < 0 else end
    return event[:start] + _garbled(event[start:end], style) + event[end:]


def _with_garbled_event(
    items: Iterator[bytes], index: int, style: Garble, le: bytes, skip: int
) -> Iterator[bytes]:
    """``items`` with event ``index`` garbled; the first ``skip`` items (the comment) don't count.

    A negative ``index`` counts from the end, so that many items are held back.
    """
    if index >= 0:
        for position, item in enumerate(items):
            yield _garble_event(item, style, le) if position - skip == index else item
        return
    window: collections.deque[bytes] = collections.deque()
    position = 0  # of window[0]
    for item in items:
        window.append(item)
        if len(window) > -index:
            yield window.popleft()
            position += 1
    if len(window) == -index and position >= skip:
        window[0] = _garble_event(window[0], style, le)
    yield from window


def _without_last_blank_line(events: Iterator[bytes], le_size: int) -> Iterator[bytes]:
    last: bytes | None = None
    for event in events:
        if last is not None:
            yield last
        last = event
    if last is not None:
        yield last[:-le_size]


def _with_prefix(prefix: bytes, writes: Iterator[bytes]) -> Iterator[bytes]:
    first = next(writes, b"")
    yield prefix + first
    yield from writes


def _recut(writes: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes as ``writes``, in ``size``-byte pieces (the last may be shorter)."""
    buffer = bytearray()
    for write in writes:
        buffer += write
        whole = len(buffer) - len(buffer) % size
        if whole:
            for start in range(0, whole, size):
                yield bytes(buffer[start : start + size])
            del buffer[:whole]
    if buffer:
        yield bytes(buffer)


def iter_stream(kind: StreamKind, script: Script, model: str) -> Iterator[bytes]:
    """The body writes of a streamed response of ``kind``, lazily.

    ``script.chunks`` replaces them outright. Use this rather than
    :func:`render_stream` for a ``total_bytes`` script: it never holds more
    than one write.
    """
    _check_kind(kind)
    if script.chunks is not None:
        return iter(script.chunks)
    writes = _events(kind, script, model)
    if script.garble_event is not None:
        skip = 0 if script.comment is None else 1
        le = script.line_ending.encode()
        writes = _with_garbled_event(writes, script.garble_event, script.garble, le, skip)
    if not script.final_blank_line:
        writes = _without_last_blank_line(writes, len(script.line_ending))
    if script.bom:
        writes = _with_prefix(_BOM, writes)
    if script.chunk_size is not None:
        writes = _recut(writes, script.chunk_size)
    return writes


def render_stream(kind: StreamKind, script: Script, model: str) -> list[bytes]:
    """The body writes of a streamed response of ``kind``, each one bytes."""
    return list(iter_stream(kind, script, model))


def render_json(kind: StreamKind, script: Script, model: str) -> bytes:
    """The body of a non-streamed response of ``kind``.

    A ``chat.completion``, a Messages ``message`` or a Responses ``response``
    object, with ``script.tokens`` tokens of :func:`expected_text`; garbled
    if ``script.garble_event`` is set.
    """
    _check_kind(kind)
    body = _JSON[kind](model, script)
    return body if script.garble_event is None else _garbled(body, script.garble)


def render_embeddings(model: str, inputs: Sequence[str], *, cost: bool = True) -> bytes:
    """An embeddings list: one deterministic 8-float vector per input.

    Each input counts one token per whitespace-separated word (at least one).
    """
    data: list[object] = []
    for index, text in enumerate(inputs):
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        vector = [(byte - 128) / 128 for byte in digest]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(max(1, len(text.split())) for text in inputs)
    usage: dict[str, object] = {"prompt_tokens": tokens, "total_tokens": tokens}
    if cost:
        usage |= _cost_fields(usage_cost(tokens, 0))
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})


def render_transcription(script: Script) -> bytes:
    """A transcription's JSON body: ``{"text": expected_text(script)}``."""
    return orjson.dumps({"text": expected_text(script)})


# The error "type" of each status, as (OpenAI, Anthropic).
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    503: ("server_error", "overloaded_error"),
    529: ("server_error", "overloaded_error"),
}


def render_error(kind: str | None, status: int, message: str) -> bytes:
    """An error body in the shape clients of ``kind`` expect.

    ``"messages"``: ``{"type": "error", "error": {"type", "message"}}``; any
    other kind (or None): ``{"error": {"message", "type", "code", "param"}}``
    with the status as ``code``, as OpenRouter sends it.
    """
    default = ("server_error", "api_error") if status >= 500 else ("invalid_request_error",) * 2
    openai_type, anthropic_type = _ERROR_TYPES.get(status, default)
    if kind == "messages":
        return orjson.dumps(
            {"type": "error", "error": {"type": anthropic_type, "message": message}}
        )
    return orjson.dumps(
        {"error": {"message": message, "type": openai_type, "code": status, "param": None}}
    )


# --- The server --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MockRequest:
    """One request as the mock received it."""

    method: str
    path: str
    """The request target, query string included."""
    headers: list[tuple[str, str]]
    """Names lowercased, in the order received."""
    body: bytes
    json: dict[str, Any] | None
    """The body parsed as a JSON object, or None."""
    connection: int
    """The index in :attr:`MockUpstream.connections` of the connection it came on."""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass(eq=False)
class MockConnection:
    """One accepted connection. ``closed`` is set once its socket is closed."""

    index: int
    opened_at: float
    closed_at: float | None = None
    """When the peer's close was noticed, or when the mock closed the socket."""
    closed_by_peer: bool = False
    """True when the client closed or reset the connection first."""
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True)
class _Plan:
    """A response ready to send: head, body writes, and the script that paces them."""

    status: int
    headers: list[tuple[str, str]]
    writes: Iterable[bytes]
    framing: Framing
    content_length: int | None  # with framing "length" only
    script: Script


class _PeerGone(Exception):
    """A send found the peer gone; the connection's scope is already cancelled."""


_ROUTES = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/messages": ("POST", "messages"),
    "/v1/responses": ("POST", "responses"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/audio/transcriptions": ("POST", "transcriptions"),
    "/v1/models": ("GET", "models"),
}
_STREAM_ROUTES: dict[str, StreamKind] = {
    "chat": "chat",
    "messages": "messages",
    "responses": "responses",
}
_DEFAULT_SCRIPT = Script()
_RECEIVE_SIZE = 65536
_BACKLOG = 1024


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a ``multipart/form-data`` body (file parts are skipped)."""
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and part.get_filename() is None:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                fields[name] = payload.decode("utf-8", "replace")
    return fields


def _inputs(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [item if isinstance(item, str) else orjson.dumps(item).decode() for item in items]


REQUEST_FIELD = "mock_script"
"""The request body's field read by :func:`script_from_request`."""
_NONE = type(None)
# The Script fields a request may set, and the JSON types each takes.
_REQUEST_FIELDS: dict[str, tuple[type, ...]] = {
    "tokens": (int,),
    "pace": (int, float),
    "first_byte_delay": (int, float),
    "chunk_size": (int, _NONE),
    "line_ending": (str,),
    "bom": (bool,),
    "final_blank_line": (bool,),
    "comment": (str, _NONE),
    "send_done": (bool,),
    "send_done_all_kinds": (bool,),
    "cost": (bool,),
    "status": (int,),
    "content_type": (str, _NONE),
    "fault": (str, _NONE),
    "fault_at": (int,),
    "framing": (str, _NONE),
    "garble_event": (int, _NONE),
    "garble": (str,),
    "total_bytes": (int, _NONE),
    "model": (str, _NONE),
}


def script_from_request(base: Script = _DEFAULT_SCRIPT) -> Callable[[MockRequest], Script]:
    """A script function for :class:`MockUpstream`: ``base``, changed by the request.

    The request's JSON body may hold a ``"mock_script"`` object whose members
    replace fields of ``base`` (``{"fault": "eof", "fault_at": 120}``). One that
    names an unknown field, has a value of the wrong type, or fails the
    script's checks is answered with a 400 error saying why.
    """

    def script(request: MockRequest) -> Script:
        changes = (request.json or {}).get(REQUEST_FIELD)
        if changes is None:
            return base
        try:
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            for name, value in changes.items():
                allowed = _REQUEST_FIELDS.get(name)
                if allowed is None:
                    raise ValueError(f"no field {name!r} may be set")
                if type(value) not in allowed:
                    raise ValueError(f"{name}: {value!r} has the wrong type")
            return dataclasses.replace(base, **changes)
        except ValueError as exc:
            message = f"mock upstream: bad {REQUEST_FIELD}: {exc}"
            return Script(status=400, error_body=render_error(None, 400, message))

    return script


class MockUpstream:
    """A fake provider on a real loopback socket, answering per :class:`Script`.

    ``script`` is the answer to every request, or a function of the request
    that returns one; it may be replaced between requests. With ``api_key``,
    requests must carry ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.
    """

    def __init__(
        self,
        script: Script | Callable[[MockRequest], Script] = _DEFAULT_SCRIPT,
        *,
        api_key: str | None = None,
    ) -> None:
        self.script = script
        self.api_key = api_key
        self.requests: list[MockRequest] = []
        self.connections: list[MockConnection] = []
        self.open_connections = 0
        """Accepted connections whose socket is not closed yet."""
        self.busy_connections = 0
        """Open connections with a response in progress (a stall included)."""
        self._port: int | None = None
        self._base_url: str | None = None

    @property
    def port(self) -> int:
        """The listening port, once :meth:`serve` has started."""
        if self._port is None:
            raise RuntimeError("the mock upstream has not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, once :meth:`serve` has started."""
        if self._base_url is None:
            raise RuntimeError("the mock upstream has not started")
        return self._base_url

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled; report the port to ``task_status``.

        A checkpoint that returns only by cancellation. Cancelling it closes the
        listener and every connection (``closed_by_peer`` stays False for them).
        """
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        with trio.socket.socket(family, trio.socket.SOCK_STREAM) as listener:
            listener.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await listener.bind((host, port))
            listener.listen(_BACKLOG)
            self._port = int(listener.getsockname()[1])
            url_host = f"[{host}]" if ":" in host else host
            self._base_url = f"http://{url_host}:{self._port}/v1"
            async with trio.open_nursery() as nursery:
                task_status.started(self._port)
                while True:
                    sock, _ = await listener.accept()
                    record = MockConnection(len(self.connections), trio.current_time())
                    self.connections.append(record)
                    self.open_connections += 1
                    nursery.start_soon(_Connection(self, sock, record).run)

    def _authorized(self, request: MockRequest) -> bool:
        if self.api_key is None:
            return True
        return (
            request.header("authorization") == f"Bearer {self.api_key}"
            or request.header("x-api-key") == self.api_key
        )

    def _plan(self, request: MockRequest) -> _Plan:
        """Decide the whole response to ``request``; no I/O."""
        path = request.path.partition("?")[0]
        if path == "/mock/stats" and request.method == "GET":
            return _json_plan(Script(), orjson.dumps(self._stats()))
        method, route = _ROUTES.get(path, ("", None))
        if route is None or request.method != method:
            status = 404 if route is None else 405
            message = f"mock upstream: no route for {request.method} {path}"
            return _error_plan(status, render_error(route, status, message))
        if not self._authorized(request):
            return _error_plan(401, render_error(route, 401, "invalid API key"))
        if route == "models":
            script = self.script if isinstance(self.script, Script) else Script()
            models = [DEFAULT_MODEL] + ([script.model] if script.model else [])
            data = [
                {"id": m, "object": "model", "created": CREATED, "owned_by": "mock"} for m in models
            ]
            return _json_plan(Script(), orjson.dumps({"object": "list", "data": data}))
        script = self.script(request) if callable(self.script) else self.script
        body_json = request.json or {}
        requested = body_json.get("model")
        model = script.model or (requested if isinstance(requested, str) else DEFAULT_MODEL)
        content_type = "application/json"
        if not 200 <= script.status < 300:
            body = script.error_body
            if body is None:
                body = render_error(route, script.status, f"mock upstream error {script.status}")
        elif route == "embeddings":
            body = render_embeddings(model, _inputs(body_json.get("input")), cost=script.cost)
        elif route == "transcriptions":
            fields = _form_fields(request.header("content-type") or "", request.body)
            body = render_transcription(script)
            if fields.get("response_format") == "text":
                body, content_type = expected_text(script).encode(), "text/plain; charset=utf-8"
        else:
            kind = _STREAM_ROUTES[route]
            if body_json.get("stream") is True:
                content_type = script.content_type or "text/event-stream"
                headers = [("content-type", content_type), ("cache-control", "no-cache")]
                writes = iter_stream(kind, script, model)
                return _framed_plan(script, headers, writes, script.framing or "chunked")
            body = render_json(kind, script, model)
        return _json_plan(script, body, content_type)

    def _stats(self) -> dict[str, int]:
        """The counts ``GET /mock/stats`` answers, asked while its own connection is open."""
        return {
            "accepted": len(self.connections),
            "open": self.open_connections - 1,  # not the connection asking
            "busy": self.busy_connections,
            "requests": len(self.requests),
        }


def _framed_plan(
    script: Script, headers: list[tuple[str, str]], writes: Iterable[bytes], framing: Framing
) -> _Plan:
    """A response of ``writes`` delimited by ``framing``; ``length`` takes them all first."""
    length = None
    if framing == "length":
        writes = list(writes)
        length = sum(map(len, writes))
        if script.fault == "eof" and script.fault_at >= 0:
            length = min(length, script.fault_at)  # the body ends cleanly there
    return _Plan(script.status, headers, writes, framing, length, script)


def _json_plan(script: Script, body: bytes, content_type: str = "application/json") -> _Plan:
    """A response (by default with a content-length), honouring chunks and chunk size."""
    writes: Iterable[bytes]
    if script.chunks is not None:
        writes = script.chunks
    elif script.chunk_size is not None:
        writes = _recut([body], script.chunk_size)
    else:
        writes = [body]
    headers = [("content-type", script.content_type or content_type)]
    return _framed_plan(script, headers, writes, script.framing or "length")


def _error_plan(status: int, body: bytes) -> _Plan:
    headers = [("content-type", "application/json")]
    return _Plan(status, headers, [body], "length", len(body), Script())


class _Connection:
    """One accepted socket: a reader task and the request/response loop (the exchanger)."""

    def __init__(self, server: MockUpstream, sock: trio.socket.SocketType, record: MockConnection):
        self.server = server
        self.sock = sock
        self.record = record
        self.h11 = h11.Connection(h11.SERVER)
        self.scope = trio.CancelScope()
        self.wake = trio.Event()  # set by the reader when it fed h11 more bytes

    async def run(self) -> None:
        """Serve the connection until either side closes it, then close the socket.

        A checkpoint. Whether it ends or is cancelled, the socket is closed and
        ``record.closed`` is set.
        """
        try:
            with self.sock, self.scope:
                with contextlib.suppress(OSError):  # the peer may be gone already
                    self.sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_until_closed)
                    with contextlib.suppress(_PeerGone):
                        await self._exchanges()
                    self.scope.cancel()  # the mock closes first: stop the reader
        finally:
            if self.record.closed_at is None:
                self.record.closed_at = trio.current_time()
            self.server.open_connections -= 1
            self.record.closed.set()

    def _peer_closed(self) -> None:
        if not self.record.closed_by_peer:
            self.record.closed_by_peer = True
            self.record.closed_at = trio.current_time()
        self.scope.cancel()

    async def _read_until_closed(self) -> None:
        """Feed h11 every byte the peer sends; on FIN or RST, cancel the connection.

        A checkpoint; returns only when the peer closed. Cancelling it leaves
        the bytes read so far in h11's buffer.
        """
        while True:
            try:
                data = await self.sock.recv(_RECEIVE_SIZE)
            except OSError:  # ECONNRESET: the peer reset the connection
                data = b""
            if not data:
                self._peer_closed()
                return
            self.h11.receive_data(data)
            self.wake.set()

    async def _send(self, data: bytes) -> None:
        """Send all of ``data``; raise :class:`_PeerGone` if the peer went away.

        A checkpoint. Cancelled, it may leave part of ``data`` unsent, which
        makes the connection unusable; the caller then closes it.
        """
        view = memoryview(data)
        try:
            while view:
                sent = await self.sock.send(view)
                view = view[sent:]
        except OSError as exc:  # EPIPE or ECONNRESET
            self._peer_closed()
            raise _PeerGone from exc

    async def _exchanges(self) -> None:
        """Answer requests until a response or the protocol closes the connection.

        A checkpoint; cancellation can stop it mid-response.
        """
        while True:
            request = await self._receive_request()
            if request is None:
                return
            self.server.requests.append(request)
            plan = self.server._plan(request)
            self.server.busy_connections += 1
            try:
                keep_alive = await self._respond(plan)
            finally:
                self.server.busy_connections -= 1
            if not keep_alive:
                return
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return  # MUST_CLOSE: no keep-alive (Connection: close, HTTP/1.0)
            self.h11.start_next_cycle()

    async def _receive_request(self) -> MockRequest | None:
        """The next whole request, or None when the connection must close.

        A checkpoint. A request that is not HTTP is answered with a 400 first.
        Cancellation leaves a partial request in h11.
        """
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                with contextlib.suppress(h11.LocalProtocolError):
                    status = exc.error_status_hint
                    message = render_error(None, status, f"mock upstream: bad request: {exc}")
                    await self._send(self._head(_error_plan(status, message)) + message)
                return None
            if event is h11.NEED_DATA:
                self.wake = trio.Event()  # no checkpoint since next_event(): no bytes missed
                await self.wake.wait()
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                break
            else:
                return None
        raw = bytes(body)
        parsed: object = None
        if raw[:1] == b"{":
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(raw)
        return MockRequest(
            method=head.method.decode("ascii"),
            path=head.target.decode("ascii", "replace"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
            body=raw,
            json=parsed if isinstance(parsed, dict) else None,
            connection=self.record.index,
        )

    def _head(self, plan: _Plan) -> bytes:
        headers = [(k.encode(), v.encode()) for k, v in plan.headers]
        if plan.framing == "close":
            # Written by hand: for an HTTP/1.1 client h11 would frame the body in chunks.
            lines = [b"HTTP/1.1 %d \r\n" % plan.status]
            lines += [name + b": " + value + b"\r\n" for name, value in headers]
            return b"".join([*lines, b"connection: close\r\n\r\n"])
        if plan.content_length is not None:
            headers.append((b"content-length", b"%d" % plan.content_length))
        return self.h11.send(h11.Response(status_code=plan.status, headers=headers)) or b""

    def _body(self, data: bytes, plan: _Plan) -> bytes:
        """The bytes that carry ``data`` in the body: a chunk, or as they are."""
        return data if plan.framing == "close" else self.h11.send(h11.Data(data=data)) or b""

    async def _respond(self, plan: _Plan) -> bool:
        """Send the response of ``plan``, injecting its fault; return whether to keep alive.

        A checkpoint. Cancellation (the peer went away, or shutdown) leaves the
        response cut short, and the connection must be closed.
        """
        script = plan.script
        fault = script.fault
        if script.first_byte_delay:
            await trio.sleep(script.first_byte_delay)
        if fault is not None and script.fault_at < 0:
            await self._fault(fault)
            return False
        await self._send(self._head(plan))
        sent = 0
        for index, data in enumerate(plan.writes):
            if not data:
                continue
            if script.pace and index:
                await trio.sleep(script.pace)
            if fault is not None and sent + len(data) >= script.fault_at:
                head = data[: script.fault_at - sent]
                if head:
                    await self._send(self._body(head, plan))
                return await self._end_with(fault, plan)
            await self._send(self._body(data, plan))
            sent += len(data)
        if fault is not None:  # fault_at is past the body: fault before its end
            return await self._end_with(fault, plan)
        if plan.framing == "close":
            return False
        await self._send(self.h11.send(h11.EndOfMessage()) or b"")
        return True

    async def _end_with(self, fault: Fault, plan: _Plan) -> bool:
        """End the body with ``fault``; return whether the connection may be kept alive.

        A checkpoint. ``eof`` ends a chunked or sized body cleanly (a body
        delimited by the close ends by closing, as ``truncate`` does).
        """
        if fault == "eof" and plan.framing != "close":
            await self._send(self.h11.send(h11.EndOfMessage()) or b"")
            return True
        await self._fault(fault)
        return False

    async def _fault(self, fault: Fault) -> None:
        """Prepare the socket for ``fault``; the caller then closes it.

        ``stall`` never returns: it sleeps until the reader sees the peer close
        and cancels the connection. ``reset``, ``truncate`` and ``eof`` (here
        a plain close) are not checkpoints.
        """
        if fault == "reset":
            # Linger on, timeout 0: close() discards unsent data and sends a RST.
            linger = struct.pack("ii", 1, 0)
            self.sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, linger)
        elif fault == "stall":
            await trio.sleep_forever()


# --- Command line ------------------------------------------------------------------------------


async def _serve_and_announce(mock: MockUpstream, host: str, port: int) -> None:
    """Serve ``mock`` and print its URL once listening. A checkpoint; runs until cancelled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(mock.serve, host=host, port=port))
        print(f"mock upstream listening on {mock.base_url}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trio_gateway.testing.mock_upstream``: serve one script until killed."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_gateway.testing.mock_upstream",
        description="A deterministic fake LLM provider (chat, messages, responses, ...).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--tokens", type=int, default=12, help="content deltas per stream")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between writes")
    parser.add_argument("--chunk-size", type=int, default=None, help="re-cut writes to N bytes")
    parser.add_argument("--api-key", default=None, help="require this key")
    parser.add_argument(
        "--script-from-request",
        action="store_true",
        help=f'let each request change the script in a "{REQUEST_FIELD}" object of its body',
    )
    args = parser.parse_args(argv)
    script = Script(tokens=args.tokens, pace=args.pace, chunk_size=args.chunk_size)
    scripts = script_from_request(script) if args.script_from_request else script
    mock = MockUpstream(scripts, api_key=args.api_key)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve_and_announce, mock, args.host, args.port)


if __name__ == "__main__":
    main()
