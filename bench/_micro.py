"""``python -m bench._micro``: the gateway's per-event and per-request pieces, each alone.

The scenarios of ``python -m bench`` measure whole servers, where a figure
moves by 20 % from run to run on a shared machine. This module times each
piece of the hot path in isolation, in this process, so the per-layer
budget in docs/benchmarks.md can be checked and a lever judged before the
whole-server run. Each figure is the median over ``--repeat`` timings of
``--number`` calls, in µs per call. A piece alone costs less than it does
inside a busy server (its code and data stay in the CPU's caches), so
these figures are lower bounds; their sum does not add up to the
gateway - bare gap of the scenarios.

Per event: the SSE decode of one chat chunk, the chat rules on it (with
the JSON parse they need), the whole :meth:`StreamRewriter.feed`, the
reader-to-writer hand-over over a zero-buffer channel (against one task
doing one checkpoint per item, which is what bare does), one latency
histogram observation, one ``trio.current_time``, one ``receive_nowait``
that finds nothing. Per request: a task that sleeps and is cancelled
(the watchdog's life), a nursery, the upstream request built by the
client's ``build_request`` and directly (as the gateway does now), the
usage row, the request log line, the metrics of a finished record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable

import httpx
import orjson
import trio
from prometheus_client import CollectorRegistry, Histogram

from trio_gateway._accounting.json_log import format_record
from trio_gateway._accounting.metrics import ADDED_LATENCY_BUCKETS, GatewayMetrics
from trio_gateway._accounting.usage_rows import record_to_row
from trio_gateway._core.kinds import Kind
from trio_gateway._core.record import RequestRecord
from trio_gateway._rewrite import policy_for
from trio_gateway._rewrite.base import StreamRewriter
from trio_gateway.sse import SSEDecoder

__all__ = ["main"]

_UPSTREAM_MODEL = "vendor/model:free"
_PUBLIC_MODEL = "bench/free-model"
_CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "gen-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": _UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
        }
    )
    + b"\n\n"
)
_BODY = orjson.dumps(
    {"model": _UPSTREAM_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
)
_HEADERS = [
    ("content-type", "application/json"),
    ("accept", "text/event-stream"),
    ("accept-encoding", "identity"),
    ("user-agent", "trio-gateway/bench"),
    ("authorization", "Bearer sk-bench-upstream-key"),
]


def _time(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Median µs per call of ``fn`` over ``repeat`` timings of ``number`` calls."""
    return statistics.median(
        t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat)
    )


def _record() -> RequestRecord:
    record = RequestRecord(
        request_id="0" * 32,
        kind=Kind.CHAT,
        key_name="bench",
        public_model=_PUBLIC_MODEL,
        upstream="mock",
        upstream_model=_UPSTREAM_MODEL,
        streamed=True,
        started_at=1.0,
        started_wall=time.time(),
    )
    record.headers_at, record.first_token_at, record.ended_at = 1.01, 1.02, 1.5
    record.status = 200
    return record


def sync_pieces(number: int, repeat: int) -> dict[str, float]:
    """The pieces that need no Trio run: µs per call each."""
    figures: dict[str, float] = {}
    decoder = SSEDecoder()
    figures["event: SSE decode of one chat chunk"] = _time(
        lambda: decoder.feed(_CHUNK), number, repeat
    )
    (event,) = SSEDecoder().feed(_CHUNK)
    policy = policy_for(Kind.CHAT, _PUBLIC_MODEL, free=True, upstream_model=_UPSTREAM_MODEL)
    figures["event: chat rules (rewrite_event)"] = _time(
        lambda: policy.rewrite_event(event), number, repeat
    )
    data = event.data
    figures["event:   of which the JSON parse"] = _time(
        lambda: orjson.loads(data or ""), number, repeat
    )
    rewriter = StreamRewriter(policy, secret=b"sk-bench-upstream-key")
    figures["event: StreamRewriter.feed, all of it"] = _time(
        lambda: rewriter.feed(_CHUNK), number, repeat
    )
    histogram = Histogram(
        "bench_latency", "", registry=CollectorRegistry(), buckets=ADDED_LATENCY_BUCKETS
    )
    figures["event: latency histogram observe"] = _time(
        lambda: histogram.observe(0.0003), number, repeat
    )
    client = httpx.AsyncClient(trust_env=False)
    url_text = "https://upstream.example/api/v1/chat/completions"
    url = httpx.URL(url_text)
    extensions = {"timeout": client.timeout.as_dict()}
    figures["request: upstream request, client.build_request"] = _time(
        lambda: client.build_request("POST", url_text, content=_BODY, headers=_HEADERS),
        number,
        repeat,
    )
    figures["request: upstream request, built directly"] = _time(
        lambda: httpx.Request("POST", url, content=_BODY, headers=_HEADERS, extensions=extensions),
        number,
        repeat,
    )
    record = _record()
    figures["request: usage row"] = _time(lambda: record_to_row(record), number, repeat)
    figures["request: request log line"] = _time(lambda: format_record(record), number, repeat)
    metrics = GatewayMetrics(models=[_PUBLIC_MODEL])
    figures["request: metrics of the record"] = _time(
        lambda: metrics.observe(record), number, repeat
    )
    return figures


async def _trio_pieces(number: int, repeat: int) -> dict[str, float]:
    """The pieces that need a Trio run: µs per item or per request each."""

    async def timed(body: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            await body()  # type: ignore[misc]
            times.append((time.perf_counter() - started) / number * 1e6)
        return statistics.median(times)

    async def one_task() -> None:
        for _ in range(number):
            await trio.lowlevel.checkpoint()  # bare: one wake-up per item

    async def two_tasks() -> None:
        send, receive = trio.open_memory_channel[int](0)

        async def reader() -> None:
            with send:
                for item in range(number):
                    await trio.lowlevel.checkpoint()  # stands for the network read
                    try:
                        send.send_nowait(item)
                    except trio.WouldBlock:
                        await send.send(item)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with receive:
                async for _ in receive:
                    pass

    async def watchdog_life() -> None:
        async def watchdog() -> None:
            await trio.sleep_until(trio.current_time() + 30)

        for _ in range(number):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog)
                await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel(reason="bench")

    async def nursery_alone() -> None:
        for _ in range(number):
            async with trio.open_nursery() as nursery:
                await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel(reason="bench")

    send, receive = trio.open_memory_channel[int](0)

    def probe() -> None:
        # As the writer does it (contextlib.suppress would add its own cost).
        try:  # noqa: SIM105
            receive.receive_nowait()
        except trio.WouldBlock:
            pass

    bare = await timed(one_task)
    nursery = await timed(nursery_alone)
    with send, receive:
        return {
            "event: hand-over reader -> writer, over one task's wake-up": await timed(two_tasks)
            - bare,
            "event: trio.current_time": _time(trio.current_time, number, repeat),
            "event: receive_nowait that finds nothing": _time(probe, number, repeat),
            "request: a nursery": nursery,
            "request: the watchdog task (spawn, sleep, cancel)": await timed(watchdog_life)
            - nursery,
        }


def main(argv: list[str] | None = None) -> int:
    """Print each piece's µs per call, events first, then requests."""
    parser = argparse.ArgumentParser(prog="python -m bench._micro", description=__doc__)
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per piece (median)")
    args = parser.parse_args(argv)
    figures = sync_pieces(args.number, args.repeat)
    figures |= trio.run(_trio_pieces, args.number, args.repeat)
    print("| piece | µs per call |\n|---|---|")
    for name in sorted(figures, key=lambda n: not n.startswith("event")):
        print(f"| {name} | {figures[name]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
