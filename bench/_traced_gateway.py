"""The gateway under tracemalloc, and a comparison of its snapshots: to find what keeps growing.

``python -m bench._traced_gateway --snapshots DIR [--frames N] serve --config X``
runs ``trio-gateway serve`` as usual, with :mod:`tracemalloc` tracing every
allocation (``N`` frames deep) and a snapshot written to
``DIR/snapshot-NNNN.pickle`` on each SIGUSR1. The bench's gateway contender
runs this when ``$TRIO_GATEWAY_BENCH_TRACEMALLOC`` names a folder, and the soak
scenario sends the signal at each sample.

``python -m bench._traced_gateway compare OLD NEW [--by lineno|traceback] [--limit K]``
prints the ``K`` allocation sites that grew most from snapshot OLD to NEW:
net bytes and blocks, then (``--by traceback``) the frames that led there.
Tracing slows the gateway several times over; the figures of a traced run
say where memory goes, not how fast anything is.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["compare", "main"]

# Frames of the tracing itself and of the import system say nothing about a leak.
_IGNORED = (
    tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__),
    tracemalloc.Filter(inclusive=False, filename_pattern="<frozen importlib._bootstrap>"),
    tracemalloc.Filter(inclusive=False, filename_pattern="<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(inclusive=False, filename_pattern="<unknown>"),
)


def _serve(folder: Path, frames: int, argv: Sequence[str]) -> int:
    from trio_gateway._cli import main as gateway_main

    folder.mkdir(parents=True, exist_ok=True)
    taken = 0

    def snapshot(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        taken += 1
        tracemalloc.take_snapshot().dump(str(folder / f"snapshot-{taken:04d}.pickle"))

    tracemalloc.start(frames)
    signal.signal(signal.SIGUSR1, snapshot)
    return gateway_main(list(argv))


def compare(old: Path, new: Path, *, by: str = "lineno", limit: int = 20) -> list[str]:
    """The lines :func:`main` prints for ``compare``: top growth from ``old`` to ``new``."""
    before = tracemalloc.Snapshot.load(str(old)).filter_traces(_IGNORED)
    after = tracemalloc.Snapshot.load(str(new)).filter_traces(_IGNORED)
    total_before = sum(stat.size for stat in before.statistics("filename"))
    total_after = sum(stat.size for stat in after.statistics("filename"))
    out = [
        f"traced: {total_before / 1024:.0f} KiB -> {total_after / 1024:.0f} KiB "
        f"({(total_after - total_before) / 1024:+.0f} KiB)"
    ]
    for stat in after.compare_to(before, by)[:limit]:
        frame = stat.traceback[-1]  # the most recent frame: where the allocation happened
        out.append(
            f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks"
            f"  (now {stat.size / 1024:.1f} KiB in {stat.count})  {frame.filename}:{frame.lineno}"
        )
        if by == "traceback":
            out += [f"        {line}" for line in stat.traceback.format(most_recent_first=True)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the traced gateway, or compare two snapshots. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        parser = argparse.ArgumentParser(prog="python -m bench._traced_gateway compare")
        parser.add_argument("old", type=Path)
        parser.add_argument("new", type=Path)
        parser.add_argument("--by", choices=["lineno", "traceback", "filename"], default="lineno")
        parser.add_argument("--limit", type=int, default=20)
        args = parser.parse_args(argv[1:])
        print("\n".join(compare(args.old, args.new, by=args.by, limit=args.limit)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench._traced_gateway", description=__doc__)
    parser.add_argument("--snapshots", type=Path, required=True, help="where snapshots go")
    parser.add_argument("--frames", type=int, default=25, help="frames kept per allocation")
    parser.add_argument("gateway", nargs=argparse.REMAINDER, help="trio-gateway's arguments")
    args = parser.parse_args(argv)
    return _serve(args.snapshots, args.frames, args.gateway)


if __name__ == "__main__":
    sys.exit(main())
