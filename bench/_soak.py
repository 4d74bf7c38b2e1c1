"""The soak scenario: many mixed requests with faults; does the gateway's memory level off?

Theory of operation
===================

The load is chaos's (:mod:`bench._chaos`): the same plans, faults and
departing clients, drawn from the seed, only more of them and with fewer
stalls (each costs the idle timeout). ``samples`` times in the run (every
1,000 requests at full scale), as the finished requests pass a multiple of
``requests / samples``, the suite reads the gateway's resident memory (``VmRSS``) and its
open file descriptors (``/proc/<pid>/fd``) at once, and asks the mock for
its open and busy upstream connections. A last sample comes once the load
is over and the mock's busy count has settled.

**The verdict** is taken on the last third of the samples: the slope of a
least-squares line through them, in MiB per 1,000 requests. Below
``plateau_limit`` the memory has levelled off (``plateau`` = 1); above it
it is still growing (0). A slope, not the difference of two samples, so one
late sample does not decide it.

With ``$TRIO_GATEWAY_BENCH_TRACEMALLOC`` set, the gateway runs under
:mod:`bench._traced_gateway` and gets a SIGUSR1 at each sample, so a
tracemalloc snapshot lies next to each point of the series.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from bench._chaos import Chaos, Load, breakdown_lines, mock_stats, run_plans, settled_stats
from bench._contenders import TRACEMALLOC_ENV, UPSTREAM_MODEL, Endpoint
from bench._faults import (
    FAULTS,
    KINDS,
    breakdown,
    error_codes,
    examples,
    make_plans,
    summarize_results,
)
from bench._procs import Server
from bench._scenarios import Base, Context, Metrics
from trio_gateway.testing.mock_upstream import StreamKind

__all__ = ["Soak", "late_slope"]

_MIB = 1024 * 1024
# Chaos's mix with fewer stalls: each one holds a connection for the idle timeout.
_SOAK_FAULTS = tuple((label, 2 if label == "stall" else weight) for label, weight in FAULTS)


def late_slope(samples: Sequence[Mapping[str, float]], key: str = "rss_mib") -> float | None:
    """The least-squares slope of ``key`` per 1,000 requests over the last third of ``samples``."""
    late = samples[len(samples) - max(2, len(samples) // 3) :]
    if len(late) < 2:
        return None
    xs = [s["requests"] / 1000 for s in late]
    ys = [s[key] for s in late]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass(frozen=True)
class Soak(Base):
    """Many mixed requests with faults: the gateway's memory, descriptors and upstream sockets."""

    name: ClassVar[str] = "soak"
    kinds: ClassVar[tuple[StreamKind, ...]] = KINDS
    needs_server: ClassVar[bool] = True
    warm_up: ClassVar[bool] = True
    only: ClassVar[frozenset[str] | None] = frozenset({"gateway"})
    max_runs: ClassVar[int | None] = 1
    headline: ClassVar[tuple[str, ...]] = (
        "requests",
        "rss_start_mib",
        "rss_end_mib",
        "rss_growth_mib",
        "late_growth_mib_per_1000",
        "plateau",
        "fds_start",
        "fds_end",
        "upstream_open_end",
        "upstream_busy_end",
        "requests_per_s",
        "passed_as_complete",
        "cut",
    )
    seed: int = 0
    requests: int = 30_000
    samples: int = 30
    """Readings taken during the load (one more before it, one after)."""
    concurrency: int = 32
    tokens: tuple[int, int] = (3, 40)
    idle: float = 2.0
    first_byte: float = 3.0
    plateau_limit: float = 0.1
    """MiB per 1,000 requests: a slower late growth counts as levelled off."""
    time_limit: float = 3600.0

    def mock_argv(self, port: int) -> list[str]:
        return Chaos().mock_argv(port)

    def gateway_timeouts(self) -> Mapping[str, float]:
        return {"idle": self.idle, "first_byte": self.first_byte, "shutdown": 2.0}

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        server = endpoint.server
        assert server is not None
        plans = make_plans(
            self.seed, self.requests, model=UPSTREAM_MODEL, tokens=self.tokens, faults=_SOAK_FAULTS
        )
        load = Load(plans)
        sampler = _Sampler(server, context.mock.port, time.monotonic(), context.say)
        sampler.take(0)
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.run)

            every = max(1, self.requests // self.samples)

            def on_done(load: Load) -> None:
                if load.done % every == 0:
                    sampler.take(load.done)

            results = await run_plans(endpoint, load, self.concurrency, on_done=on_done)
            wall = time.monotonic() - started
            await trio.sleep(1.0)
            sampler.take(load.done)
            sampler.finish()
        end = await settled_stats(context.mock.port, "busy")
        samples = sampler.samples
        samples[-1] |= {"upstream_open": end["open"], "upstream_busy": end["busy"]}
        first, last = samples[0], samples[-1]
        slope = late_slope(samples)
        figures: Metrics = summarize_results(results)
        figures |= {
            "seed": self.seed,
            "wall_s": wall,
            "requests_per_s": len(results) / wall,
            "rss_start_mib": first["rss_mib"],
            "rss_end_mib": last["rss_mib"],
            "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
            "late_growth_mib_per_1000": slope,
            "plateau": None if slope is None else float(slope < self.plateau_limit),
            "fds_start": first["fds"],
            "fds_end": last["fds"],
            "upstream_open_end": end["open"],
            "upstream_busy_end": end["busy"],
        }
        context.details.update(
            {
                "seed": self.seed,
                "samples": samples,
                "breakdown": breakdown(results),
                "error_codes": error_codes(results),
                "examples": examples(results),
                "figures": figures,
            }
        )
        return figures

    def describe(self, details: Mapping[str, Any]) -> list[str]:
        samples: Sequence[Mapping[str, float]] = details["samples"]
        figures = details["figures"]
        out = [
            f"#### soak: the series (seed {details['seed']})",
            "",
            "| requests | s | rss_mib | growth_mib | fds | upstream_open | upstream_busy |",
            "|---|---|---|---|---|---|---|",
        ]
        previous = None
        for sample in samples:
            growth = "" if previous is None else f"{sample['rss_mib'] - previous:+.2f}"
            previous = sample["rss_mib"]
            out.append(
                f"| {sample['requests']:.0f} | {sample['t_s']:.0f} | {sample['rss_mib']:.2f} "
                f"| {growth} | {sample['fds']:.0f} | {sample.get('upstream_open', '-')} "
                f"| {sample.get('upstream_busy', '-')} |"
            )
        out += ["", *breakdown_lines(self.name, details)]
        slope = figures["late_growth_mib_per_1000"]
        verdict = "plateau" if figures["plateau"] == 1 else "growing"
        out += [
            f"Verdict: **{verdict}**: the last third grew "
            f"{'-' if slope is None else f'{slope:.3f}'} MiB per 1,000 requests "
            f"(limit {self.plateau_limit:g}); RSS {figures['rss_start_mib']:.1f} → "
            f"{figures['rss_end_mib']:.1f} MiB over {figures['requests']:.0f} requests.",
            "",
        ]
        return out


class _Sampler:
    """Readings of the gateway taken at once, and the mock's counts fetched soon after."""

    def __init__(
        self, server: Server, mock_port: int, started: float, say: Callable[[str], None]
    ) -> None:
        self.server = server
        self.say = say
        self.mock_port = mock_port
        self.started = started
        self.samples: list[dict[str, float]] = []
        self.traced = bool(os.environ.get(TRACEMALLOC_ENV))
        self._send, self._receive = trio.open_memory_channel[dict[str, float]](float("inf"))

    def take(self, requests: int) -> None:
        """Read memory and descriptors now; the mock's counts follow. Not a checkpoint."""
        pid = self.server.process.pid
        sample = {
            "requests": float(requests),
            "t_s": time.monotonic() - self.started,
            "rss_mib": self.server.usage().rss / _MIB,
            "fds": float(_fds(pid)),
        }
        self.samples.append(sample)
        if self.traced:
            self.server.process.send_signal(signal.SIGUSR1)
        self._send.send_nowait(sample)

    def finish(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """Fill in the mock's counts of each sample. A checkpoint; returns after finish()."""
        with self._receive:
            async for sample in self._receive:
                stats = await mock_stats(self.mock_port)
                sample["upstream_open"] = stats["open"]
                sample["upstream_busy"] = stats["busy"]
                self.say(
                    f"soak: {sample['requests']:.0f} requests, RSS {sample['rss_mib']:.2f} MiB,"
                    f" {sample['fds']:.0f} fds, upstream {stats['open']} open {stats['busy']} busy"
                )
