"""Usage records: exactly one per routed request, with the right figures however it ended.

In memory on the mock clock, with a sink that collects what the gateway submits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.helpers import (
    PUBLIC_MODEL,
    STALL,
    UPSTREAM_MODEL,
    AsgiCall,
    BodyStep,
    FakeResponse,
    FakeUpstream,
    ListSink,
    make_config,
    paced,
)
from tests.test_pipeline import KINDS, request_for, stream_bytes
from trio_gateway._core.config import Timeouts
from trio_gateway._core.kinds import FailureType, Kind
from trio_gateway._core.record import RequestRecord
from trio_gateway._proxy.app import Gateway
from trio_gateway.testing.mock_upstream import Script, StreamKind, render_json, render_stream


def gateway_with(respond: Any, sink: ListSink, **config: Any) -> tuple[Gateway, FakeUpstream]:
    upstream = FakeUpstream(respond)
    return Gateway(make_config(**config), transport=upstream, sinks=[sink]), upstream


# (input, output, cached, reasoning, cost, upstream id, finish reason) of the example streams.
EXAMPLE_FIGURES = {
    "chat": (42, 300, 0, 0, 0.00123, "gen-1732430000-abcdef", "stop"),
    "messages": (42, 5, 0, None, 0.00123, "msg_01XFDUDYJgAACzvnptvVoYEL", "end_turn"),
    "responses": (
        42,
        5,
        0,
        0,
        0.00123,
        "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "completed",
    ),
}


def figures(record: RequestRecord) -> tuple[Any, ...]:
    usage = record.usage
    return (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_tokens,
        usage.reasoning_tokens,
        usage.cost,
        record.upstream_id,
        record.finish_reason,
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_completed_stream_leaves_one_exact_record(
    kind: str, autojump_clock: trio.testing.MockClock
):
    sink = ListSink()
    body: list[BodyStep] = [2.0, stream_bytes(kind)]  # 2 s of thinking first
    gateway, _ = gateway_with(FakeResponse(body=body, headers_delay=1.0), sink)
    call = await request_for(kind).run(gateway)
    (record,) = sink.records
    assert figures(record) == EXAMPLE_FIGURES[kind]
    assert record.usage.cost == 0.00123, "cost is recorded before it is stripped"
    assert b'"cost"' not in call.text
    assert (record.kind, record.key_name, record.streamed, record.status) == (
        Kind[kind.upper()],
        "tests",
        True,
        200,
    )
    assert (record.public_model, record.upstream_model) == (PUBLIC_MODEL, UPSTREAM_MODEL)
    assert record.time_to_headers == pytest.approx(1.0)
    assert record.time_to_first_token == pytest.approx(3.0)
    assert record.duration == pytest.approx(3.0)
    assert record.bytes_to_client == len(call.text)
    assert record.error_type is None
    assert not record.cancelled


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_and_json_of_the_same_answer_record_the_same_usage(
    kind: StreamKind, autojump_clock: trio.testing.MockClock
):
    script = Script(tokens=17)
    streamed, whole = ListSink(), ListSink()
    gateway, _ = gateway_with(FakeResponse(body=render_stream(kind, script, "m")), streamed)
    await request_for(kind).run(gateway)
    answer = FakeResponse(body=[render_json(kind, script, "m")], content_type="application/json")
    gateway, _ = gateway_with(answer, whole)
    path = KINDS[kind][0]
    payload = {"model": PUBLIC_MODEL, "input": "hi", "messages": []}
    await AsgiCall.json(payload, path=path).run(gateway)
    (stream_record,) = streamed.records
    (json_record,) = whole.records
    assert stream_record.usage == json_record.usage
    assert stream_record.usage.output_tokens == 17
    assert stream_record.usage.input_tokens == 42
    assert stream_record.usage.cost is not None
    assert (stream_record.streamed, json_record.streamed) == (True, False)


@pytest.mark.parametrize("kind", KINDS)
async def test_client_disconnect_mid_stream_is_recorded(
    kind: str, autojump_clock: trio.testing.MockClock
):
    sink = ListSink()
    events = stream_bytes(kind).split(b"\n\n")
    body: list[Any] = [events[0] + b"\n\n", events[1] + b"\n\n", STALL]
    gateway, _ = gateway_with(FakeResponse(body=body), sink)
    call = request_for(kind)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(4)
        call.disconnect()
    (record,) = sink.records
    assert record.cancelled
    assert record.error_type is FailureType.CLIENT_DISCONNECT
    assert record.duration == pytest.approx(4)


@pytest.mark.parametrize(
    ("respond", "timeouts", "error_type", "status"),
    [
        (
            FakeResponse(body=[b"data: {}\n\n", httpx.ReadError("reset")]),
            None,
            FailureType.UPSTREAM_RESET,
            200,
        ),
        (
            FakeResponse(body=[b"data: {}\n\n", STALL]),
            Timeouts(idle=9),
            FailureType.IDLE_TIMEOUT,
            200,
        ),
        (
            FakeResponse(headers_delay=1e6),
            Timeouts(first_byte=7),
            FailureType.UPSTREAM_TIMEOUT,
            504,
        ),
        (
            FakeResponse(error=httpx.ConnectError("no")),
            None,
            FailureType.UPSTREAM_UNREACHABLE,
            502,
        ),
        (
            FakeResponse(body=[b'{"error": {}}'], status=429, content_type="application/json"),
            None,
            FailureType.UPSTREAM_STATUS,
            429,
        ),
    ],
    ids=["reset", "idle", "first-byte", "unreachable", "status"],
)
async def test_failures_are_recorded_with_their_type(
    respond: FakeResponse,
    timeouts: Timeouts | None,
    error_type: FailureType,
    status: int,
    autojump_clock: trio.testing.MockClock,
):
    sink = ListSink()
    gateway, _ = gateway_with(respond, sink, timeouts=timeouts or Timeouts())
    await request_for("chat").run(gateway)
    (record,) = sink.records
    assert record.error_type is error_type
    assert record.status == status
    assert not record.cancelled


async def test_requests_refused_before_routing_leave_no_record(
    autojump_clock: trio.testing.MockClock,
):
    sink = ListSink()
    gateway, upstream = gateway_with(FakeResponse(), sink)
    await AsgiCall.json({"model": "nope"}).run(gateway)
    await AsgiCall(body=b"{}", headers=[(b"content-type", b"application/json")]).run(gateway)
    assert sink.records == []
    assert upstream.requests == []


async def test_a_sink_that_hangs_never_delays_the_client_and_is_bounded(
    autojump_clock: trio.testing.MockClock,
):
    sink = ListSink(block=True)
    gateway, _ = gateway_with(FakeResponse(body=[stream_bytes("chat")]), sink)
    call = request_for("chat")
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(0.001)
        # The whole answer is out before accounting even starts waiting.
        assert call.ended
        assert call.events[-1].data == "[DONE]"
    # ...and the request task gives up on the sink after the accounting grace.
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
    assert len(sink.records) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_disconnect_reported_after_a_complete_response_is_not_a_cancellation(
    kind: str, autojump_clock: trio.testing.MockClock
):
    sink = ListSink()
    gateway, _ = gateway_with(FakeResponse(body=[stream_bytes(kind)]), sink)
    await request_for(kind, disconnect_when_done=True).run(gateway)
    (record,) = sink.records
    assert not record.cancelled
    assert record.error_type is None


# Input tokens known once the first two events are through: only Messages reports
# them that early (message_start); chat and Responses report usage at the end.
EARLY_USAGE = {"chat": (None, None), "messages": (42, 1), "responses": (None, None)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("ending", "timeouts", "error_type"),
    [
        (httpx.RemoteProtocolError("cut"), Timeouts(), FailureType.UPSTREAM_RESET),
        (STALL, Timeouts(idle=30), FailureType.IDLE_TIMEOUT),
    ],
    ids=["reset", "idle-timeout"],
)
async def test_stream_failures_of_each_kind_keep_the_usage_seen_so_far(
    kind: str,
    ending: BodyStep,
    timeouts: Timeouts,
    error_type: FailureType,
    autojump_clock: trio.testing.MockClock,
):
    sink = ListSink()
    first_two = b"".join(raw + b"\n\n" for raw in stream_bytes(kind).split(b"\n\n")[:2])
    gateway, _ = gateway_with(FakeResponse(body=[first_two, ending]), sink, timeouts=timeouts)
    await request_for(kind).run(gateway)
    (record,) = sink.records
    assert record.error_type is error_type
    assert record.status == 200
    # message_start reports the input and the output "so far" (1).
    assert (record.usage.input_tokens, record.usage.output_tokens) == EARLY_USAGE[kind]
    assert record.duration == pytest.approx(30 if error_type is FailureType.IDLE_TIMEOUT else 0)


async def test_cancelled_stream_keeps_its_first_token_time_and_bytes(
    autojump_clock: trio.testing.MockClock,
):
    sink = ListSink()
    first_two = b"".join(raw + b"\n\n" for raw in stream_bytes("messages").split(b"\n\n")[:5])
    gateway, _ = gateway_with(FakeResponse(body=[1.0, first_two, STALL]), sink)
    call = request_for("messages")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, gateway)
        await trio.sleep(3)
        call.disconnect()
    (record,) = sink.records
    assert record.cancelled
    assert record.time_to_first_token == pytest.approx(1.0)
    assert record.bytes_to_client == len(call.text) > 0


async def test_stalled_client_and_shutdown_and_runaway_events_are_recorded(
    autojump_clock: trio.testing.MockClock,
):
    stalled_sink, shutdown_sink, runaway_sink = ListSink(), ListSink(), ListSink()
    events = [raw + b"\n\n" for raw in stream_bytes("chat").split(b"\n\n") if raw]
    gateway, _ = gateway_with(
        FakeResponse(body=paced(events)),
        stalled_sink,
        timeouts=Timeouts(client_stall=10, keepalive=0),
    )
    stalled = request_for("chat")
    stalled.reading = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stalled.run, gateway)
        await trio.sleep(20)
        stalled.reading.set()
    assert stalled_sink.records[0].error_type is FailureType.CLIENT_STALL

    gateway, _ = gateway_with(FakeResponse(body=[events[0], STALL]), shutdown_sink)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_for("chat").run, gateway)
        await trio.sleep(1)
        await gateway.drain(grace=1)
    assert shutdown_sink.records[0].error_type is FailureType.SHUTDOWN

    gateway, _ = gateway_with(
        FakeResponse(body=[b"data: " + b"x" * 2000] * 100), runaway_sink, max_event_bytes=4096
    )
    await request_for("chat").run(gateway)
    assert runaway_sink.records[0].error_type is FailureType.REWRITE_ERROR


async def test_oversize_upstream_answer_is_recorded(autojump_clock: trio.testing.MockClock):
    sink = ListSink()
    answer = FakeResponse(body=[b"{" + b" " * 2_000_000], content_type="application/json")
    upstream = FakeUpstream(answer)
    config = dataclasses.replace(make_config(), max_upstream_body_bytes=1_000_000)
    gateway = Gateway(config, transport=upstream, sinks=[sink])
    call = await AsgiCall.json({"model": PUBLIC_MODEL, "messages": []}).run(gateway)
    assert call.status == 502
    (record,) = sink.records
    assert record.error_type is FailureType.UPSTREAM_TOO_LARGE
    assert record.bytes_to_client == len(call.text)
