"""The ``workers`` scenario: one gateway process against ``serve --workers 2``, side by side.

What it measures
================

Burst (streams as fast as the mock sends them) and trickle (many streams at
an LLM's pace), each against a gateway with 1 worker and one with 2 workers,
in alternating order (the order flips with every measurement, so neither is
always first while the machine's load drifts). Each gateway is a fresh
``trio-gateway serve`` with the benchmark's config plus ``[server] workers``,
waited on until it prints ``listening on`` (with several workers the port
accepts before the workers are ready), warmed up with two streams, measured,
and stopped with SIGTERM.

The headline is ``burst_speedup``: streams per second with 2 workers over
streams per second with 1. The gateway's CPU is the sum over the parent and
its workers (``/proc``), read before and after the measurement; the load
generator (this process) and the mock share the same cores, which is why the
speedup on a 2-core machine stays below 2.

It fits :class:`bench._scenarios.Scenario`: it runs against the ``direct``
contender only, and starts its gateways itself (the trickle's mock too, as
the runner starts one mock per scenario, with the burst's script).

Run it alone: ``python -m bench._workers [--runs N] [--quick]`` prints each
measurement and the medians.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio

from bench._contenders import (
    _UPSTREAM_KEY_ENV,
    PUBLIC_MODEL,
    Endpoint,
    bench_env,
    gateway_config,
)
from bench._load import StreamLog, run_stream
from bench._procs import free_port, read_usage, running
from bench._scenarios import (
    Context,
    Metrics,
    expected_events,
    mock_argv,
    percentile,
    run_many,
    target,
)
from trio_gateway.testing.mock_upstream import StreamKind

__all__ = ["Workers", "main"]

_READY_LIMIT = 30.0
# Each measurement flips the order of the worker counts, and each pattern again.
_MEASUREMENTS = itertools.count()


@dataclass(frozen=True)
class Workers:
    """Burst and trickle through 1 and 2 workers; figures prefixed ``w1_`` and ``w2_``."""

    name: ClassVar[str] = "workers"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = False  # its own gateways are warmed up here
    only: ClassVar[frozenset[str] | None] = frozenset({"direct"})
    max_runs: ClassVar[int | None] = None
    headline: ClassVar[tuple[str, ...]] = (
        "burst_speedup",
        "w1_burst_streams_per_s",
        "w2_burst_streams_per_s",
        "trickle_speedup",
        "w1_trickle_gap_p99_ms",
        "w2_trickle_gap_p99_ms",
        "errors",
    )
    counts: tuple[int, ...] = (1, 2)
    burst_streams: int = 400
    burst_concurrency: int = 40
    burst_tokens: int = 300
    trickle_streams: int = 400
    trickle_tokens: int = 100
    trickle_pace: float = 0.02
    time_limit: float = 600.0

    def gateway_timeouts(self) -> Mapping[str, float]:
        return {}

    def describe(self, details: Mapping[str, Any]) -> list[str]:
        return []

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=self.burst_tokens)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        """Both patterns, both worker counts, in alternating order. A checkpoint."""
        workdir = Path(tempfile.mkdtemp(prefix="trio-gateway-bench-workers-"))
        turn = next(_MEASUREMENTS)
        metrics: Metrics = {"errors": 0}
        trickle_port = free_port()
        trickle_argv = mock_argv(trickle_port, tokens=self.trickle_tokens, pace=self.trickle_pace)
        async with running(
            "mock-trickle", trickle_argv, trickle_port, workdir, env=bench_env()
        ) as trickle_mock:
            patterns = (
                ("burst", endpoint.port, context.mock.process.pid),
                ("trickle", trickle_port, trickle_mock.process.pid),
            )
            for index, (pattern, mock_port, mock_pid) in enumerate(patterns):
                order = list(self.counts)
                if (turn + index) % 2:
                    order.reverse()
                for workers in order:
                    async with gateway(workers, mock_port, workdir) as (port, pids):
                        figures = await self._measure(pattern, port, pids, mock_pid)
                    context.say(f"workers: {pattern} with {workers}: {_short(figures)}")
                    metrics["errors"] = (metrics["errors"] or 0) + (figures.pop("errors") or 0)
                    metrics |= {f"w{workers}_{pattern}_{k}": v for k, v in figures.items()}
                one, two = (metrics.get(f"w{n}_{pattern}_streams_per_s") for n in (1, 2))
                metrics[f"{pattern}_speedup"] = two / one if one and two else None
        shutil.rmtree(workdir, ignore_errors=True)  # kept when it raised, for its logs
        return metrics

    async def _measure(self, pattern: str, port: int, pids: list[int], mock_pid: int) -> Metrics:
        """One measurement of ``pattern`` against the gateway on ``port``. A checkpoint."""
        at = target(Endpoint(port, PUBLIC_MODEL, None), "chat")
        for _ in range(2):
            await run_stream(at, StreamLog(), stop_after_events=0)
        if pattern == "burst":
            streams, concurrency, tokens = (
                self.burst_streams,
                self.burst_concurrency,
                self.burst_tokens,
            )
        else:
            streams, concurrency, tokens = (
                self.trickle_streams,
                self.trickle_streams,
                self.trickle_tokens,
            )
        watched = [*pids, mock_pid, os.getpid()]
        before = [_cpu([pid]) for pid in watched]
        started = time.monotonic()
        logs = await run_many(at, streams, concurrency)
        wall = time.monotonic() - started
        used = [_cpu([pid]) - b for pid, b in zip(watched, before, strict=True)]
        *server, mock_cpu, client_cpu = used
        cpu = sum(server)
        workers = server[1:] or server  # the parent's own share is nearly nothing
        events = sum(len(log.events) for log in logs)
        gaps = [b - a for log in logs for a, b in zip(log.events, log.events[1:], strict=False)]
        p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
        return {
            "streams_per_s": streams / wall,
            "wall_s": wall,
            "events": events,
            "events_expected": streams * expected_events("chat", tokens),
            "server_cpu_s": cpu,
            "cpu_us_per_event": cpu / events * 1e6 if events else None,
            "gap_p50_ms": None if p50 is None else p50 * 1000,
            "gap_p99_ms": None if p99 is None else p99 * 1000,
            "errors": sum(1 for log in logs if log.error is not None or not log.complete),
            # The least busy worker's CPU over the busiest's: 1 is an even spread.
            "worker_balance": min(workers) / max(workers) if max(workers) > 0 else None,
            # Cores used by the gateway, the mock and the load generator together.
            "machine_cores": (cpu + mock_cpu + client_cpu) / wall,
            "mock_cpu_share": mock_cpu / wall,
            "client_cpu_share": client_cpu / wall,
        }


@asynccontextmanager
async def gateway(
    workers: int, mock_port: int, workdir: Path
) -> AsyncIterator[tuple[int, list[int]]]:
    """A ``trio-gateway serve`` with ``workers`` workers; its port and pids (parent first).

    A checkpoint. Yields once it has printed ``listening on``; stops it on exit.
    """
    port = free_port()
    config = workdir / f"gateway-{port}.toml"
    text = gateway_config(mock_port, port, workdir)
    config.write_text(text.replace("[server]\n", f"[server]\nworkers = {workers}\n", 1))
    argv = [sys.executable, "-m", "trio_gateway", "serve", "--config", str(config)]
    env = bench_env() | {_UPSTREAM_KEY_ENV: "bench-upstream-key"}
    # The log is appended to, so its name must be new for every gateway: a
    # "listening on" from an earlier one would be taken for this one's.
    name = f"gateway-{workers}w-{port}"
    async with running(name, argv, port, workdir, env=env) as server:
        with trio.fail_after(_READY_LIMIT):
            await _listening(trio.Path(server.log))
        parent = server.process.pid
        children = _children(parent) if workers > 1 else []
        if len(children) != (workers if workers > 1 else 0):
            raise RuntimeError(f"{name}: expected {workers} workers, found pids {children}")
        yield port, [parent, *children]


async def _listening(log: trio.Path) -> None:
    """Return once the parent has logged that every worker is ready. A checkpoint."""
    while b"trio-gateway listening on" not in await log.read_bytes():  # noqa: ASYNC110
        await trio.sleep(0.05)  # a log file: nothing to wait on but time


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return sorted(found)


def _cpu(pids: list[int]) -> float:
    return sum(read_usage(pid).cpu_s for pid in pids)


def _short(figures: Metrics) -> str:
    keys = ("streams_per_s", "cpu_us_per_event", "gap_p99_ms", "errors")
    return " ".join(
        f"{k}={figures[k]:.3g}" if figures.get(k) is not None else f"{k}=-" for k in keys
    )


# -- standalone ------------------------------------------------------------------------


async def _run(scenario: Workers, runs: int) -> list[Metrics]:
    workdir = Path(tempfile.mkdtemp(prefix="trio-gateway-bench-workers-"))
    port = free_port()
    results = []
    async with running(
        "mock-burst", scenario.mock_argv(port), port, workdir, env=bench_env()
    ) as mock:
        context = Context(mock, say=lambda line: print(line, file=sys.stderr, flush=True))
        for run in range(runs):
            figures = await scenario.measure(Endpoint(port, "", None), context)
            print(f"run {run + 1}/{runs}: {figures}", file=sys.stderr, flush=True)
            results.append(figures)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m bench._workers``: run the scenario alone; print every run and the medians."""
    parser = argparse.ArgumentParser(prog="python -m bench._workers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scenario = Workers(burst_streams=40, trickle_streams=40) if args.quick else Workers()
    results = trio.run(_run, scenario, args.runs)
    print(f"workers scenario, {args.runs} runs, {os.cpu_count()} cores: {asdict(scenario)}")
    for key in sorted(results[0]):
        values = [v for r in results if (v := r.get(key)) is not None]
        if values:
            runs = " ".join(f"{v:.3g}" for v in values)
            print(f"  {key:32} median {statistics.median(values):10.3g}   runs: {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
