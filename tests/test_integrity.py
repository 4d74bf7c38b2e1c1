"""Stream integrity: a cut or corrupted answer is never passed off as complete.

The rule under test (docs/cancellation.md, *The answer's end*): an answer is
complete only when its kind's end arrived (Chat: ``[DONE]``, or a finished
choice followed only by usage chunks; Messages: ``message_stop``; Responses:
``response.completed``, ``.incomplete`` or ``.failed``), whatever the
transport said. An upstream body that ends cleanly before that ends the
client's stream with the kind's error event (``upstream_truncated``); an
event the kind needs as JSON that is not ends it with ``upstream_invalid``,
and nothing of that event is forwarded. A whole JSON answer gets the same
rules. Both paths apply one rule set, which a property test holds.

Everything here runs in memory on the mock clock, with bodies the mock
provider renders, cut at every byte offset.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import (
    PUBLIC_MODEL,
    UPSTREAM_MODEL,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    ListSink,
    make_config,
    sse,
)
from tests.test_fault_matrix import KINDS, PATHS, events_of, request_for
from trio_gateway import Gateway
from trio_gateway._core.kinds import Failure, FailureType
from trio_gateway._rewrite.base import Policy, StreamRewriter, rewrite_json_body
from trio_gateway._rewrite.chat import ChatPolicy
from trio_gateway._rewrite.messages import MessagesPolicy
from trio_gateway._rewrite.responses import ResponsesPolicy
from trio_gateway.sse import SSEDecoder, SSEEvent
from trio_gateway.testing.mock_upstream import Script, StreamKind, render_json, render_stream

TOKENS = 7
TERMINAL = {
    "chat": frozenset(),
    "messages": frozenset({"message_stop"}),
    "responses": frozenset({"response.completed", "response.incomplete", "response.failed"}),
}
POLICIES: dict[StreamKind, type[Policy]] = {
    "chat": ChatPolicy,
    "messages": MessagesPolicy,
    "responses": ResponsesPolicy,
}


class Replay:
    """The fake upstream's answer, changed between requests to one gateway."""

    def __init__(self) -> None:
        self.answer = FakeResponse()

    def __call__(self, request: object) -> FakeResponse:
        return self.answer


def gateway_with_records() -> tuple[Gateway, Replay, ListSink]:
    replay, sink = Replay(), ListSink()
    gateway = Gateway(make_config(), transport=FakeUpstream(replay), sinks=[sink])
    return gateway, replay, sink


