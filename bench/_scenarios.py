"""The scenarios: what each sends, to which mock, and which figures it takes.

The seven performance scenarios live here; ``chaos``, ``chaos-sigterm``
(:mod:`bench._chaos`) and ``soak`` (:mod:`bench._soak`) check correctness
under faults and memory over time, on the gateway only, and run only when
named.

Every scenario has a full scale (the issue's, where it can run literally:
docs/benchmarks.md says where not) and a ``--quick`` one that shrinks it
for a smoke test. :meth:`Scenario.measure` runs one contender
once, against a mock that is already serving, and returns flat figures:
numbers, or None where a figure does not apply (no server process for
``direct``). Times are in milliseconds (``_ms``) or seconds (``_s``), memory
in MiB (``_mib``) or KiB (``_kib``); CPU is the server's own, from /proc.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import orjson
import trio

from bench._contenders import UPSTREAM_MODEL, Endpoint
from bench._load import StreamLog, Target, count_events, run_stream
from bench._procs import Server, read_usage
from trio_gateway.testing.mock_upstream import Script, StreamKind, iter_stream

__all__ = ["DEFAULT_SCENARIOS", "SCENARIOS", "Context", "Metrics", "Scenario", "scenarios"]

Metrics = dict[str, float | None]
KINDS: tuple[StreamKind, ...] = ("chat", "messages", "responses")
_PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
_MIB = 1024 * 1024
_OPENING = 32  # connections being opened at once: hypercorn's accept backlog is 100


class CloseReports:
    """The close times reported by :mod:`bench._mock_closes` on its standard output."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._arrived = trio.Event()

    async def collect(self, stdout: trio.abc.ReceiveStream) -> None:
        """Read report lines until the stream ends. A checkpoint."""
        pending = b""
        async for data in stdout:
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            self.times += [float(line.split()[1]) for line in lines if line.startswith(b"closed ")]
            self._arrived.set()
            self._arrived = trio.Event()

    async def first_after(self, moment: float) -> float:
        """The first close at or after ``moment``, once reported. A checkpoint."""
        while True:
            # Half a millisecond of slack for the mock's clock conversion.
            later = [t for t in self.times if t >= moment - 0.0005]
            if later:
                return min(later)
            await self._arrived.wait()


@dataclass(frozen=True, slots=True)
class Context:
    """What a measurement may look at besides its endpoint."""

    mock: Server
    closes: CloseReports | None = None
    details: dict[str, object] = field(default_factory=dict)
    """What a measurement has to say beyond flat figures (emptied before each)."""
    say: Callable[[str], None] = print
    """Where a long measurement reports its progress (a line at a time)."""


class Scenario(Protocol):
    """One scenario at one scale."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[StreamKind, ...]]
    needs_server: ClassVar[bool]
    """True when it measures the server in the middle, so ``direct`` has nothing to show."""
    headline: ClassVar[tuple[str, ...]]
    """The figures for the progress line and the published table."""
    warm_up: ClassVar[bool]
    """Whether each contender gets warm-up streams first (not when a stream is endless)."""
    only: ClassVar[frozenset[str] | None]
    """The only contenders it measures (None: every eligible one)."""
    max_runs: ClassVar[int | None]
    """At most this many runs, whatever ``--runs`` says (None: no cap)."""

    @property
    def time_limit(self) -> float:
        """Seconds one measurement may take before it is abandoned."""

    def gateway_timeouts(self) -> Mapping[str, float]:
        """``[timeouts]`` settings for the gateway in this scenario."""

    def describe(self, details: Mapping[str, Any]) -> list[str]:
        """Markdown lines for one contender's ``details`` (after the figures' table)."""

    def mock_argv(self, port: int) -> list[str]:
        """The mock upstream's command line."""

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        """Run once against ``endpoint``. A checkpoint."""


class Base:
    """The defaults of :class:`Scenario`'s optional parts."""

    only: ClassVar[frozenset[str] | None] = None
    max_runs: ClassVar[int | None] = None

    def gateway_timeouts(self) -> Mapping[str, float]:
        return {}

    def describe(self, details: Mapping[str, Any]) -> list[str]:
        return []


def mock_argv(port: int, *, tokens: int, pace: float = 0.0) -> list[str]:
    """The mock provider's command line: ``tokens`` deltas, ``pace`` s apart."""
    argv = [sys.executable, "-m", "trio_gateway.testing.mock_upstream", "--port", str(port)]
    return [*argv, "--tokens", str(tokens), "--pace", str(pace)]


