"""The chaos scenarios: a mixed load with upstream faults, and what reached each client.

Theory of operation
===================

1. **The load.** :mod:`bench._faults` draws one plan per request from the
   seed: the API kind, streamed or JSON, the upstream fault (clean ends
   mid-answer in each framing, FIN, RST, garbage in an event, stalls) and
   whether the client leaves early. The mock
   (``--script-from-request``) reads the fault from the request body, which
   the gateway forwards. Requests go on fresh connections, ``concurrency``
   at a time.
2. **The client** (:func:`fetch`) is trio + h11, like the load generator,
   but it keeps every byte it receives (the head too), so a verdict can be
   taken from them (:func:`bench._faults.classify`) and the upstream
   model's name looked for. Only the verdict is kept, not the bytes, so a
   soak of many requests holds little.
3. **After the load,** the mock is asked for its own counts
   (``GET /mock/stats``): connections still mid-response once the gateway
   has had a moment to settle (they should be none: every upstream exchange
   ended), then, after the gateway has been stopped with SIGTERM and has
   exited, connections still open at all. The usage database is read with
   sqlite3 after the exit: every request whose answer carried an
   ``x-request-id`` must have exactly one record (spilled lines count).
4. **chaos-sigterm** paces the streams so that many are in flight, and
   once half the requests have started sends the gateway SIGTERM and, half
   a second later, a second one, which must cut the drain's grace short
   (the grace is 30 s here, so only the second signal can end the drain in
   time). Every stream in flight at the first signal must end complete or
   with its error event, and no record may be lost.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h11
import orjson
import trio

from bench._contenders import UPSTREAM_MODEL, Endpoint
from bench._faults import (
    BREAKDOWN_COLUMNS,
    KINDS,
    Answer,
    Outcome,
    Plan,
    Result,
    breakdown,
    classify,
    error_codes,
    evidence,
    examples,
    flaws,
    make_plans,
    request_body,
    summarize_results,
)
from bench._load import Target
from bench._procs import Server
from bench._scenarios import Base, Context, Metrics
from trio_gateway.testing.mock_upstream import StreamKind

__all__ = ["Chaos", "ChaosSigterm", "fetch", "mock_stats", "read_records", "run_plans"]

_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
_READ_SIZE = 65536
_LEAK_MARKS = (UPSTREAM_MODEL.encode(), UPSTREAM_MODEL.replace("/", "\\/").encode())
_SETTLE = 5.0  # seconds the mock's counts get to reach zero after the load, and after the exit
_EXIT_LIMIT = 60.0  # seconds the gateway gets to exit after SIGTERM


async def fetch(target: Target, answer: Answer, leave_after: int | None) -> None:
    """Send ``target`` on a new connection and read the answer into ``answer``.

    A checkpoint. With ``leave_after``, the client closes once that many body
    bytes arrived (-1: right after sending the request, 0: at the head), unless
    the body ended first. Failures end up in ``answer.ended``, never raised.
    Cancelled, it closes the socket and leaves ``answer`` as it was.
    """
    with trio.socket.socket() as sock:
        try:
            await sock.connect(("127.0.0.1", target.port))
        except OSError:
            answer.ended = "refused"
            return
        client = h11.Connection(h11.CLIENT)
        try:
            view = memoryview(target.send(client))
            while view:
                view = view[await sock.send(view) :]
            if leave_after == -1:
                answer.ended = "left"
                return
            await _read(sock, client, answer, leave_after)
        except ConnectionResetError:
            answer.ended = "reset"
        except (OSError, h11.ProtocolError):
            answer.ended = "closed"


async def _read(
    sock: trio.socket.SocketType, client: h11.Connection, answer: Answer, leave_after: int | None
) -> None:
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            data = await sock.recv(_READ_SIZE)
            answer.received += data
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            answer.status = event.status_code
            for name, value in event.headers:
                if name == b"content-type":
                    answer.content_type = value.decode("latin-1").lower()
                elif name == b"x-request-id":
                    answer.request_id = value.decode("latin-1")
            if leave_after == 0:
                answer.ended = "left"
                return
        elif isinstance(event, h11.Data):
            answer.body += event.data
            if leave_after is not None and len(answer.body) >= leave_after:
                answer.ended = "left"
                return
        elif isinstance(event, h11.EndOfMessage):
            answer.ended = "end"
            return
        else:  # ConnectionClosed before the end of the body
            answer.ended = "closed"
            return


def leaked(received: bytes | bytearray) -> bool:
    """Whether the upstream model's name is in ``received`` (plain or JSON-escaped)."""
    return any(mark in received for mark in _LEAK_MARKS)