def decode(data: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    return decoder.feed(data) + decoder.close()


def is_complete(kind: StreamKind, body: bytes) -> bool | None:
    """The spec's verdict on an upstream body, found independently of the gateway's code.

    True: the kind's end arrived; False: it did not (a truncation); None: an
    event holds data that is not a JSON object (invalid, or cut at the end).
    """
    finished = done = False
    for event in decode(body):
        if event.data == "[DONE]":
            done = True
            continue
        if event.comment is not None or (event.data, event.event, event.id) == (None, None, None):
            continue  # SSE clients dispatch neither comments nor blocks of unknown fields
        try:
            payload = orjson.loads(event.data or "")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(payload, dict):
            return None
        if kind == "chat":
            choices = payload.get("choices") or []
            if choices and ("usage" not in payload or any(c.get("finish_reason") for c in choices)):
                finished = any(c.get("finish_reason") is not None for c in choices)
        elif event.event in TERMINAL[kind]:
            finished = True
    return finished or (kind == "chat" and done)


def error_type_of(kind: StreamKind, event: SSEEvent) -> str | None:
    """The failure type a kind's error event names, or None if ``event`` is no error event."""
    if not event.data or event.data == "[DONE]":
        return None
    payload = orjson.loads(event.data)
    if kind == "chat":
        error = payload.get("error")
        return error["type"] if isinstance(error, dict) else None
    if event.event != "error":
        return None
    if kind == "responses":
        assert payload["error"]["code"] == payload["code"]  # the nested copy SDKs need
        return str(payload["code"])
    message = payload["error"]["message"]
    assert payload["error"]["type"] == "api_error"
    if "before its end event" in message:
        return FailureType.UPSTREAM_TRUNCATED.value
    return FailureType.UPSTREAM_INVALID.value if "not a JSON object" in message else message


def claims_an_end(kind: StreamKind, events: list[SSEEvent]) -> bool:
    """Whether the client got anything that says the answer is complete."""
    if kind == "chat":
        return any(e.data == "[DONE]" for e in events)
    return any(e.event in TERMINAL[kind] for e in events)


def assert_ended_with(kind: StreamKind, call: AsgiCall, failure: FailureType) -> None:
    assert call.status == 200
    assert call.ended
    events = call.events
    assert error_type_of(kind, events[-1]) == failure.value, events[-1]
    assert [error_type_of(kind, e) for e in events].count(failure.value) == 1
    assert not claims_an_end(kind, events)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_body_cut_cleanly_at_any_offset_is_never_complete(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    # Every byte offset of each kind's rendered stream (about 8,300 runs in all).
    body = b"".join(render_stream(kind, Script(tokens=TOKENS), UPSTREAM_MODEL))
    gateway, replay, sink = gateway_with_records()
    verdicts = set()
    for at in range(1, len(body) + 1):
        prefix = body[:at]
        replay.answer = FakeResponse(body=[prefix])
        call = await request_for(kind).run(gateway)
        record = sink.records[-1]
        verdict = is_complete(kind, prefix)
        verdicts.add(verdict)
        assert UPSTREAM_MODEL.encode() not in call.text, at
        if verdict:
            assert call.ended, at
            assert all(error_type_of(kind, e) is None for e in call.events), at
            assert record.error_type is None, at
        else:
            # A cut final block that does not parse is a truncation too.
            assert_ended_with(kind, call, FailureType.UPSTREAM_TRUNCATED)
            assert record.error_type is FailureType.UPSTREAM_TRUNCATED, at
    assert verdicts == {True, False, None}, "the offsets cover each verdict"
    assert len(sink.records) == len(body)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_same_cut_delivered_byte_by_byte_ends_the_same_way(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    body = b"".join(render_stream(kind, Script(tokens=TOKENS), UPSTREAM_MODEL))
    gateway, replay, _ = gateway_with_records()
    for at in (len(body) // 3, len(body) // 2, len(body) - 40):
        prefix = body[:at]
        replay.answer = FakeResponse(body=[prefix])
        whole = await request_for(kind).run(gateway)
        replay.answer = FakeResponse(body=[bytes([b]) for b in prefix])
        bytewise = await request_for(kind).run(gateway)
        assert bytewise.text == whole.text
        assert_ended_with(kind, bytewise, FailureType.UPSTREAM_TRUNCATED)


def garbled(items: list[bytes], index: int, mode: str) -> tuple[bytes, bytes]:
    """``items`` joined, with the data of item ``index`` garbled; and the garbage itself."""
    item = items[index]
    head, _, data = item.rstrip(b"\n").rpartition(b"data: ")
    junk = b"}{ not json \xff"
    bad = junk if mode == "junk" else data[: len(data) // 2] + junk
    return b"".join([*items[:index], head + b"data: " + bad + b"\n\n", *items[index + 1 :]]), bad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["junk", "cut"])
async def test_garbage_inside_any_event_ends_the_stream_and_is_not_forwarded(
    kind: StreamKind, mode: str, autojump_clock: trio.testing.MockClock
) -> None:
    items = events_of(b"".join(render_stream(kind, Script(tokens=TOKENS), UPSTREAM_MODEL)))
    gateway, replay, sink = gateway_with_records()
    data_items = [i for i, item in enumerate(items) if b"data: {" in item]
    assert len(data_items) > TOKENS
    for index in data_items:
        body, bad = garbled(items, index, mode)
        for chunks in ([body], [bytes([b]) for b in body]):
            replay.answer = FakeResponse(body=chunks)
            call = await request_for(kind).run(gateway)
            assert_ended_with(kind, call, FailureType.UPSTREAM_INVALID)
            assert bad not in call.text
            assert b"not json" not in call.text
            assert UPSTREAM_MODEL.encode() not in call.text, (index, mode)
            assert sink.records[-1].error_type is FailureType.UPSTREAM_INVALID
            # Every event before the garbage went out.
            sent = [e for e in call.events if e.comment is None][:-1]
            expected = [e for e in decode(b"".join(items[:index])) if e.comment is None]
            assert len(sent) == len(expected), index


async def test_a_garbled_completed_event_leaks_neither_its_text_nor_the_upstream_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The case found under load: cut-off JSON plus garbage under the terminal
    # event's own name, with the upstream model name in the cut-off part.
    items = events_of(b"".join(render_stream("responses", Script(tokens=3), UPSTREAM_MODEL)))
    last = items[-1]
    assert last.startswith(b"event: response.completed")
    cut = last[: last.index(UPSTREAM_MODEL.encode()) + len(UPSTREAM_MODEL) + 3] + b"\x00garbage\n\n"
    gateway, replay, sink = gateway_with_records()
    replay.answer = FakeResponse(body=[*items[:-1], cut])
    call = await request_for("responses").run(gateway)
    assert_ended_with("responses", call, FailureType.UPSTREAM_INVALID)
    assert UPSTREAM_MODEL.encode() not in call.text
    assert b"garbage" not in call.text
    record = sink.records[-1]
    assert record.error_type is FailureType.UPSTREAM_INVALID
    assert record.finish_reason is None  # not "completed": that event never counted


JSON_PATHS = {**PATHS}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_json_answer_cut_at_any_offset_is_a_truncation_error(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    body = render_json(kind, Script(tokens=TOKENS), UPSTREAM_MODEL)
    gateway, replay, sink = gateway_with_records()
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "messages": [], "input": "hi"}
    for at in range(1, len(body)):
        replay.answer = FakeResponse(body=[body[:at]], content_type="application/json")
        call = await AsgiCall.json(payload, path=JSON_PATHS[kind]).run(gateway)
        assert call.status == 502, at
        answer = call.json_body()
        error = answer["error"]
        if kind == "messages":
            assert answer["type"] == "error"
            assert "cut short" in error["message"]
        else:
            assert error["code"] == FailureType.UPSTREAM_TRUNCATED.value
        assert sink.records[-1].error_type is FailureType.UPSTREAM_TRUNCATED
        assert UPSTREAM_MODEL.encode() not in call.text
    replay.answer = FakeResponse(body=[body], content_type="application/json")
    call = await AsgiCall.json(payload, path=JSON_PATHS[kind]).run(gateway)
    assert call.status == 200
    assert sink.records[-1].error_type is None


@pytest.mark.parametrize("kind", KINDS)
async def test_a_json_answer_with_garbage_is_invalid_not_truncated(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    body = render_json(kind, Script(tokens=TOKENS), UPSTREAM_MODEL)
    gateway, replay, sink = gateway_with_records()
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "messages": [], "input": "hi"}
    # Not cut short: bytes after the end, a byte no JSON holds, not JSON at all.
    for bad in (body + b"garbage", body[: len(body) // 2] + b"\x00}{ garbage", b"<html>"):
        replay.answer = FakeResponse(body=[bad], content_type="application/json")
        call = await AsgiCall.json(payload, path=JSON_PATHS[kind]).run(gateway)
        assert call.status == 502
        assert sink.records[-1].error_type is FailureType.UPSTREAM_INVALID
        assert b"garbage" not in call.text


async def test_done_keeps_its_id_line(autojump_clock: trio.testing.MockClock) -> None:
    chunk = {
        "id": "c",
        "model": UPSTREAM_MODEL,
        "choices": [{"delta": {}, "finish_reason": "stop"}],
    }
    body = [b"id: 6\n" + sse(chunk)[0], b"id: 7\ndata: [DONE]\n\n"]
    gateway, replay, _ = gateway_with_records()
    replay.answer = FakeResponse(body=body)
    call = await request_for("chat").run(gateway)
    assert [(e.id, e.data == "[DONE]") for e in call.events] == [("6", False), ("7", True)]
    assert call.text.endswith(b"id: 7\ndata: [DONE]\n\n")


async def test_a_finished_chat_without_done_is_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # OpenAI itself may end with the usage chunk when [DONE] is not sent.
    body = b"".join(render_stream("chat", Script(tokens=3, send_done=False), UPSTREAM_MODEL))
    gateway, replay, sink = gateway_with_records()
    replay.answer = FakeResponse(body=[body])
    call = await request_for("chat").run(gateway)
    assert all(error_type_of("chat", e) is None for e in call.events)
    assert sink.records[-1].error_type is None
    assert sink.records[-1].finish_reason == "stop"


def test_the_responses_error_event_carries_the_nested_error_sdks_read() -> None:
    policy = ResponsesPolicy(PUBLIC_MODEL, free=True)
    policy.last_sequence = 4
    event = decode(policy.error_event(Failure(FailureType.UPSTREAM_TRUNCATED, "cut")))[0]
    assert event.event == "error"
    assert orjson.loads(event.data or "") == {
        "type": "error",
        "sequence_number": 5,
        "code": "upstream_truncated",
        "message": "cut",
        "param": None,
        "error": {
            "type": "upstream_error",
            "code": "upstream_truncated",
            "message": "cut",
            "param": None,
        },
    }


# --- One rule set, two paths -------------------------------------------------------------------

COST = st.fixed_dictionaries(
    {},
    optional={
        "cost": st.floats(0, 1, allow_nan=False),
        "is_byok": st.booleans(),
        "cost_details": st.none() | st.fixed_dictionaries({"upstream_inference_cost": st.none()}),
    },
)
COUNT = st.none() | st.integers(0, 10**6)


@st.composite
def usages(draw: st.DrawFn, kind: StreamKind) -> dict[str, Any]:
    if kind == "chat":
        usage: dict[str, Any] = {"prompt_tokens": draw(COUNT), "completion_tokens": draw(COUNT)}
        details = draw(st.sampled_from(["absent", "null", "empty", "null-cached", "cached"]))
        if details == "null":
            usage["prompt_tokens_details"] = None
        elif details == "empty":
            usage["prompt_tokens_details"] = {}
        elif details == "null-cached":
            usage["prompt_tokens_details"] = {"cached_tokens": None}
        elif details == "cached":
            usage["prompt_tokens_details"] = {"cached_tokens": draw(st.integers(0, 100))}
    else:
        usage = {"input_tokens": draw(COUNT), "output_tokens": draw(COUNT)}
    return usage | draw(COST)


def as_stream_and_body(kind: StreamKind, model: str, usage: dict[str, Any]) -> tuple[bytes, bytes]:
    """The same answer as one streamed event and as a whole JSON body."""
    if kind == "chat":
        chunk = {"id": "x", "model": model, "choices": [], "usage": usage}
        return b"".join(sse(chunk, "[DONE]")), orjson.dumps({**chunk, "object": "chat.completion"})
    if kind == "messages":
        message = {"id": "m", "type": "message", "model": model, "usage": usage}
        start = {"type": "message_start", "message": message}
        stop = {"type": "message_stop"}
        return b"".join(sse(start, stop, event_names=True)), orjson.dumps(message)
    response = {
        "id": "r",
        "object": "response",
        "status": "completed",
        "model": model,
        "usage": usage,
    }
    done = {"type": "response.completed", "sequence_number": 0, "response": response}
    return b"".join(sse(done, event_names=True)), orjson.dumps(response)


def rewritten_object(kind: StreamKind, events: list[SSEEvent]) -> dict[str, Any]:
    """The object a client reads the model and usage from, in a rewritten stream."""
    first = orjson.loads(events[0].data or "")
    if kind == "messages":
        return dict(first["message"])
    if kind == "responses":
        return dict(first["response"])
    return dict(first)


@pytest.mark.parametrize("kind", KINDS)
@given(
    data=st.data(), free=st.booleans(), model=st.sampled_from([UPSTREAM_MODEL, PUBLIC_MODEL, None])
)
def test_stream_and_json_paths_apply_the_same_rules(
    kind: StreamKind, data: st.DataObject, free: bool, model: str | None
) -> None:
    usage = data.draw(usages(kind))
    stream, body = as_stream_and_body(kind, model, usage)  # type: ignore[arg-type]
    stream_policy = POLICIES[kind](PUBLIC_MODEL, free=free)
    rewriter = StreamRewriter(stream_policy)
    out = rewriter.feed(stream) + rewriter.finish()
    assert rewriter.failure is None
    json_policy = POLICIES[kind](PUBLIC_MODEL, free=free)
    from_stream = rewritten_object(kind, decode(out))
    from_json = orjson.loads(rewrite_json_body(body, json_policy))
    assert from_stream.get("model") == from_json.get("model")
    assert from_stream["usage"] == from_json["usage"]
    assert stream_policy.extracted.usage == json_policy.extracted.usage
    if kind == "chat":
        assert from_json["usage"]["prompt_tokens_details"]["cached_tokens"] is not None
    cost = {name: usage[name] for name in ("cost", "is_byok", "cost_details") if name in usage}
    kept = {name: from_json["usage"][name] for name in cost if name in from_json["usage"]}
    assert kept == ({} if free else cost)


# --- The upstream model's name ----------------------------------------------------------------

SAYS_MODEL = f"{UPSTREAM_MODEL} is temporarily rate-limited upstream"
UPSTREAM_ERRORS: dict[StreamKind, list[bytes]] = {
    "chat": sse(
        {"id": "c", "model": UPSTREAM_MODEL, "error": {"code": 429, "message": SAYS_MODEL}}
    ),
    "messages": sse(
        {"type": "error", "error": {"type": "overloaded_error", "message": SAYS_MODEL}},
        event_names=True,
    ),
    "responses": sse(
        {
            "type": "error",
            "sequence_number": 0,
            "code": "rate_limited",
            "message": SAYS_MODEL,
            "param": None,
        },
        event_names=True,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
async def test_upstream_error_messages_never_name_the_upstream_model(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    gateway, replay, _ = gateway_with_records()
    # Streamed: the upstream's own error event.
    replay.answer = FakeResponse(body=UPSTREAM_ERRORS[kind])
    call = await request_for(kind).run(gateway)
    assert UPSTREAM_MODEL.encode() not in call.text
    assert f"{PUBLIC_MODEL} is temporarily rate-limited upstream".encode() in call.text
    # Whole: an error answer.
    error: dict[str, Any] = {"error": {"message": SAYS_MODEL, "type": "rate_limit_error"}}
    if kind == "messages":
        error = {"type": "error", **error}
    replay.answer = FakeResponse(
        body=[orjson.dumps(error)], status=429, content_type="application/json"
    )
    payload: dict[str, Any] = {"model": PUBLIC_MODEL, "messages": [], "input": "hi"}
    call = await AsgiCall.json(payload, path=JSON_PATHS[kind]).run(gateway)
    assert call.status == 429
    assert UPSTREAM_MODEL.encode() not in call.text
    assert PUBLIC_MODEL in call.json_body()["error"]["message"]


async def test_generated_text_that_names_the_model_is_left_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Only the upstream's error objects are scrubbed: an answer is the model's words.
    chunk = {
        "id": "c",
        "model": UPSTREAM_MODEL,
        "choices": [{"delta": {"content": UPSTREAM_MODEL}}],
    }
    done = {"id": "c", "model": UPSTREAM_MODEL, "choices": [{"delta": {}, "finish_reason": "stop"}]}
    gateway, replay, _ = gateway_with_records()
    replay.answer = FakeResponse(body=sse(chunk, done, "[DONE]"))
    call = await request_for("chat").run(gateway)
    contents = [
        orjson.loads(e.data or "")["choices"][0]["delta"].get("content") for e in call.events[:2]
    ]
    assert contents == [UPSTREAM_MODEL, None]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_line_cut_in_its_field_name_is_not_forwarded(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
) -> None:
    body = b"".join(render_stream(kind, Script(tokens=3), UPSTREAM_MODEL))
    gateway, replay, _ = gateway_with_records()
    for fragment in (b"d", b"da", b"eve", b"even"):
        prefix = body[: body.index(b"\n\n") + 2] + fragment  # after the first whole item
        replay.answer = FakeResponse(body=[prefix])
        call = await request_for(kind).run(gateway)
        assert b"\n" + fragment + b"\n" not in call.text, fragment
        assert_ended_with(kind, call, FailureType.UPSTREAM_TRUNCATED)