def target(endpoint: Endpoint, kind: StreamKind) -> Target:
    """A streamed request of ``kind`` for ``endpoint``'s model, with the client key."""
    body: dict[str, object] = {"model": endpoint.model, "stream": True}
    messages = [{"role": "user", "content": "hi"}]
    if kind == "responses":
        body["input"] = "hi"
    else:
        body["messages"] = messages
    headers = [("authorization", f"Bearer {endpoint.key}")]
    if kind == "messages":
        body["max_tokens"] = 1024
        headers.append(("anthropic-version", "2023-06-01"))
    return Target(endpoint.port, _PATHS[kind], orjson.dumps(body), tuple(headers))


def expected_events(kind: StreamKind, tokens: int) -> int:
    """How many events the mock sends in one stream of ``kind`` with ``tokens`` deltas."""
    return count_events(b"".join(iter_stream(kind, Script(tokens=tokens), "m")))


async def run_many(target: Target, count: int, concurrency: int) -> list[StreamLog]:
    """Run ``count`` streams, at most ``concurrency`` at a time. A checkpoint."""
    logs = [StreamLog() for _ in range(count)]
    todo = iter(logs)
    opening = trio.Semaphore(_OPENING)

    async def worker() -> None:
        for log in todo:
            await run_stream(target, log, opening=opening)

    async with trio.open_nursery() as nursery:
        for _ in range(min(count, concurrency)):
            nursery.start_soon(worker)
    return logs


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _per(amount: float | None, count: int, scale: float) -> float | None:
    return None if amount is None or count == 0 else amount / count * scale


class Meter:
    """CPU seconds of the server, the mock and this process, and wall time, over one stretch."""

    def __init__(self, server: Server | None, mock: Server) -> None:
        self.server = server
        self.mock = mock
        self._server_cpu = server.usage().cpu_s if server else 0.0
        self._mock_cpu = mock.usage().cpu_s
        self._client_cpu = read_usage(os.getpid()).cpu_s
        self._started = time.monotonic()

    def stop(self, events: int, prefix: str = "") -> Metrics:
        """The figures of the stretch, CPU per event included. Not a checkpoint."""
        wall = time.monotonic() - self._started
        mock_cpu = self.mock.usage().cpu_s - self._mock_cpu
        client_cpu = read_usage(os.getpid()).cpu_s - self._client_cpu
        server_cpu = peak = None
        if self.server is not None:
            usage = self.server.usage()
            server_cpu, peak = usage.cpu_s - self._server_cpu, usage.peak_rss / _MIB
        return {
            f"{prefix}events": events,
            f"{prefix}wall_s": wall,
            f"{prefix}server_cpu_s": server_cpu,
            f"{prefix}cpu_us_per_event": _per(server_cpu, events, 1e6),
            f"{prefix}mock_cpu_s": mock_cpu,
            f"{prefix}mock_cpu_us_per_event": _per(mock_cpu, events, 1e6),
            f"{prefix}mock_cpu_share": mock_cpu / wall,
            # The load generator's share: near 1, the client is what limits the rate.
            f"{prefix}client_cpu_share": client_cpu / wall,
            f"{prefix}peak_rss_mib": peak,
        }


def _errors(logs: Sequence[StreamLog]) -> int:
    return sum(1 for log in logs if log.error is not None or not log.complete)


@dataclass(frozen=True)
class Trickle(Base):
    """Many concurrent streams at an LLM's pace: CPU per event and the delay added to events."""

    name: ClassVar[str] = "trickle"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = (
        "cpu_us_per_event",
        "gap_p50_ms",
        "gap_p99_ms",
        "peak_rss_mib",
        "mock_cpu_share",
        "client_cpu_share",
        "events",
        "errors",
    )
    streams: int = 200
    tokens: int = 100
    pace: float = 0.02
    time_limit: float = 90.0

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=self.tokens, pace=self.pace)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        meter = Meter(endpoint.server, context.mock)
        logs = await run_many(target(endpoint, "chat"), self.streams, self.streams)
        events = sum(len(log.events) for log in logs)
        gaps = [b - a for log in logs for a, b in zip(log.events, log.events[1:], strict=False)]
        return meter.stop(events) | {
            "streams": self.streams,
            "events_expected": self.streams * expected_events("chat", self.tokens),
            "errors": _errors(logs),
            "gap_p50_ms": _ms(percentile(gaps, 50)),
            "gap_p99_ms": _ms(percentile(gaps, 99)),
        }


