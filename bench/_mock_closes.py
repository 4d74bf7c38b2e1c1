"""The mock upstream, reporting when each peer closes its connection (for the cancel scenario).

``python -m bench._mock_closes --port N --tokens T --pace S`` serves the
same :class:`~trio_gateway.mock_upstream.MockUpstream` as
``python -m trio_gateway.testing.mock_upstream``, and prints one line per
connection the peer closed: ``closed <seconds>``, the mock's own
``closed_at`` stamp (taken by its reader task as the FIN or RST arrives)
converted to ``time.monotonic()``, which the bench process shares.
Reporting is polled, but the stamp is not, so the poll adds no latency to
the figure.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence

import trio

from trio_gateway.testing.mock_upstream import MockConnection, MockUpstream, Script

__all__ = ["main"]

_POLL = 0.005  # seconds between looks at the connection records


async def _serve_and_report(mock: MockUpstream, port: int) -> None:
    """Serve ``mock`` and print each peer close. A checkpoint; runs until cancelled."""
    # trio's clock is CLOCK_MONOTONIC plus an offset of its own: measure the offset once.
    offset = trio.current_time() - time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(mock.serve, host="127.0.0.1", port=port))
        print(f"mock upstream listening on {mock.base_url}", flush=True)
        seen = 0
        open_records: list[MockConnection] = []
        while True:
            await trio.sleep(_POLL)
            open_records += mock.connections[seen:]
            seen = len(mock.connections)
            # Connections end in any order (a pooled one may never end): look at each open one.
            for record in [r for r in open_records if r.closed.is_set()]:
                open_records.remove(record)
                if record.closed_by_peer and record.closed_at is not None:
                    print(f"closed {record.closed_at - offset:.6f}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench._mock_closes", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--pace", type=float, default=0.02)
    args = parser.parse_args(argv)
    mock = MockUpstream(Script(tokens=args.tokens, pace=args.pace))
    trio.run(_serve_and_report, mock, args.port)


if __name__ == "__main__":
    main()
