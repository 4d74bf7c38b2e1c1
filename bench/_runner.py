"""One scenario, every contender, several runs: the order of work and its time bounds.

Theory of operation
===================

1. **One mock per scenario.** The mock upstream starts once per scenario,
   with that scenario's script, and serves every contender in every run.
2. **Contenders take turns.** In run *i*, the eligible contenders are
   measured one after the other, the list rotated by *i*, so no contender is
   always first or last when the machine's load drifts. Each measurement gets
   a fresh server process (its memory figures start from a clean process),
   two warm-up streams per API kind, and then the scenario itself.
3. **Everything is bounded.** A server must listen within its start bound,
   the warm-up within 20 s, the scenario within its ``time_limit``; a server
   gets SIGTERM and, 5 s later, SIGKILL. A contender that fails or overruns
   is recorded as a failure, left out of the scenario's later runs, and the
   run goes on with the others.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import trio

from bench._contenders import Contender, Endpoint, bench_env
from bench._load import StreamLog, run_stream
from bench._procs import ServerFailed, free_port, running
from bench._scenarios import Cancel, CloseReports, Context, Metrics, Scenario, target

__all__ = ["eligible", "run_scenario"]

_WARM_UP_LIMIT = 20.0


def eligible(scenario: Scenario, contenders: Sequence[Contender]) -> list[Contender]:
    """The contenders that serve ``scenario``'s kinds (and have a server, if it needs one)."""
    return [
        c
        for c in contenders
        if set(scenario.kinds) <= c.kinds
        and not (scenario.needs_server and c.name == "direct")
        and (scenario.only is None or c.name in scenario.only)
    ]


async def warm_up(endpoint: Endpoint, scenario: Scenario) -> None:
    """Two streams per kind, left at their first bytes. A checkpoint; may raise ServerFailed."""
    with trio.move_on_after(_WARM_UP_LIMIT) as scope:
        for kind in scenario.kinds:
            for _ in range(2):
                log = StreamLog()
                await run_stream(target(endpoint, kind), log, stop_after_events=0)
                if log.error is not None:
                    raise ServerFailed(f"warm-up {kind} stream failed: {log.error}")
    if scope.cancelled_caught:
        raise ServerFailed(f"warm-up took more than {_WARM_UP_LIMIT:g} s")


async def run_scenario(
    scenario: Scenario,
    contenders: Sequence[Contender],
    runs: int,
    workdir: Path,
    say: Callable[[str], None],
) -> dict[str, object]:
    """Run ``scenario`` ``runs`` times over ``contenders`` in turns; return params, runs, failures.

    A checkpoint. Every process it starts has exited when it returns or raises.
    """
    names = [c.name for c in contenders]
    results: list[dict[str, Metrics]] = []
    details: list[dict[str, dict[str, object]]] = []
    failures: list[str] = []
    closes = CloseReports() if isinstance(scenario, Cancel) else None
    port = free_port()
    async with trio.open_nursery() as nursery:
        async with running(
            f"mock-{scenario.name}",
            scenario.mock_argv(port),
            port,
            workdir,
            env=bench_env(),
            stdout=subprocess.PIPE if closes else None,
        ) as mock:
            if closes is not None and mock.process.stdout is not None:
                nursery.start_soon(closes.collect, mock.process.stdout)
            context = Context(mock, closes, say=say)
            taking = list(contenders)
            for run in range(runs):
                shift = run % len(taking) if taking else 0
                measured: dict[str, Metrics] = {}
                said: dict[str, dict[str, object]] = {}
                for contender in [*taking[shift:], *taking[:shift]]:
                    label = f"{scenario.name} run {run + 1}/{runs} {contender.name}"
                    started = time.monotonic()
                    context.details.clear()
                    try:
                        figures = await _measure_one(scenario, contender, port, workdir, context)
                    except ServerFailed as exc:
                        # Trying again would fail the same way: leave it out of later runs.
                        taking.remove(contender)
                        failures.append(f"run {run + 1} {contender.name}: {exc}")
                        say(f"{label}: FAILED, left out of later runs: {exc}")
                        continue
                    measured[contender.name] = figures
                    if context.details:
                        said[contender.name] = dict(context.details)
                    took = time.monotonic() - started
                    say(f"{label}: {_headline(scenario, figures)}  ({took:.1f} s)")
                results.append(measured)
                details.append(said)
        nursery.cancel_scope.cancel()
    params: dict[str, object] = asdict(scenario) if is_dataclass(scenario) else {}
    outcome: dict[str, object] = {"params": params, "contenders": names, "runs": results}
    if any(details):
        outcome["details"] = details
    return outcome | {"failures": failures}


async def _measure_one(
    scenario: Scenario, contender: Contender, mock_port: int, workdir: Path, context: Context
) -> Metrics:
    """Start ``contender``, warm it up, measure once, stop it. A checkpoint; raises ServerFailed."""
    async with contender.start(mock_port, workdir, scenario.gateway_timeouts()) as endpoint:
        if scenario.warm_up:
            await warm_up(endpoint, scenario)
        with trio.move_on_after(scenario.time_limit) as scope:
            return await scenario.measure(endpoint, context)
        assert scope.cancelled_caught
        raise ServerFailed(f"took more than {scenario.time_limit:g} s")


def _headline(scenario: Scenario, figures: Metrics) -> str:
    parts = []
    for metric in scenario.headline:
        value = figures.get(metric)
        if value is None:
            shown = "-"
        elif value == int(value) and abs(value) < 1e6:
            shown = str(int(value))
        else:
            shown = f"{value:.3g}"
        parts.append(f"{metric}={shown}")
    return " ".join(parts)
