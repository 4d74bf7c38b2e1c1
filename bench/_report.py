"""From the figures of each run to the published result: medians, within-run ratios, targets.

Pure functions over plain data, so the result file can be rebuilt and
checked without running anything. A ratio or a difference is always
computed inside one run (both contenders measured in the same turn of the
same run) and only then summarised by its median over the runs: the
machine's load drifts between runs, and a ratio of medians would mix them.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TARGETS",
    "Goal",
    "Runs",
    "evaluate",
    "machine",
    "markdown",
    "summarize",
    "within_runs",
]

Metrics = Mapping[str, float | None]
Runs = Sequence[Mapping[str, Metrics]]
"""One mapping per run: contender name to its figures in that run."""


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _difference(a: float, b: float) -> float | None:
    return a - b


def within_runs(
    runs: Runs,
    contender: str,
    base: str,
    metric: str,
    combine: Callable[[float, float], float | None],
) -> float | None:
    """The median over runs of ``combine(contender's metric, base's metric)`` in the same run."""
    values = []
    for run in runs:
        a = run.get(contender, {}).get(metric)
        b = run.get(base, {}).get(metric)
        if a is not None and b is not None and (value := combine(a, b)) is not None:
            values.append(value)
    return statistics.median(values) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def summarize(runs: Runs, contenders: Sequence[str]) -> dict[str, object]:
    """Medians per contender, and within-run ratios to bare and direct (differences for ``_ms``)."""
    metrics = sorted({m for run in runs for figures in run.values() for m in figures})
    median: dict[str, dict[str, float | None]] = {}
    for name in contenders:
        median[name] = {}
        for metric in metrics:
            values = [v for run in runs if (v := run.get(name, {}).get(metric)) is not None]
            median[name][metric] = _round(statistics.median(values)) if values else None
    summary: dict[str, object] = {"median": median}
    for base in ("bare", "direct"):
        ratios = {
            name: {m: _round(within_runs(runs, name, base, m, _ratio)) for m in metrics}
            for name in contenders
            if name != base and base in contenders
        }
        summary[f"ratio_to_{base}"] = ratios
    if "direct" in contenders:
        summary["added_to_direct_ms"] = {
            name: {
                m: _round(within_runs(runs, name, "direct", m, _difference))
                for m in metrics
                if m.endswith("_ms")
            }
            for name in contenders
            if name != "direct"
        }
    return summary


@dataclass(frozen=True, slots=True)
class Goal:
    """One target of the issue: ``measure`` of the gateway compared with ``limit``."""

    name: str
    scenario: str
    metric: str
    base: str | None
    """None: the gateway's median itself; else a within-run ratio or difference to it."""
    difference: bool
    at_most: bool
    limit: float
    unit: str
    contender: str = "gateway"
    """Whose figures: the workers scenario runs its gateways under ``direct``."""

    def value(self, runs: Runs) -> float | None:
        """The measured value, or None when it could not be measured."""
        if self.base is None:
            values = [
                v for run in runs if (v := run.get(self.contender, {}).get(self.metric)) is not None
            ]
            return statistics.median(values) if values else None
        combine = _difference if self.difference else _ratio
        return within_runs(runs, "gateway", self.base, self.metric, combine)