def target_of(plan: Plan, endpoint: Endpoint) -> Target:
    """The request of ``plan`` for ``endpoint``."""
    headers = [("authorization", f"Bearer {endpoint.key}")]
    if plan.kind == "messages":
        headers.append(("anthropic-version", "2023-06-01"))
    body = request_body(plan, endpoint.model)
    return Target(endpoint.port, _PATHS[plan.kind], body, tuple(headers))


class Load:
    """The requests of a run: which have started, and each one's result once done."""

    def __init__(self, plans: Sequence[Plan]) -> None:
        self.plans = plans
        self.results: list[Result | None] = [None] * len(plans)
        self.started = 0
        self.done = 0

    def in_flight(self) -> list[int]:
        """The plans started and not yet done. Not a checkpoint."""
        return [i for i in range(self.started) if self.results[i] is None]


async def run_plans(
    endpoint: Endpoint,
    load: Load,
    concurrency: int,
    *,
    on_start: Callable[[Load], None] | None = None,
    on_done: Callable[[Load], None] | None = None,
    request_limit: float = 30.0,
) -> list[Result]:
    """Run every plan of ``load``, ``concurrency`` at a time; the results in plan order.

    A checkpoint. ``on_start`` and ``on_done`` (not checkpoints) run as each
    request starts and ends. A request that takes more than
    ``request_limit`` seconds is abandoned (``ended == "timeout"``).
    """
    todo = iter(range(len(load.plans)))

    async def worker() -> None:
        for index in todo:
            plan = load.plans[index]
            load.started += 1
            if on_start is not None:
                on_start(load)
            answer = Answer()
            started = time.monotonic()
            with trio.move_on_after(request_limit) as waited:
                await fetch(target_of(plan, endpoint), answer, plan.leave_after)
            if waited.cancelled_caught:
                answer.ended = "timeout"
            verdict = classify(plan.kind, answer)
            seen = leaked(answer.received)
            bad = flaws(plan, verdict, seen)
            load.results[index] = Result(
                plan,
                verdict,
                answer.status,
                answer.request_id,
                seen,
                answer.ended,
                started,
                time.monotonic(),
                evidence(answer.received) if bad else None,
            )
            load.done += 1
            if on_done is not None:
                on_done(load)

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, len(load.plans))):
            nursery.start_soon(worker)
    return [r for r in load.results if r is not None]


async def mock_stats(port: int) -> dict[str, int]:
    """The mock's own counts (``GET /mock/stats``). A checkpoint."""
    with trio.socket.socket() as sock:
        await sock.connect(("127.0.0.1", port))
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/mock/stats", headers=[("host", "mock")])
        data = (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
        await sock.send(data)
        body = b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await sock.recv(_READ_SIZE))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    stats = orjson.loads(body)
    assert isinstance(stats, dict)
    return {str(k): int(v) for k, v in stats.items()}


async def settled_stats(port: int, key: str) -> dict[str, int]:
    """The mock's counts once ``key`` is 0, or after :data:`_SETTLE` seconds. A checkpoint."""
    deadline = trio.current_time() + _SETTLE
    while True:
        stats = await mock_stats(port)
        if stats[key] == 0 or trio.current_time() > deadline:
            return stats
        await trio.sleep(0.1)


def read_records(database: Path) -> dict[str, tuple[Any, ...]]:
    """The usage records by request id: ``(status, error_type, cancelled)``, spilled ones too.

    Not a checkpoint (run it after the gateway has exited). A record both
    spilled and written is one record.
    """
    records: dict[str, tuple[Any, ...]] = {}
    if database.exists():
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            query = "SELECT request_id, status, error_type, cancelled FROM requests"
            for request_id, *rest in db.execute(query):
                records[request_id] = tuple(rest)
    spill = Path(f"{database}.spill.jsonl")
    if spill.exists():
        for line in spill.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                row = orjson.loads(line)
                records.setdefault(
                    row["request_id"], (row.get("status"), row.get("error_type"), None)
                )
    return records


def records_figures(results: Sequence[Result], records: Mapping[str, tuple[Any, ...]]) -> Metrics:
    """How the usage records match the requests whose answers the client could name."""
    known = {r.request_id: r for r in results if r.request_id is not None}
    missing = [rid for rid in known if rid not in records]
    stayed_harmful = [
        rid
        for rid, r in known.items()
        if r.plan.harmful and r.verdict.outcome is not Outcome.LEFT and rid in records
    ]
    return {
        "records": len(records),
        "records_named": len(known),
        "records_missing": len(missing),
        # Rows the client cannot name: requests it left before the head.
        "records_unnamed": len(set(records) - set(known)),
        "left_before_head": sum(
            1 for r in results if r.verdict.outcome is Outcome.LEFT and r.request_id is None
        ),
        "records_clean_for_harmful": sum(1 for rid in stayed_harmful if records[rid][1] is None),
    }


