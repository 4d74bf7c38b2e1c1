"""``python -m bench._seeded MODULE ARGS...``: run ``python -m MODULE ARGS...`` with Trio's
scheduler made repeatable, for :mod:`bench._instructions`.

Trio reverses each batch of runnable tasks at random (its private
``trio._core._run._r``); two runs of the same load then take different
paths through the scheduler, and their instruction counts differ by a few
per cent. Seeding that generator takes the randomness out. For measuring
only: a server must keep Trio's own randomness.
"""

from __future__ import annotations

import runpy
import sys

import trio._core._run as trio_run


def main() -> None:
    """Seed the scheduler, then run the module named first on the command line as __main__."""
    trio_run._r.seed(0)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
