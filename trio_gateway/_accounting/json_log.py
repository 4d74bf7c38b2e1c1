"""The request log: one JSON line per finished request.

(The request log is this JSON line log only. The SQLite file that keeps
every record is the usage database, :mod:`~trio_gateway._accounting.usage_store`.)

Theory of operation
===================

1. **What a line holds.** :func:`format_record` is pure: it writes the
   fields declared in :data:`trio_gateway._core.record.FIELDS`, each under
   its log key and in its log form (durations in milliseconds, the start as
   ISO 8601 UTC), serialised with orjson on one line. That declaration is
   an allowlist: an attribute added to the record is not logged until
   someone declares it there. A line holds names, figures and ids, never
   prompt or completion text, never a key: the record has no key, only the
   configured key *name*, and no error message, only the failure type.
   Strings that come from the upstream (its response id, the finish reason)
   are cut to :data:`~trio_gateway._core.record.MAX_UPSTREAM_TEXT`
   characters, so a hostile upstream cannot make a line huge.
2. **Where it goes.** :class:`RequestLogger` takes a destination and a level:

   * ``"logging"``: a record on the stdlib logger ``trio_gateway.requests``
     at ``level``; the application's logging configuration decides whether
     that level is shown and where. Nothing is written by this module.
   * ``"-"``: standard error; any other string: a file path, opened for
     appending when the logger is made (so a bad path fails at start-up),
     and reopened if it is moved or deleted (log rotation).

   For these two, the line is appended to a bounded in-memory list and
   written by a worker thread, so a slow disk or a full stderr pipe never
   blocks the Trio thread, and with it every open stream. The hand-off is
   batched: the Trio thread only appends (no lock, no wake-up per line),
   and the worker looks every ``_BATCH_SECONDS`` and writes what has
   gathered with one write and one flush, after reopening a file that
   was moved or deleted. When the list is full the line is dropped and
   counted (:attr:`RequestLogger.dropped`): the usage database, not this
   log, is the record of account. ``level = "off"`` turns the request log
   off.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import sys
import threading
from types import TracebackType
from typing import Any, Final

import orjson
import trio

from trio_gateway._core.config import LOG_LEVELS as LEVELS
from trio_gateway._core.record import FIELDS, RequestRecord, log_readers, read_fields

__all__ = [
    "LEVELS",
    "LOGGER_NAME",
    "LOG_FIELDS",
    "TO_LOGGING",
    "TO_STDERR",
    "RequestLogger",
    "format_record",
]

LOGGER_NAME: Final = "trio_gateway.requests"
TO_LOGGING: Final = "logging"
TO_STDERR: Final = "-"
DEFAULT_MAX_PENDING: Final = 10_000

# The fields of a line, in order: those marked log_first, then the others in column order.
_LOGGED: Final = tuple(f for f in FIELDS if f.log_first) + tuple(
    f for f in FIELDS if not f.log_first
)
#: Every key of a line, in order; format_record emits exactly these.
LOG_FIELDS: Final = tuple(f.key for f in _LOGGED)
_LOG_READERS: Final = log_readers(_LOGGED)


def format_record(record: RequestRecord) -> str:
    """One JSON object, on one line without a newline, with exactly :data:`LOG_FIELDS`.

    Missing figures are ``null``; timings are milliseconds rounded to the
    microsecond. Never raises for a record built from any upstream answer.
    """
    values = read_fields(record, _LOG_READERS)
    return orjson.dumps(dict(zip(LOG_FIELDS, values, strict=True))).decode()


_BATCH_SECONDS: Final = 0.02  # how often the worker looks for lines to write


class _LineWriter(threading.Thread):
    """The worker: writes the pending lines in batches until it is stopped.

    :meth:`put` runs on the Trio thread and only appends; the worker takes
    every line that has gathered, each ``_BATCH_SECONDS``, and writes them
    with one write and one flush. A daemon thread, so a stuck destination
    never holds the process.
    """

    def __init__(self, output: logging.StreamHandler[Any], max_pending: int) -> None:
        super().__init__(name="trio-gateway request log", daemon=True)
        self._output = output
        self._max_pending = max_pending
        self._pending: collections.deque[str] = collections.deque()
        self._stopping = threading.Event()
        self.dropped = 0

    def put(self, line: str) -> None:
        """Queue ``line``; drop and count it if the list is full. Never blocks."""
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
        else:
            self._pending.append(line)

    def run(self) -> None:
        while not self._stopping.wait(_BATCH_SECONDS):
            self._write_pending()
        self._write_pending()

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        lines = [pending.popleft() for _ in range(len(pending))]
        output = self._output
        if isinstance(output, logging.handlers.WatchedFileHandler):
            output.reopenIfNeeded()  # the file was rotated away: write to a new one
        output.stream.write("\n".join(lines) + "\n")
        output.stream.flush()

    def stop(self) -> None:
        """Write every pending line and end the thread. Blocks until it has ended."""
        self._stopping.set()
        self.join()


class RequestLogger:
    """Writes one line per finished request to ``destination`` at ``level``.

    ``destination`` is ``"logging"``, ``"-"`` (stderr) or a file path;
    ``level`` a key of :data:`LEVELS` (``"off"`` writes nothing). Raises
    ValueError for an unknown level or a ``max_pending`` below 1, and
    OSError for a file that cannot be opened. ``max_pending`` bounds the
    lines waiting for the worker thread. Call :meth:`close` (or
    :meth:`aclose`) once at shutdown to write what is pending.
    """

    def __init__(
        self,
        destination: str = TO_STDERR,
        level: str = "info",
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r} (known: {', '.join(LEVELS)})")
        if max_pending < 1:  # queue.Queue would take 0 as "no bound"
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self.destination = destination
        self._level = LEVELS[level]
        self._logger = logging.getLogger(LOGGER_NAME)
        self._worker: _LineWriter | None = None
        self._output: logging.StreamHandler[Any] | None = None
        self._dropped_at_close = 0
        if self._level is None or destination == TO_LOGGING:
            return
        output: logging.StreamHandler[Any]
        if destination == TO_STDERR:
            output = logging.StreamHandler(sys.stderr)
        else:
            output = logging.handlers.WatchedFileHandler(destination, encoding="utf-8")
        self._output = output
        # Lines go to this instance's own worker, outside the logging tree: two
        # gateways in one process never write each other's lines.
        self._worker = _LineWriter(output, max_pending)
        self._worker.start()

    @property
    def dropped(self) -> int:
        """Lines dropped because the worker's list was full."""
        return self._dropped_at_close if self._worker is None else self._worker.dropped

    def log(self, record: RequestRecord) -> None:
        """Log ``record``'s line. Not a checkpoint; never blocks on the destination."""
        level = self._level
        if level is None:
            return
        if self._worker is not None:
            self._worker.put(format_record(record))
        elif self._logger.isEnabledFor(level):
            self._logger.log(level, "%s", format_record(record))

    def close(self) -> None:
        """Write every pending line, stop the worker and close the file. Safe to call twice.

        Blocks until the pending lines are written, for as long as the
        destination takes; :meth:`aclose` does it from a Trio task, with a
        bound the caller chooses.
        """
        self._level = None  # lines after close are not logged
        worker, self._worker = self._worker, None
        if worker is not None:
            self._dropped_at_close = worker.dropped
            worker.stop()
        if self._output is not None:
            self._output.close()

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread. A checkpoint.

        Cancelling it (say, a shutdown deadline) returns at once and leaves
        the close running in that thread; the line worker is a daemon
        thread, so a stuck destination never holds the process.
        """
        await trio.to_thread.run_sync(self.close, abandon_on_cancel=True)

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