@dataclass(frozen=True)
class Trickle50(Trickle):
    """The same at 50 streams: a busy gateway never batches them, so this is the honest
    per-event cost (at 200 streams, a pass of the scheduler gathers several events)."""

    name: ClassVar[str] = "trickle-50"
    streams: int = 50


@dataclass(frozen=True)
class Burst(Base):
    """Streams as fast as the mock can send them: streams per second and CPU per event."""

    name: ClassVar[str] = "burst"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = (
        "streams_per_s",
        "cpu_us_per_event",
        "peak_rss_mib",
        "mock_cpu_share",
        "client_cpu_share",
        "events",
        "errors",
    )
    streams: int = 50
    concurrency: int = 20
    tokens: int = 300
    time_limit: float = 120.0

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=self.tokens)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        meter = Meter(endpoint.server, context.mock)
        logs = await run_many(target(endpoint, "chat"), self.streams, self.concurrency)
        metrics = meter.stop(sum(len(log.events) for log in logs))
        wall = metrics["wall_s"]
        assert wall is not None
        return metrics | {
            "streams": self.streams,
            "events_expected": self.streams * expected_events("chat", self.tokens),
            "errors": _errors(logs),
            "streams_per_s": self.streams / wall,
        }


@dataclass(frozen=True)
class Short(Burst):
    """Short streams (an 11-event answer) at 20 at a time: the cost of a request itself."""

    name: ClassVar[str] = "short"
    headline: ClassVar[tuple[str, ...]] = (
        "cpu_us_per_request",
        "streams_per_s",
        "cpu_us_per_event",
        "mock_cpu_share",
        "client_cpu_share",
        "events",
        "errors",
    )
    streams: int = 1500
    tokens: int = 7  # with the role chunk, the finish, the usage and [DONE]: 11 events

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        metrics = await super().measure(endpoint, context)
        return metrics | {"cpu_us_per_request": _per(metrics["server_cpu_s"], self.streams, 1e6)}


@dataclass(frozen=True)
class Ttfb(Base):
    """Time to the first response byte of short streams at several concurrencies."""

    name: ClassVar[str] = "ttfb"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = (
        "c1_ttfb_p50_ms",
        "c1_ttfb_p99_ms",
        "c16_ttfb_p50_ms",
        "c16_ttfb_p99_ms",
        "c64_ttfb_p50_ms",
        "c64_ttfb_p99_ms",
        "errors",
    )
    requests: tuple[tuple[int, int], ...] = ((1, 100), (16, 160), (64, 320))
    """(concurrency, requests) pairs."""
    tokens: int = 5
    time_limit: float = 120.0

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=self.tokens)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        metrics: Metrics = {"errors": 0}
        for concurrency, count in self.requests:
            logs = await run_many(target(endpoint, "chat"), count, concurrency)
            ttfbs = [log.ttfb for log in logs if log.ttfb is not None and log.error is None]
            metrics[f"c{concurrency}_ttfb_p50_ms"] = _ms(percentile(ttfbs, 50))
            metrics[f"c{concurrency}_ttfb_p99_ms"] = _ms(percentile(ttfbs, 99))
            metrics["errors"] = (metrics["errors"] or 0) + _errors(logs)
        return metrics