async def stop_gateway(server: Server) -> tuple[float | None, float]:
    """SIGTERM, then wait for the exit; return its status (None: still running) and the wait."""
    started = trio.current_time()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(_EXIT_LIMIT):
        await server.process.wait()
    return server.process.returncode, trio.current_time() - started


def tracebacks(log: Path, offset: int) -> int:
    """How many tracebacks the server wrote to ``log`` after byte ``offset``."""
    with log.open("rb") as file:
        file.seek(offset)
        return file.read().count(b"Traceback (most recent call last)")


@dataclass(frozen=True)
class Chaos(Base):
    """A mixed load with upstream faults and departing clients: what reached the clients."""

    name: ClassVar[str] = "chaos"
    kinds: ClassVar[tuple[StreamKind, ...]] = KINDS
    needs_server: ClassVar[bool] = True
    warm_up: ClassVar[bool] = False  # a warm-up would leave records no request can name
    only: ClassVar[frozenset[str] | None] = frozenset({"gateway"})
    max_runs: ClassVar[int | None] = 1
    headline: ClassVar[tuple[str, ...]] = (
        "requests",
        "passed_as_complete",
        "cut",
        "error",
        "complete",
        "left",
        "gateway_500s",
        "upstream_busy_end",
        "upstream_open_after_exit",
        "model_leaks",
        "garbage_forwarded",
        "records",
        "records_missing",
    )
    seed: int = 0
    requests: int = 3000
    concurrency: int = 32
    tokens: tuple[int, int] = (3, 40)
    pace: float = 0.0
    idle: float = 2.0
    """The gateway's idle timeout: how long a stall lasts before the gateway gives up."""
    first_byte: float = 3.0
    shutdown: float = 2.0
    time_limit: float = 900.0

    def mock_argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "trio_gateway.testing.mock_upstream", "--port", str(port)]
        return [*argv, "--script-from-request"]

    def gateway_timeouts(self) -> Mapping[str, float]:
        return {"idle": self.idle, "first_byte": self.first_byte, "shutdown": self.shutdown}

    def plans(self) -> list[Plan]:
        return make_plans(
            self.seed, self.requests, model=UPSTREAM_MODEL, tokens=self.tokens, pace=self.pace
        )

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        server = endpoint.server
        assert server is not None
        assert endpoint.database is not None
        log_offset = server.log.stat().st_size
        load = Load(self.plans())
        started = time.monotonic()
        signals = _Signals(self, server, load)
        async with trio.open_nursery() as nursery:
            if isinstance(self, ChaosSigterm):
                nursery.start_soon(signals.send)
            results = await run_plans(endpoint, load, self.concurrency, on_start=signals.check)
        wall = time.monotonic() - started
        busy = await settled_stats(context.mock.port, "busy")
        exit_status, exit_wait = await stop_gateway(server)
        after_exit = await settled_stats(context.mock.port, "open")
        records = read_records(endpoint.database)
        figures: Metrics = summarize_results(results)
        figures |= records_figures(results, records)
        figures |= {
            "seed": self.seed,
            "wall_s": wall,
            "requests_per_s": len(results) / wall,
            "upstream_busy_end": busy["busy"],
            "upstream_idle_end": busy["open"] - busy["busy"],
            "upstream_open_after_exit": after_exit["open"],
            "gateway_exit_status": exit_status,
            "gateway_exit_s": exit_wait if signals.first_at is None else signals.exit_after(),
            "gateway_tracebacks": tracebacks(server.log, log_offset),
        }
        figures |= signals.figures(results)
        context.details.update(
            {
                "seed": self.seed,
                "breakdown": breakdown(results),
                "error_codes": error_codes(results),
                "examples": examples(results),
                "figures": figures,
            }
        )
        return figures

    def describe(self, details: Mapping[str, Any]) -> list[str]:
        out = breakdown_lines(self.name, details)
        figures = details["figures"]
        out += [
            "Usage records: {records} rows; {records_named} answers carried a request id, "
            "{records_missing} of them have no row; {records_unnamed} rows belong to requests "
            "whose client left before the head ({left_before_head} left then); "
            "{records_clean_for_harmful} rows record a clean end for a harmful fault.".format(
                **{k: _count(v) for k, v in figures.items()}
            ),
            "",
        ]
        if figures.get("inflight_at_sigterm") is not None:
            out += [
                "Two SIGTERMs, {second_after_s} s apart, once {sigterm_after} requests had "
                "started: {inflight_at_sigterm} in flight at the first; of those that stayed, "
                "{inflight_complete} complete, {inflight_error} ended with an error, "
                "{inflight_cut} cut. The gateway exited {gateway_exit_s} s after the first "
                "signal, status {gateway_exit_status}.".format(
                    **{k: _count(v) for k, v in figures.items()}
                ),
                "",
            ]
        return out


