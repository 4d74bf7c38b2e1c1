"""The usage store: one row per finished request, in SQLite or PostgreSQL, written from Trio.

The rows themselves (schema, row mapping, spill lines) are
:mod:`~trio_gateway._accounting.usage_rows`; the spill files are
:mod:`~trio_gateway._accounting.spill`; the database behind the store is a
:class:`~trio_gateway._accounting.usage_db.UsageDatabase`
(:mod:`~trio_gateway._accounting.sqlite_store` for a file,
:mod:`~trio_gateway._accounting.postgres_store` for a ``postgresql://`` URL).
This module is the Trio store around them, and the thread that owns the
database.

Theory of operation
===================

::

    request tasks --submit()--> channel(queue_size) --> [writer task: run()] --jobs--> [db thread]
          |                                                   |                           |
          +--- queue still full after submit_timeout ---------+--- write error ----> spill file
                                                              |                       (this pid's)
                                        every retry_interval: +--- import pass <--- spill files

1. **Request tasks own nothing here.** Each calls :meth:`UsageStore.submit`
   once, when its request ends, often from a task that is being cancelled
   (client disconnect, shutdown). ``submit`` runs shielded, so the
   cancellation cannot lose the record, and is bounded by ``submit_timeout``,
   so a slow database cannot hold a request. The send end of the channel
   belongs to the store itself; :meth:`UsageStore.aclose` closes it.
2. **The writer task** (:meth:`UsageStore.run`) **owns the receive end** and
   closes it with ``with`` on every way out. Once a record arrives it lets
   more gather for ``gather_seconds`` (submits meanwhile only queue, with no
   task switch each), takes whatever is queued (up to ``batch_size``
   records) and hands the batch to the database thread, which inserts it in
   one transaction. Only the writer task waits for that;
   the event loop keeps running. :meth:`UsageStore.flush` waits until every
   record submitted so far is written (or spilled). The writer also runs the
   **import passes** (below), one chunk at a time between batches, so an
   import never holds up new records for long.
3. **The database thread owns the connection** for its whole life: it
   opens it, runs each job in order, and closes it. This thread is started by
   :meth:`UsageStore.run` and belongs to the store; it is not taken from a
   pool. ``:memory:`` databases therefore work (one connection, one thread),
   sqlite's ``check_same_thread`` check stays on, and a job the writer gave
   up on (below) still runs to its end on the thread that owns the
   connection. No other thread touches the connection. The thread is a
   daemon, so a database stuck on a dead disk cannot keep the process alive.
4. **Who cancels what.** Nobody cancels a request's ``submit``. The writer is
   cancelled by :meth:`UsageStore.aclose` when ``drain_timeout`` runs out, or
   by whoever cancels the nursery it runs in. A cancelled writer stops
   waiting for the batch in flight and spills it (the thread still finishes
   that job), spills everything still queued, and returns. Jobs in the
   database thread are never interrupted: a transaction either commits or
   rolls back.

When the database is slower than the traffic
--------------------------------------------

Nothing is silently dropped. The queue holds ``queue_size`` records. When it
is full, ``submit`` waits for room at most ``submit_timeout`` seconds. After
that it **spills** the record: it appends one JSON line to this process's
spill file (``<base>.spill.<pid>.jsonl``), synchronously, on the event loop.
The line is a few hundred bytes, and the alternative is to hold the client.
Records that a failed write (counted in ``write_errors`` and logged) or a
cancelled writer leaves behind are spilled the same way. So the client never
waits more than ``submit_timeout`` on accounting.

Spilling is better than the other two policies. Waiting without a bound
would make the client stream wait on a disk. Counting drops would lose
billing data exactly when traffic peaks. ``request_id`` is unique in the
table, so a record written twice (a batch spilled after its commit had
already begun, a spill file imported again after an import was cut short)
is stored once. The copy counts in ``duplicates``.

Import passes: spilled records come back
----------------------------------------

:meth:`UsageStore.run` imports every spill file it may (below) before it
reports started, and the writer runs a new **import pass** every
``retry_interval`` seconds (30 by default) while it runs. A pass takes the
files one by one, ``batch_size`` lines per transaction, between the
writer's batches. A pass imports this process's own spill file, the files of
processes that are no longer running (a worker that crashed or was scaled
away), the old single ``<base>.spill.jsonl``, and any ``.importing`` file an
import left behind; never the spill file of another live process, which that
process imports itself. Several processes can run passes over the same files
at the same moment: :func:`~trio_gateway._accounting.spill.claim` (a lock,
then a rename) gives each file to exactly one of them, and ``request_id``
keeps a file imported again after a crash from counting twice. A failed
import step is counted in ``write_errors`` and logged; its file is kept for
the next pass.

When the database is down
-------------------------

A PostgreSQL server that cannot be reached (at start, or a connection lost
while writing) is :class:`~trio_gateway._accounting.usage_db.DatabaseUnavailable`.
The store then logs it once at ERROR, counts it in ``write_errors``, and
**spills every batch at once**, without trying the database, until the next
pass reconnects (every ``retry_interval``; each failed reconnect counts in
``write_errors`` and logs a WARNING). A pass that reconnects logs a WARNING
and imports everything spilled meanwhile. So an outage costs no request any
time, loses no record, and ends on its own. ``run`` starts serving even if
the server is down at start; a schema it cannot use
(:class:`~trio_gateway._accounting.usage_db.SchemaError`) stops it instead.
A SQLite file is never "unavailable": its errors are write errors.

If the record cannot be spilled either (no spill file for ``:memory:``, or the
file cannot be written), it is counted in ``dropped``, and its row is logged
at ERROR level as JSON, so even then it is not silent.

The counters (plain ints, read by the metrics module): ``queued`` (the
current queue length), ``written``, ``spilled``, ``dropped``,
``write_errors``, ``imported``, ``duplicates`` and ``rejected`` (spilled
lines that could not be imported; they are kept in ``<base>.spill.jsonl.rejected``).

Shutdown: :meth:`UsageStore.aclose` closes the send end, so any later
``submit`` spills. The writer then writes everything still queued, and
``aclose`` waits for it at most ``drain_timeout`` seconds. After that it
cancels the writer, which spills what is left. ``aclose`` returns at most
``drain_timeout`` + 2 s after it was called: the 2 s are for closing the
connection. A file half imported at that moment keeps its ``.importing``
name and is finished by the next pass, of this process or of another.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from trio_gateway._accounting import spill
from trio_gateway._accounting.sqlite_store import SQLiteDatabase, connect
from trio_gateway._accounting.usage_db import (
    DatabaseUnavailable,
    SchemaError,
    UsageDatabase,
    UsageDatabaseError,
    is_database_url,
)
from trio_gateway._accounting.usage_rows import Row, record_to_row
from trio_gateway._core.record import RequestRecord

__all__ = [
    "DatabaseUnavailable",
    "SchemaError",
    "UsageDatabaseError",
    "UsageStore",
    "connect",
    "usage_database",
]

logger = logging.getLogger("trio_gateway.usage")

T = TypeVar("T")

_CLOSE_GRACE = 2.0  # seconds given to closing the connection at the end of run()


def usage_database(
    database: str | os.PathLike[str],
    *,
    schema: str | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
) -> UsageDatabase:
    """The database ``database`` names, not yet opened.

    A ``postgresql://`` or ``postgres://`` URL is PostgreSQL: ``schema`` (if
    given) is the schema its tables live in, and ``spill_dir`` (default: the
    working directory) holds its spill files. Anything else is a SQLite file,
    or ``":memory:"``; its spill files are beside it, or in ``spill_dir``.
    ValueError if ``schema`` is given for SQLite, or the URL cannot be read.
    """
    if is_database_url(database):
        # Imported only here: a SQLite gateway never loads the PostgreSQL driver.
        from trio_gateway._accounting.postgres_store import PostgresDatabase

        folder = Path(spill_dir) if spill_dir is not None else Path.cwd()
        return PostgresDatabase(str(database), schema=schema, spill_dir=folder)
    if schema is not None:
        raise ValueError("schema is only for a PostgreSQL database (postgresql://...)")
    return SQLiteDatabase(database, spill_dir=None if spill_dir is None else Path(spill_dir))


class _Job(Generic[T]):
    """One call to make on the database thread, and its answer, delivered back to Trio."""

    def __init__(self, fn: Callable[[], T], token: trio.lowlevel.TrioToken) -> None:
        self._fn = fn
        self._token = token
        self.done = trio.Event()
        self.abandoned = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        """On the database thread: make the call, hand the answer to Trio."""
        value: T | None = None
        error: BaseException | None = None
        try:
            value = self._fn()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._deliver, value, error)

    def _deliver(self, value: T | None, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self.done.set()
        if self.abandoned and error is not None:
            logger.error("usage database: a job the writer had given up on failed: %r", error)

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # T may itself allow None


# --- the store (Trio) -----------------------------------------------------------


class UsageStore:
    """The usage database, written from Trio. See the module docstring for how it works.

    ``database`` is a SQLite file, ``":memory:"`` (then there is no spill
    file, and a record that would be spilled is counted in ``dropped`` and
    logged), or a ``postgresql://`` URL; ``schema`` and ``spill_dir`` are
    those of :func:`usage_database`. ``queue_size`` records wait in memory at
    most; the writer inserts up to ``batch_size`` per transaction; ``submit``
    waits at most ``submit_timeout`` seconds for room; ``aclose`` gives the
    writer ``drain_timeout`` seconds to write what is queued (``math.inf``: no
    limit). An import pass (and, in an outage, a reconnect) runs every
    ``retry_interval`` seconds (``math.inf``: only at start). Once a record
    arrives, the writer waits ``gather_seconds`` for more before it writes
    the batch (0: it writes what is queued at once).
    """

    def __init__(
        self,
        database: str | os.PathLike[str],
        *,
        schema: str | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        queue_size: int = 1024,
        batch_size: int = 256,
        submit_timeout: float = 1.0,
        drain_timeout: float = 10.0,
        retry_interval: float = 30.0,
        gather_seconds: float = 0.05,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        for name, value in (
            ("submit_timeout", submit_timeout),
            ("drain_timeout", drain_timeout),
            ("gather_seconds", gather_seconds),
        ):
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not retry_interval > 0:
            raise ValueError(f"retry_interval must be a number of seconds > 0: {retry_interval}")
        self.path = database
        self.database = usage_database(database, schema=schema, spill_dir=spill_dir)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.submit_timeout = submit_timeout
        self.drain_timeout = drain_timeout
        self.retry_interval = retry_interval
        self.gather_seconds = gather_seconds
        # Counters, read by the metrics (``queued`` is a property).
        self.written = 0
        self.spilled = 0
        self.dropped = 0
        self.write_errors = 0
        self.imported = 0
        self.duplicates = 0
        self.rejected = 0

        self._send, self._receive = trio.open_memory_channel[Row | trio.Event](queue_size)
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = False  # run() was called
        self._open = False  # the database thread runs and no close was asked for
        self._abandoned = False  # the writer gave up waiting for a job
        self._unavailable = False  # an outage: batches are spilled without a try
        self._next_pass = math.inf  # trio time of the next import pass (or reconnect)
        self._pass: spill.ImportPass | None = None  # the import pass under way
        self._writer_scope = trio.CancelScope()  # aclose() cancels it when the drain runs out
        self._db_closed = trio.Event()
        self._finished = trio.Event()  # run() is over, or never will run

    @property
    def queued(self) -> int:
        """Records (and flush markers) waiting in the queue now."""
        return self._receive.statistics().current_buffer_used

    @property
    def spill_path(self) -> Path | None:
        """This process's spill file (named after its pid); None for ``:memory:``."""
        base = self.database.spill_base
        return None if base is None else spill.spill_path(base, os.getpid())

    @property
    def unavailable(self) -> bool:
        """The database could not be reached at the last try: records are being spilled."""
        return self._unavailable

    # --- request side ---------------------------------------------------------

    async def submit(self, record: RequestRecord) -> None:
        """Queue ``record`` for the database, or spill it; never lose it.

        Never a cancel point (the body is shielded): a request task that is
        being cancelled still leaves its record, and the cancellation takes
        effect at its next checkpoint. Always a schedule point. Returns within
        ``submit_timeout`` seconds, plus one small file append when the queue
        stayed full that long or the store is closed (the record is spilled).
        Never raises.
        """
        try:
            row = record_to_row(record)
        except Exception:  # a bug upstream of here; the request must still end cleanly
            self.dropped += 1
            logger.exception("usage database: record dropped, it cannot be a row: %r", record)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        try:
            self._send.send_nowait(row)
        except trio.WouldBlock:
            pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._spill([row], "the usage store is closed")
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        with trio.move_on_after(self.submit_timeout, shield=True):
            try:
                await self._send.send(row)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._spill([row], "the usage store is closed")
            return
        self._spill([row], f"the queue stayed full for {self.submit_timeout} s")

    async def flush(self) -> None:
        """Wait until every record whose ``submit`` has returned is written or spilled.

        A checkpoint. Waits for :meth:`run` if it has not started. Cancelling
        it leaves a marker in the queue, which the writer ignores.
        """
        marker = trio.Event()
        try:
            await self._send.send(marker)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            await self._finished.wait()  # closed: the writer drains, then finishes
            return
        await marker.wait()

    async def call_on_connection(self, fn: Callable[[Any], T]) -> T:
        """Return ``fn(connection)``, called on the database thread after the jobs before it.

        ``connection`` is the driver's (``sqlite3.Connection`` or
        ``psycopg.Connection``). For reading the store's own database, which a
        ``:memory:`` database requires. ``fn`` blocks that thread, and so the
        writer: keep it short. A checkpoint. Cancelling it stops the wait, not ``fn``.
        """
        if not self._open:
            raise RuntimeError("the usage store is not running")
        return await self._call(lambda: fn(self.database.connection))

    # --- the writer -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: open the database, import spill files, write until closed.

        A checkpoint. Call it once, in a nursery that outlives the requests.
        With ``nursery.start`` it reports started once the database is open
        and the spill files imported (or the server found down: then it
        serves in an outage, above). It raises
        :class:`~trio_gateway._accounting.usage_db.UsageDatabaseError` (a
        :class:`SchemaError` among them) or a ``sqlite3.Error`` if the
        database cannot be used, having spilled anything already queued.
        Returns after :meth:`aclose` once every queued record is written or
        spilled (at once if ``aclose`` came first).

        Cancellation leaves nothing behind: the batch in flight and everything
        queued are spilled, and later submits spill. The database thread
        finishes the job it is in (a transaction commits or rolls back), then
        closes the connection; ``run`` waits for that up to 2 s, or not at all
        if the thread is busy with a job the writer gave up on.
        """
        if self._started:
            raise RuntimeError("UsageStore.run() can only be called once")
        self._started = True
        if self._finished.is_set():  # aclose() came first and spilled the queue
            task_status.started()
            await trio.lowlevel.checkpoint()
            return
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._serve_jobs, name="trio-gateway usage database", daemon=True
        )
        self._thread.start()
        self._open = True
        try:
            with self._receive:
                try:
                    with self._writer_scope:
                        await self._start()
                        task_status.started()
                        await self._write_until_closed()
                finally:
                    self._spill_queue("the usage writer stopped before writing them")
        finally:
            await self._stop_thread()
            self._finished.set()

    async def aclose(self) -> None:
        """Stop taking records; wait until the writer has written or spilled every one.

        A checkpoint. Later submits spill. The writer gets ``drain_timeout``
        seconds, then is cancelled (it spills what is left), so this returns
        within ``drain_timeout`` + 2 s. If :meth:`run` never started, what is
        queued is spilled at once. Cancelling ``aclose`` cuts the drain short
        the same way.
        """
        self._send.close()
        if not self._started:
            if not self._finished.is_set():
                with self._receive:
                    self._spill_queue("the usage store was closed before it ran")
                self._finished.set()
            await trio.lowlevel.checkpoint()
            return
        try:
            with trio.move_on_after(self.drain_timeout):
                await self._finished.wait()
        finally:
            if not self._finished.is_set():
                self._writer_scope.cancel("usage store drain timed out")
        await self._finished.wait()

    async def _start(self) -> None:
        """Open the database (or note it is down), then import what earlier runs spilled.

        A checkpoint. Raises what :meth:`UsageDatabase.open` raises, but
        :class:`DatabaseUnavailable`, which starts an outage instead.
        """
        try:
            await self._call(self._open_database)
        except DatabaseUnavailable as exc:
            self._enter_outage(exc)
            return
        self._next_pass = -math.inf
        while self._next_pass == -math.inf or self._pass is not None:
            await self._pass_step()

    async def _write_until_closed(self) -> None:
        """Write batches until closed; run an import step whenever one is due.

        A checkpoint. Cancellation: the batch in flight is spilled by
        :meth:`_write`; what is still queued stays there for the caller.
        """
        while True:
            rows, markers, closed = await self._take_batch()
            try:
                if rows:
                    await self._write(rows)
            finally:
                for marker in markers:
                    marker.set()
            if closed:
                return
            if self._pass is not None or trio.current_time() >= self._next_pass:
                await self._pass_step()

    async def _take_batch(self) -> tuple[list[Row], list[trio.Event], bool]:
        """Up to ``batch_size`` queued records, the flush markers among them, and whether
        the channel is closed and empty.

        Waits for the first record until the next pass is due, then
        ``gather_seconds`` for more (:meth:`_gather`); does not wait at all
        while a pass is under way (its next step is due at once).
        """
        rows: list[Row] = []
        markers: list[trio.Event] = []
        item: Row | trio.Event
        try:
            if self._pass is not None:
                item = self._receive.receive_nowait()
            else:
                with trio.move_on_at(self._next_pass) as waiting:
                    item = await self._receive.receive()
                if waiting.cancelled_caught:  # the pass came due first
                    return rows, markers, False
        except trio.WouldBlock:
            return rows, markers, False
        except trio.EndOfChannel:
            return rows, markers, True
        gathered = self._pass is not None or self.gather_seconds <= 0
        while True:
            if isinstance(item, trio.Event):
                markers.append(item)
            else:
                rows.append(item)
            if len(rows) >= self.batch_size:
                return rows, markers, False
            try:
                item = self._receive.receive_nowait()
            except trio.WouldBlock:
                if gathered or not rows:
                    return rows, markers, False
                gathered = True
                await self._gather(rows, markers)
                try:
                    item = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    return rows, markers, False
            except trio.EndOfChannel:  # closed: the next take says so
                return rows, markers, False

    async def _gather(self, rows: list[Row], markers: list[trio.Event]) -> None:
        """Let more records join ``rows`` for ``gather_seconds``. A checkpoint.

        Records submitted meanwhile only queue: no task switch per record,
        and one transaction (one trip to the database thread) per gathering
        rather than per record. Cancellation spills ``rows`` and releases
        the flush markers taken, as a cancelled write does.
        """
        try:
            await trio.sleep(self.gather_seconds)
        except trio.Cancelled:
            self._spill(rows, "the usage writer was cancelled while gathering them")
            for marker in markers:
                marker.set()
            raise

    async def _write(self, rows: list[Row]) -> None:
        """Write one batch on the database thread; on any failure spill it.

        A checkpoint. In an outage the batch is spilled at once. Cancellation
        stops the wait and spills the batch; the thread still finishes the
        transaction, so the batch may also be committed: its re-import then
        counts the rows as duplicates.
        """
        if self._unavailable:
            self._spill(rows, "the database is unavailable", quiet=True)
            return
        try:
            inserted = await self._call(lambda: self._write_batch(rows))
        except trio.Cancelled:
            self._spill(rows, "the usage writer was cancelled while writing them")
            raise
        except DatabaseUnavailable as exc:
            self._enter_outage(exc)
            self._spill(rows, "the database is unavailable")
            await self._drop_pass()
            return
        except Exception as exc:
            self.write_errors += 1
            logger.error(
                "usage database: writing %d record(s) failed: %r; spilling them",
                len(rows),
                exc,
                exc_info=not isinstance(exc, self.database.errors),
            )
            self._spill(rows, "the database write failed")
            return
        self.written += inserted
        self.duplicates += len(rows) - inserted

    def _write_batch(self, rows: Sequence[Row]) -> int:
        """On the database thread: insert ``rows`` in one transaction; return the new ones.

        Tests override it to make the database slow or failing.
        """
        return self.database.insert(rows)

    # --- import passes and outages --------------------------------------------------

    async def _pass_step(self) -> None:
        """One step of the import pass that is due: reconnect first in an outage, then import
        one chunk. When the pass ends (or fails) the next is due ``retry_interval`` later.

        A checkpoint. A failure is counted and logged, never raised. Cancellation
        stops the wait; the thread finishes the step, and the file stays claimed
        until the thread ends.
        """
        base = self.database.spill_base
        if self._unavailable:
            try:
                await self._call(self._open_database)
            except (DatabaseUnavailable, UsageDatabaseError) as exc:
                self.write_errors += 1
                self._schedule_pass()
                logger.warning(
                    "usage database: still unavailable (%s); retrying in %s s",
                    exc,
                    self.retry_interval,
                )
                return
            self._unavailable = False
            logger.warning(
                "usage database: %s is reachable again; importing the spilled records",
                self.database.where,
            )
        if base is None:
            self._schedule_pass()
            return
        if self._pass is None:
            self._pass = spill.ImportPass(
                base, chunk=self.batch_size, refused=self.database.refused
            )
        current = self._pass
        try:
            step = await self._call(lambda: current.step(self.database.insert))
        except DatabaseUnavailable as exc:
            self._pass = None  # the step dropped its file
            self._enter_outage(exc)
            return
        except Exception as exc:
            self._pass = None
            self.write_errors += 1
            self._schedule_pass()
            logger.error("usage database: importing spilled records failed: %r; kept the file", exc)
            return
        self.imported += step.inserted
        self.duplicates += step.duplicates
        self.rejected += step.rejected
        if step.finished is not None:
            self._log_import(step.finished)
        if not step.more:
            self._pass = None
            self._schedule_pass()

    def _log_import(self, result: spill.FileResult) -> None:
        logger.info(
            "usage database: imported %d spilled record(s) from %s (%d already there)",
            result.inserted,
            result.path.name,
            result.duplicates,
        )
        if result.rejected:
            assert self.database.spill_base is not None
            logger.error(
                "usage database: %d spilled line(s) could not be imported; kept in %s",
                result.rejected,
                spill.rejected_path(self.database.spill_base),
            )

    def _schedule_pass(self) -> None:
        self._next_pass = trio.current_time() + self.retry_interval

    def _enter_outage(self, exc: BaseException) -> None:
        """The database is unreachable: spill every batch until a pass reconnects."""
        self.write_errors += 1
        self._unavailable = True
        self._schedule_pass()
        logger.error(
            "usage database: %s; spilling records to %s and retrying every %s s",
            exc,
            self.spill_path,
            self.retry_interval,
        )

    async def _drop_pass(self) -> None:
        """Give up the pass under way (its file stays for a later pass). A checkpoint."""
        current, self._pass = self._pass, None
        if current is not None:
            await self._call(current.abandon)

    # --- spilling -------------------------------------------------------------------

    def _spill_queue(self, reason: str) -> None:
        """Spill everything still queued; release flush markers. Synchronous."""
        rows: list[Row] = []
        while True:
            try:
                item = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(item, trio.Event):
                item.set()
            else:
                rows.append(item)
        self._spill(rows, reason)

    def _spill(self, rows: Sequence[Row], reason: str, *, quiet: bool = False) -> None:
        """Append ``rows`` to this process's spill file, or count them dropped and log them.

        Never raises. Blocking, on purpose: one small append, so the records
        are safe before anyone returns. ``quiet``: log at DEBUG (an outage,
        already logged once at ERROR), not WARNING.
        """
        if not rows:
            return
        lines = spill.encode(rows)
        path = self.spill_path
        if path is not None:
            try:
                spill.append(path, lines)
            except OSError as exc:
                reason = f"{reason}, and writing {path} failed: {exc}"
            else:
                self.spilled += len(rows)
                logger.log(
                    logging.DEBUG if quiet else logging.WARNING,
                    "usage database: %d record(s) spilled to %s: %s",
                    len(rows),
                    path,
                    reason,
                )
                return
        self.dropped += len(rows)
        logger.error(
            "usage database: %d record(s) dropped (%s); here they are:\n%s",
            len(rows),
            reason,
            lines.decode("utf-8", "replace").rstrip("\n"),
        )

    # --- the database thread ------------------------------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the database thread and return what it returns.

        A checkpoint. Cancellation stops the wait, not the job: it still runs
        to its end, and the next jobs wait for it.
        """
        assert self._token is not None
        job = _Job(fn, self._token)
        self._jobs.put(job)
        try:
            await job.done.wait()
        except BaseException:
            if not job.done.is_set():
                job.abandoned = True
                self._abandoned = True
            raise
        return job.result()

    async def _stop_thread(self) -> None:
        """Ask the database thread to close the connection and end.

        Shielded: waits up to 2 s for the close, or not at all if a job was
        given up on (the thread may be stuck in it; it closes the connection
        when that job ends). Not a cancel point.
        """
        self._open = False
        self._jobs.put(None)
        if self._abandoned:
            return
        with trio.move_on_after(_CLOSE_GRACE, shield=True):
            await self._db_closed.wait()

    def _serve_jobs(self) -> None:
        """The database thread: run jobs in order until told to stop, then close."""
        try:
            while (job := self._jobs.get()) is not None:
                job.run()
        finally:
            if self._pass is not None:
                self._pass.abandon()
            self.database.close()
            assert self._token is not None
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._db_closed.set)

    def _open_database(self) -> None:
        """On the database thread: make the spill folder, then open the database."""
        base = self.database.spill_base
        if base is not None and not base.parent.is_dir():
            try:
                base.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageDatabaseError(
                    f"cannot make the spill folder {base.parent}: {exc.strerror}"
                ) from None
        self.database.open()