@dataclass(frozen=True)
class IdleStreams(Base):
    """Many open streams waiting on a silent upstream: resident memory per open stream."""

    name: ClassVar[str] = "idle-streams"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = True
    warm_up: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = (
        "rss_per_stream_kib",
        "rss_before_mib",
        "rss_open_mib",
        "open_streams",
        "open_s",
        "errors",
    )
    streams: int = 1000
    settle: float = 1.0
    """Seconds between the last stream opening and the memory reading."""
    time_limit: float = 120.0

    def mock_argv(self, port: int) -> list[str]:
        # The first write (the comment and the first chunk) goes out at once, the next
        # one an hour later. A whole event first: some proxies send no head before one.
        first = list(iter_stream("chat", Script(tokens=10), UPSTREAM_MODEL))[:2]
        argv = mock_argv(port, tokens=10, pace=3600)
        return [*argv, "--chunk-size", str(sum(map(len, first)))]

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        server = endpoint.server
        assert server is not None
        before = server.usage()
        logs = [StreamLog() for _ in range(self.streams)]
        opening = trio.Semaphore(_OPENING)
        request = target(endpoint, "chat")
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for log in logs:
                nursery.start_soon(functools.partial(run_stream, request, log, opening=opening))
            # One poll over every stream, 20 times a second, costs less than a hook in each.
            while any(log.status == 0 and log.error is None for log in logs):  # noqa: ASYNC110
                await trio.sleep(0.05)
            opened = time.monotonic() - started
            await trio.sleep(self.settle)
            during = server.usage()
            nursery.cancel_scope.cancel()
        open_streams = sum(1 for log in logs if log.status == 200 and log.error is None)
        return {
            "streams": self.streams,
            "open_streams": open_streams,
            "errors": self.streams - open_streams,
            "open_s": opened,
            "rss_before_mib": before.rss / _MIB,
            "rss_open_mib": during.rss / _MIB,
            "rss_per_stream_kib": _per(during.rss - before.rss, open_streams, 1 / 1024),
            "server_cpu_s": during.cpu_s - before.cpu_s,
        }


@dataclass(frozen=True)
class SlowClient(Base):
    """An upstream pushing as fast as it can to a client reading 1 MB/s: memory growth."""

    name: ClassVar[str] = "slow-client"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = True
    warm_up: ClassVar[bool] = False
    headline: ClassVar[tuple[str, ...]] = (
        "rss_growth_mib",
        "rss_late_growth_mib",
        "rss_settled_mib",
        "client_mib_per_s",
        "server_cpu_s",
        "errors",
    )
    duration: float = 8.0
    read_rate: float = 1_000_000
    tokens: int = 10_000_000
    """About 2 GB of chat deltas: more than the client can read in ``duration``."""
    settle_samples: int = 4
    """Memory samples (0.25 s apart) before the one growth is counted from."""
    time_limit: float = 60.0

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=self.tokens)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        server = endpoint.server
        assert server is not None
        before = server.usage()
        log = StreamLog()
        samples: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_stream(target(endpoint, "chat"), log, read_rate=self.read_rate)
            )
            with trio.move_on_after(self.duration):
                while True:
                    await trio.sleep(0.25)
                    samples.append(server.usage().rss)
            after = server.usage()
            nursery.cancel_scope.cancel()
        received = log.body_bytes / _MIB
        # No warm-up here (an endless warm-up stream is no warm-up): growth counts
        # from the first second of the stream, when the first request's costs are paid.
        settled = samples[self.settle_samples - 1]
        late = samples[self.settle_samples :]
        return {
            "duration_s": self.duration,
            "received_mib": received,
            "client_mib_per_s": received / self.duration,
            "errors": 0 if log.error is None and log.status == 200 else 1,
            "rss_before_mib": before.rss / _MIB,
            "rss_settled_mib": settled / _MIB,
            "rss_peak_mib": max(samples) / _MIB,
            "rss_growth_mib": (max(late, default=settled) - settled) / _MIB,
            # The second half's growth: flat means no build-up with time.
            "rss_late_growth_mib": (samples[-1] - samples[len(samples) // 2]) / _MIB,
            "server_cpu_s": after.cpu_s - before.cpu_s,
        }


@dataclass(frozen=True)
class Cancel(Base):
    """Clients leaving mid-stream: time until the mock sees its upstream connection close."""

    name: ClassVar[str] = "cancel"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = (
        "close_p50_ms",
        "close_p99_ms",
        "close_max_ms",
        "missed",
        "errors",
    )
    samples: int = 25
    events_before_leaving: int = 3
    wait_for_close: float = 1.0
    """Seconds to wait for the mock's report before counting the close as missed."""
    time_limit: float = 120.0

    def mock_argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "bench._mock_closes", "--port", str(port)]
        return [*argv, "--tokens", "1000", "--pace", "0.02"]

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        closes = context.closes
        assert closes is not None
        request = target(endpoint, "chat")
        delays: list[float] = []
        errors = missed = 0
        for _ in range(self.samples):
            closes.times.clear()
            log = StreamLog()
            await run_stream(request, log, stop_after_events=self.events_before_leaving)
            if log.error is not None or log.closed_at is None:
                errors += 1
                continue
            with trio.move_on_after(self.wait_for_close) as waiting:
                seen = await closes.first_after(log.closed_at)
                delays.append(max(0.0, seen - log.closed_at))
            missed += waiting.cancelled_caught
        return {
            "samples": self.samples,
            "errors": errors,
            "missed": missed,
            "close_p50_ms": _ms(percentile(delays, 50)),
            "close_p99_ms": _ms(percentile(delays, 99)),
            "close_max_ms": _ms(max(delays, default=None)),
        }


@dataclass(frozen=True)
class Kinds(Base):
    """Burst streams of chat, messages and responses: the three rewriters side by side."""

    name: ClassVar[str] = "kinds"
    kinds: ClassVar[tuple[StreamKind, ...]] = KINDS
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = True
    headline: ClassVar[tuple[str, ...]] = (
        "chat_cpu_us_per_event",
        "messages_cpu_us_per_event",
        "responses_cpu_us_per_event",
        "chat_streams_per_s",
        "messages_streams_per_s",
        "responses_streams_per_s",
        "errors",
    )
    streams: int = 30
    concurrency: int = 10
    tokens: int = 300
    time_limit: float = 180.0

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=self.tokens)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        metrics: Metrics = {"errors": 0}
        for kind in self.kinds:
            meter = Meter(endpoint.server, context.mock)
            logs = await run_many(target(endpoint, kind), self.streams, self.concurrency)
            measured = meter.stop(sum(len(log.events) for log in logs), prefix=f"{kind}_")
            wall = measured[f"{kind}_wall_s"]
            assert wall is not None
            metrics |= {
                f"{kind}_events": measured[f"{kind}_events"],
                f"{kind}_events_expected": self.streams * expected_events(kind, self.tokens),
                f"{kind}_cpu_us_per_event": measured[f"{kind}_cpu_us_per_event"],
                f"{kind}_mock_cpu_us_per_event": measured[f"{kind}_mock_cpu_us_per_event"],
                f"{kind}_streams_per_s": self.streams / wall,
            }
            metrics["errors"] = (metrics["errors"] or 0) + _errors(logs)
        return metrics