def breakdown_lines(name: str, details: Mapping[str, Any]) -> list[str]:
    """The breakdown table, the error codes, and which bad answers the JSON shows."""
    rows: Mapping[str, Mapping[str, int]] = details["breakdown"]
    out = [
        f"#### {name}: by fault and by kind (seed {details['seed']})",
        "",
        "| | " + " | ".join(BREAKDOWN_COLUMNS) + " |",
        "|---|" + "---|" * len(BREAKDOWN_COLUMNS),
    ]
    out += [
        f"| {key} | " + " | ".join(str(row[c]) for c in BREAKDOWN_COLUMNS) + " |"
        for key, row in rows.items()
    ]
    codes = ", ".join(f"{code} {n}" for code, n in details["error_codes"].items())
    shown = ", ".join(f"{flaw} {len(items)}" for flaw, items in details["examples"].items())
    out += ["", f"Error codes clients saw: {codes or 'none'}.", ""]
    if shown:
        out += [f"Bad answers shown in the JSON (`details` → `examples`): {shown}.", ""]
    return out


def _count(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class ChaosSigterm(Chaos):
    """Chaos with long streams, and two SIGTERMs halfway: no answer cut, no record lost."""

    name: ClassVar[str] = "chaos-sigterm"
    headline: ClassVar[tuple[str, ...]] = (
        "requests",
        "inflight_at_sigterm",
        "inflight_cut",
        "inflight_error",
        "inflight_complete",
        "refused",
        "records",
        "records_named",
        "records_missing",
        "gateway_exit_status",
        "gateway_exit_s",
        "passed_as_complete",
        "model_leaks",
    )
    requests: int = 600
    tokens: tuple[int, int] = (20, 60)
    pace: float = 0.02
    """Seconds between the mock's writes: a stream lasts about a second."""
    shutdown: float = 30.0
    """The drain's grace: longer than the run, so only the second signal ends the drain."""
    sigterm_after: float = 0.5
    """The share of requests started before the first SIGTERM."""
    second_after: float = 0.5
    """Seconds between the two signals."""
    time_limit: float = 300.0


class _Signals:
    """The two SIGTERMs of chaos-sigterm, and which requests were in flight at the first."""

    def __init__(self, scenario: Chaos, server: Server, load: Load) -> None:
        self.scenario = scenario
        self.server = server
        self.load = load
        self.threshold = (
            max(1, int(scenario.sigterm_after * len(load.plans)))
            if isinstance(scenario, ChaosSigterm)
            else None
        )
        self.due = trio.Event()
        self.first_at: float | None = None
        self.exited_at: float | None = None
        self.in_flight: list[int] = []

    def check(self, load: Load) -> None:
        if self.threshold is not None and load.started >= self.threshold:
            self.due.set()

    async def send(self) -> None:
        """Send both signals once due, then wait (bounded) for the exit. A checkpoint."""
        assert isinstance(self.scenario, ChaosSigterm)
        await self.due.wait()
        self.in_flight = self.load.in_flight()
        self.first_at = trio.current_time()
        self.server.process.send_signal(signal.SIGTERM)
        await trio.sleep(self.scenario.second_after)
        if self.server.process.poll() is None:
            self.server.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(_EXIT_LIMIT):
            await self.server.process.wait()
            self.exited_at = trio.current_time()

    def exit_after(self) -> float | None:
        """Seconds from the first signal to the exit (None: it did not exit in time)."""
        if self.first_at is None or self.exited_at is None:
            return None
        return self.exited_at - self.first_at

    def figures(self, results: Sequence[Result]) -> Metrics:
        if not isinstance(self.scenario, ChaosSigterm):
            return {}
        by_index = {r.plan.index: r for r in results}
        stayed = [
            by_index[i].verdict.outcome
            for i in self.in_flight
            if by_index[i].verdict.outcome is not Outcome.LEFT
        ]
        return {
            "sigterm_after": self.threshold,
            "second_after_s": self.scenario.second_after,
            "inflight_at_sigterm": len(self.in_flight),
            "inflight_complete": stayed.count(Outcome.COMPLETE),
            "inflight_error": stayed.count(Outcome.ERROR),
            "inflight_cut": stayed.count(Outcome.CUT),
        }
