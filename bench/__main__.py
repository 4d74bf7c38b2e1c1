"""``python -m bench [scenario ...]``: run the benchmark suite and write the result file."""

from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import trio

from bench._contenders import PROFILE_ENV, Contender, all_contenders
from bench._report import evaluate, machine, markdown, summarize
from bench._runner import eligible, run_scenario
from bench._scenarios import DEFAULT_SCENARIOS, SCENARIOS, scenarios

_DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure trio-gateway against bare, direct and the installed peers.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"scenarios to run: {', '.join(SCENARIOS)} (default: all but chaos, limits, workers,"
        " chaos-sigterm and soak)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--quick", action="store_true", help="shrink every scenario (smoke test)")
    parser.add_argument(
        "--contenders",
        help="comma-separated subset of direct,bare,gateway,gateway-b,litellm,nginx"
        " (default: all found; gateway-b runs the source $TRIO_GATEWAY_BENCH_B_SOURCE names)",
    )
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT, help="result file (JSON)")
    parser.add_argument(
        "--seed", type=int, help="seed of the chaos and soak requests (default: a random one)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the gateway under cProfile and write one .prof file per server to DIR"
        " (read it with: python -m pstats FILE, then sort cumtime / stats 30)",
    )
    parser.add_argument(
        "--requests", type=int, help="requests each of chaos, chaos-sigterm and soak sends"
    )
    return parser


def _sayer(started: float) -> Callable[[str], None]:
    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {line}", file=sys.stderr, flush=True)

    return say


def _choose(
    args: argparse.Namespace, say: Callable[[str], None]
) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run, and a note for each one left out."""
    wanted = None if args.contenders is None else set(args.contenders.split(","))
    chosen: list[Contender] = []
    notes: dict[str, str] = {}
    for contender in all_contenders():
        missing = contender.missing()
        if wanted is not None and contender.name not in wanted:
            notes[contender.name] = "not selected (--contenders)"
        elif missing is not None:
            notes[contender.name] = f"skipped: {missing}"
            say(f"{contender.name} skipped: {missing}")
        else:
            chosen.append(contender)
    return chosen, notes


async def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, object]:
    """Run the selected scenarios and return the whole result. A checkpoint."""
    started = time.monotonic()
    say = _sayer(started)
    at = datetime.datetime.now(datetime.UTC)
    contenders, notes = _choose(args, say)
    chosen = scenarios(args.quick, args.seed, args.requests)
    names = args.scenarios or list(DEFAULT_SCENARIOS)
    workdir = Path(tempfile.mkdtemp(prefix="trio-gateway-bench-"))
    results: dict[str, dict[str, object]] = {}
    failed = False
    for name in names:
        scenario = chosen[name]
        taking = eligible(scenario, contenders)
        runs = min(args.runs, scenario.max_runs or args.runs)
        seeded = f", seed {args.seed}" if hasattr(scenario, "seed") else ""
        say(f"{name}: {', '.join(c.name for c in taking)}, {runs} run(s){seeded}")
        outcome = await run_scenario(scenario, taking, runs, workdir, say)
        runs = outcome["runs"]
        assert isinstance(runs, list)
        failed = failed or bool(outcome["failures"])
        results[name] = outcome | summarize(runs, [c.name for c in taking])
    if failed:
        say(f"some contenders failed; their logs are in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "command": " ".join(["python -m bench", *argv]),
        "started_utc": at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine(),
        "settings": {"runs": args.runs, "quick": args.quick, "scenarios": names}
        | ({"seed": args.seed} if set(names) - set(DEFAULT_SCENARIOS) else {}),
        "contenders": {c.name: "ran" for c in contenders} | notes,
        "scenarios": results,
        "targets": evaluate({n: r["runs"] for n, r in results.items()}),  # type: ignore[misc]
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; write the JSON result and print the tables. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile.resolve())
    result = trio.run(run, args, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    chosen = scenarios(args.quick, args.seed, args.requests)
    headlines = {name: s.headline for name, s in chosen.items()}
    extras: dict[str, list[str]] = {}
    for name, data in result["scenarios"].items():  # type: ignore[attr-defined]
        for run_details in data.get("details", []):
            for figures in run_details.values():
                extras.setdefault(name, []).extend(chosen[name].describe(figures))
    print(markdown(result, headlines, extras))
    print(f"result written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