DEFAULT_SCENARIOS = (
    "trickle",
    "trickle-50",
    "short",
    "burst",
    "ttfb",
    "idle-streams",
    "slow-client",
    "cancel",
    "kinds",
)
"""The scenarios run when none is named: the performance ones."""
SCENARIOS = (*DEFAULT_SCENARIOS, "chaos", "chaos-sigterm", "soak", "limits", "workers")


def scenarios(quick: bool, seed: int = 0, requests: int | None = None) -> dict[str, Scenario]:
    """Every scenario, by name, at full or ``--quick`` scale.

    ``seed`` draws the requests of chaos, chaos-sigterm and soak, and
    ``requests``, if given, is how many each of them sends.
    """
    # Imported here: those modules build on this one.
    from bench._chaos import Chaos, ChaosSigterm
    from bench._limits import Limits
    from bench._soak import Soak
    from bench._workers import Workers

    if not quick:
        full: list[Scenario] = [
            Trickle(),
            Trickle50(),
            Short(),
            Burst(),
            Ttfb(),
            IdleStreams(),
            SlowClient(),
            Cancel(),
            Kinds(),
            Chaos(seed=seed),
            ChaosSigterm(seed=seed),
            Soak(seed=seed),
            Limits(),
            Workers(),
        ]
        return {s.name: _sized(s, requests) for s in full}
    small: list[Scenario] = [
        Trickle(streams=20, tokens=20),
        Trickle50(streams=10, tokens=20),
        Short(streams=60, concurrency=10),
        Burst(streams=10, concurrency=5),
        Ttfb(requests=((1, 10), (16, 32), (64, 64))),
        IdleStreams(streams=50, settle=0.2),
        SlowClient(duration=2.0),
        Cancel(samples=5),
        Kinds(streams=5, concurrency=5, tokens=100),
        Chaos(seed=seed, requests=200),
        ChaosSigterm(seed=seed, requests=200),
        Soak(seed=seed, requests=1000, samples=10),
        Limits(admits=200),
        Workers(burst_streams=40, trickle_streams=40),
    ]
    return {s.name: _sized(s, requests) for s in small}


def _sized(scenario: Scenario, requests: int | None) -> Scenario:
    """``scenario`` sending ``requests`` requests, if it counts them and a number is given."""
    if requests is None or not hasattr(scenario, "requests"):
        return scenario
    return dataclasses.replace(scenario, requests=requests)  # type: ignore[type-var]
