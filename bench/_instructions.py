"""``python -m bench._instructions``: instructions per event and per request, counted by callgrind.

CPU seconds on a shared 2-core machine move by 20 % from one run to the
next (docs/benchmarks.md), more than most levers on the hot path. An
instruction count does not: this module runs each server under
``valgrind --tool=callgrind``, with Trio's scheduler seeded
(:mod:`bench._seeded`) and ``PYTHONHASHSEED=0``, counts the instructions
its threads execute during a fixed load, and divides. Two runs of the same
tree agree to about 0.1 %, so a lever of 1 % shows. What it leaves out is
what makes an instruction dearer inside a busy server (cache misses, the
kernel's share); the CPU figures of ``python -m bench`` stay the verdict.

Two loads, each against its own mock, each server started afresh and
warmed up with four requests before counting starts
(``callgrind_control -i on``):

* ``stream``: one chat stream of 300 deltas, 30 ms apart (304 events). The
  server is idle between events, so every event takes the unbatched path:
  the per-event cost, as in ``trickle-50``.
* ``short``: 100 chat streams of 11 events, one after another, as fast as
  the mock sends: the per-request cost, as in ``short``.

Each row gives the event loop's thread (``loop``) and the other threads
(the request log, the usage database) apart, and the loop thread's count
over bare's. Contenders: ``bare``, ``gateway`` (this clone, or
``$TRIO_GATEWAY_BENCH_GATEWAY_SOURCE``) and ``gateway-b``
(``$TRIO_GATEWAY_BENCH_B_SOURCE``), as in ``python -m bench``. Under
callgrind a server runs about 50 times slower; the whole command takes
about two minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bench._contenders import (
    _UPSTREAM_KEY_ENV,
    B_SOURCE_ENV,
    PUBLIC_MODEL,
    SOURCE_ENV,
    UPSTREAM_MODEL,
    Endpoint,
    bench_env,
    gateway_config,
)
from bench._procs import free_port, running
from bench._scenarios import mock_argv, run_many, target

__all__ = ["Load", "count_instructions", "main"]

_VALGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes")
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Load:
    """What the client sends while instructions are counted."""

    name: str
    requests: int
    concurrency: int
    tokens: int  # deltas per stream; the mock adds the role chunk, finish, usage and [DONE]
    pace: float  # seconds between the mock's deltas


LOADS = (Load("stream", 1, 1, 300, 0.03), Load("short", 100, 1, 7, 0.0))
QUICK_LOADS = (Load("stream", 1, 1, 30, 0.03), Load("short", 10, 1, 7, 0.0))


@dataclass(frozen=True)
class Count:
    """Instructions of one server during one load, by thread."""

    contender: str
    load: Load
    events: int
    loop: int  # the event loop's thread (callgrind's thread 1)
    others: int  # every other thread
    errors: int


def _server_argv(name: str, port: int, mock_port: int, workdir: Path) -> list[str]:
    seeded = [sys.executable, "-m", "bench._seeded"]
    if name == "bare":
        upstream = f"http://127.0.0.1:{mock_port}"
        return [*seeded, "bench._bare", "--port", str(port), "--upstream", upstream]
    config = workdir / f"{name}-{port}.toml"
    config.write_text(gateway_config(mock_port, port, workdir))
    return [*seeded, "trio_gateway", "serve", "--config", str(config)]


def _server_env(name: str) -> dict[str, str]:
    env = bench_env() | {"PYTHONHASHSEED": "0"}
    if name == "bare":
        return env
    env[_UPSTREAM_KEY_ENV] = "bench-upstream-key"
    source = os.environ.get(B_SOURCE_ENV if name == "gateway-b" else SOURCE_ENV)
    if source:
        env["PYTHONPATH"] = os.pathsep.join([source, env["PYTHONPATH"]])
    return env


def thread_totals(out: Path) -> dict[int, int]:
    """Instructions per thread number, summed over callgrind's dumps. Not a checkpoint.

    A dump on request writes ``out``.N-TT and the one at exit ``out``-TT
    (TT: the thread), each with the instructions since the dump before.
    """
    totals: dict[int, int] = {}
    for path in out.parent.glob(out.name + "*-*"):
        thread = int(path.name.rsplit("-", 1)[1])
        found = [int(m) for m in _TOTAL.findall(path.read_bytes())]
        totals[thread] = totals.get(thread, 0) + max(found, default=0)
    return totals


async def _callgrind_control(*args: str) -> None:
    """Send callgrind a command (``-i on``, ``-i off``, ``-d``). A checkpoint; quiet."""
    await trio.run_process(["callgrind_control", *args], capture_stdout=True, capture_stderr=True)


async def count_instructions(name: str, load: Load, mock_port: int, workdir: Path) -> Count:
    """Run ``name``'s server under callgrind and count one ``load``. A checkpoint."""
    port = free_port()
    out = workdir / f"callgrind-{name}-{load.name}-{port}.out"  # one per measurement
    argv = [
        *_VALGRIND,
        f"--callgrind-out-file={out}",
        *_server_argv(name, port, mock_port, workdir),
    ]
    model = UPSTREAM_MODEL if name == "bare" else PUBLIC_MODEL
    async with running(
        name, argv, port, workdir, env=_server_env(name), ready_timeout=180
    ) as server:
        endpoint = Endpoint(port, model, server)
        await run_many(target(endpoint, "chat"), 4, 2)  # warm-up, not counted
        pid = str(server.process.pid)
        await _callgrind_control("-i", "on", pid)
        logs = await run_many(target(endpoint, "chat"), load.requests, load.concurrency)
        await trio.sleep(0.5)  # the last record reaches the log and the database
        await _callgrind_control("-i", "off", pid)
        # Dumped now: a server slow to stop under valgrind may be killed, and
        # then it writes nothing at its exit.
        await _callgrind_control("-d", pid)
    totals = thread_totals(out)
    return Count(
        name,
        load,
        events=sum(len(log.events) for log in logs),
        loop=totals.get(1, 0),
        others=sum(count for thread, count in totals.items() if thread != 1),
        errors=sum(log.error is not None for log in logs),
    )