TARGETS = (
    Goal("trickle CPU per event, gateway / bare", "trickle", "cpu_us_per_event", "bare",
         difference=False, at_most=True, limit=1.15, unit="x"),
    Goal("trickle CPU per event, gateway / litellm", "trickle", "cpu_us_per_event", "litellm",
         difference=False, at_most=True, limit=0.2, unit="x"),
    Goal("burst streams per second, gateway / bare", "burst", "streams_per_s", "bare",
         difference=False, at_most=False, limit=0.8, unit="x"),
    # Issue 14: the hot path. The issue's own targets; the ones above stay as they were.
    Goal("trickle (200 streams) CPU per event, gateway / bare", "trickle", "cpu_us_per_event",
         "bare", difference=False, at_most=True, limit=1.25, unit="x"),
    Goal("trickle-50 CPU per event, gateway / bare", "trickle-50", "cpu_us_per_event", "bare",
         difference=False, at_most=True, limit=1.25, unit="x"),
    Goal("short: CPU per request, gateway - bare", "short", "cpu_us_per_request", "bare",
         difference=True, at_most=True, limit=500.0, unit="us"),
    Goal("burst streams per second, gateway / bare (issue 14)", "burst", "streams_per_s",
         "bare", difference=False, at_most=False, limit=0.9, unit="x"),
    # Issue 13: a second worker on this 2-core machine.
    Goal("workers: burst streams per second, 2 workers / 1", "workers", "burst_speedup", None,
         difference=False, at_most=False, limit=1.4, unit="x", contender="direct"),
    Goal("added TTFB p99 at concurrency 64, gateway - direct", "ttfb", "c64_ttfb_p99_ms",
         "direct", difference=True, at_most=True, limit=5.0, unit="ms"),
    Goal("idle-streams RSS per open stream", "idle-streams", "rss_per_stream_kib", None,
         difference=False, at_most=True, limit=64.0, unit="KiB"),
    Goal("slow-client RSS growth", "slow-client", "rss_growth_mib", None,
         difference=False, at_most=True, limit=5.0, unit="MiB"),
    Goal("cancel: upstream closed after the client left, p99", "cancel", "close_p99_ms", None,
         difference=False, at_most=True, limit=50.0, unit="ms"),
    # Issue 12: stream integrity under faults, and memory over time.
    Goal("chaos: cut or corrupted answers passed as complete", "chaos", "passed_as_complete",
         None, difference=False, at_most=True, limit=0, unit="answers"),
    Goal("chaos: cut answers (clients that stayed)", "chaos", "cut", None,
         difference=False, at_most=True, limit=0, unit="answers"),
    Goal("chaos: the gateway's own 500s", "chaos", "gateway_500s", None,
         difference=False, at_most=True, limit=0, unit="answers"),
    Goal("chaos: upstream connections mid-response at the end", "chaos", "upstream_busy_end",
         None, difference=False, at_most=True, limit=0, unit="connections"),
    Goal("chaos: answers showing the upstream model name", "chaos", "model_leaks", None,
         difference=False, at_most=True, limit=0, unit="answers"),
    Goal("chaos: requests without exactly one usage record", "chaos", "records_missing", None,
         difference=False, at_most=True, limit=0, unit="requests"),
    Goal("chaos-sigterm: in-flight answers cut by two SIGTERMs", "chaos-sigterm",
         "inflight_cut", None, difference=False, at_most=True, limit=0, unit="answers"),
    Goal("chaos-sigterm: usage records lost", "chaos-sigterm", "records_missing", None,
         difference=False, at_most=True, limit=0, unit="requests"),
    Goal("soak: RSS growth per 1,000 requests in the last third", "soak",
         "late_growth_mib_per_1000", None, difference=False, at_most=True, limit=0.1,
         unit="MiB"),
)  # fmt: skip


def evaluate(results: Mapping[str, Runs]) -> list[dict[str, object]]:
    """Where each target stands, given each scenario's runs (absent scenarios: not run)."""
    verdicts: list[dict[str, object]] = []
    for goal in TARGETS:
        runs = results.get(goal.scenario)
        value = None if runs is None else goal.value(runs)
        if value is None:
            status = "not measured"
        else:
            met = value <= goal.limit if goal.at_most else value >= goal.limit
            status = "met" if met else "missed"
        verdicts.append(
            {
                "target": goal.name,
                "scenario": goal.scenario,
                "limit": f"{'<=' if goal.at_most else '>='} {goal.limit:g} {goal.unit}",
                "value": _round(value),
                "status": status,
            }
        )
    return verdicts


def machine() -> dict[str, object]:
    """The machine the run is on: CPU, cores, memory, kernel, Python, load at the start."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


_COUNTS = frozenset({"events", "errors", "missed", "open_streams"})
"""Figures whose ratios mean nothing: they are left blank in the ratio rows."""


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(
    result: Mapping[str, Any],
    headlines: Mapping[str, Sequence[str]],
    extras: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Markdown tables: each scenario's headline medians, ratios to bare, time added to direct.

    ``extras`` holds more lines per scenario, printed after its table.
    """
    out: list[str] = []
    for name, data in result["scenarios"].items():
        metrics = headlines[name]
        out += [f"### {name}", "", "| | " + " | ".join(metrics) + " |"]
        out.append("|---|" + "---|" * len(metrics))
        rows = [(c, figures, metrics) for c, figures in data["median"].items()]
        compared = [m for m in metrics if m not in _COUNTS]
        rows += [(f"{c} / bare", r, compared) for c, r in data.get("ratio_to_bare", {}).items()]
        rows += [
            (f"{c} - direct", a, compared) for c, a in data.get("added_to_direct_ms", {}).items()
        ]
        for label, figures, shown in rows:
            cells = [_cell(figures.get(m)) if m in shown else "" for m in metrics]
            if any(cell not in ("", "-") for cell in cells):
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
        out.extend((extras or {}).get(name, []))
    out += ["### Targets", "", "| target | limit | measured | status |", "|---|---|---|---|"]
    out += [
        f"| {t['target']} | {t['limit']} | {_cell(t['value'])} | {t['status']} |"
        for t in result["targets"]
    ]
    return "\n".join(out) + "\n"