def report(counts: Sequence[Count]) -> str:
    """The Markdown table of ``counts``: per event, per request, and over bare."""
    bare: dict[str, Count] = {}
    for c in counts:
        if c.contender == "bare":
            bare.setdefault(c.load.name, c)  # the first bare of each load
    lines = [
        "| load | contender | loop Ir/event | loop Ir/request | other threads Ir/request"
        " | loop / bare | events | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in counts:
        base = bare.get(c.load.name)
        ratio = f"{c.loop / base.loop:.3f}" if base and base.loop else "-"
        lines.append(
            f"| {c.load.name} | {c.contender} | {c.loop / max(c.events, 1):,.0f}"
            f" | {c.loop / c.load.requests:,.0f} | {c.others / c.load.requests:,.0f}"
            f" | {ratio} | {c.events} | {c.errors} |"
        )
    return "\n".join(lines)


async def _run(contenders: Sequence[str], loads: Sequence[Load], workdir: Path) -> list[Count]:
    counts: list[Count] = []
    for load in loads:
        mock_port = free_port()
        argv = mock_argv(mock_port, tokens=load.tokens, pace=load.pace)
        async with running(f"mock-{load.name}", argv, mock_port, workdir, env=bench_env()):
            for name in contenders:
                count = await count_instructions(name, load, mock_port, workdir)
                print(f"{load.name} {name}: {count.loop:,} loop instructions", file=sys.stderr)
                counts.append(count)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, count, and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench._instructions", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter loads (a smoke test)")
    parser.add_argument(
        "--contenders",
        default="bare,gateway",
        help="comma-separated, from bare, gateway, gateway-b (default: bare,gateway)",
    )
    args = parser.parse_args(argv)
    contenders = args.contenders.split(",")
    unknown = set(contenders) - {"bare", "gateway", "gateway-b"}
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if "gateway-b" in contenders and not os.environ.get(B_SOURCE_ENV):
        parser.error(f"gateway-b needs ${B_SOURCE_ENV}")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        parser.error(f"not found on PATH: {', '.join(missing)} (Debian: apt-get install valgrind)")
    workdir = Path(tempfile.mkdtemp(prefix="trio-gateway-instructions-"))
    counts = trio.run(_run, contenders, QUICK_LOADS if args.quick else LOADS, workdir)
    print(report(counts))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
