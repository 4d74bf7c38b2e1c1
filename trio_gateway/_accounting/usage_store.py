"""The usage database (the usage store): one row per finished request, in SQLite.

The rows themselves (schema, row mapping, spill lines) are
:mod:`~trio_gateway._accounting.usage_rows`; the spill file is
:mod:`~trio_gateway._accounting.spill`. This module is the blocking
database code, run on the database thread, and the Trio store around it.

Theory of operation
===================

::

    request tasks --submit()--> channel(queue_size) --> [writer task: run()] --jobs--> [db thread]
          |                                                   |                           |
          +--- queue still full after submit_timeout ---------+--- write error ----> spill file

1. **Request tasks own nothing here.** Each calls :meth:`UsageStore.submit`
   once, when its request ends, often from a task that is being cancelled
   (client disconnect, shutdown). ``submit`` runs shielded, so the
   cancellation cannot lose the record, and is bounded by ``submit_timeout``,
   so a slow database cannot hold a request. The send end of the channel
   belongs to the store itself; :meth:`UsageStore.aclose` closes it.
2. **The writer task** (:meth:`UsageStore.run`) **owns the receive end** and
   closes it with ``with`` on every way out. It takes whatever is queued (up
   to ``batch_size`` records) and hands the batch to the database thread,
   which inserts it in one transaction. Only the writer task waits for that;
   the event loop keeps running. :meth:`UsageStore.flush` waits until every
   record submitted so far is written (or spilled).
3. **The database thread owns the sqlite connection** for its whole life: it
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
that it **spills** the record: it appends one JSON line to the spill file
(``<database>.spill.jsonl``), synchronously, on the event loop. The line is
a few hundred bytes, and the alternative is to hold the client. The next
:meth:`UsageStore.run` imports the spill file before it takes new records.
Records that a failed write (sqlite error, counted in ``write_errors`` and
logged) or a cancelled writer leaves behind are spilled the same way. So the
client never waits more than ``submit_timeout`` on accounting, and the
database catches up at the next start.

Spilling is better than the other two policies. Waiting without a bound
would make the client stream wait on a disk. Counting drops would lose
billing data exactly when traffic peaks. ``request_id`` is unique in the
table, so a record written twice (a batch spilled after its commit had
already begun) is stored once. The copy counts in ``duplicates``.

The spill file belongs to one gateway process (one process per database).
Appends are not fsynced: they survive a crash of the gateway, not of the
machine. The file's own rules (its names, the claim by renaming, what is
rejected) are in :mod:`~trio_gateway._accounting.spill`.

If the record cannot be spilled either (no spill file for ``:memory:``, or the
file cannot be written), it is counted in ``dropped``, and its row is logged
at ERROR level as JSON, so even then it is not silent.

The counters (plain ints, read by the metrics module): ``queued`` (the
current queue length), ``written``, ``spilled``, ``dropped``,
``write_errors``, ``imported``, ``duplicates`` and ``rejected`` (spilled
lines that could not be imported; they are kept in ``<spill>.rejected``).

Shutdown: :meth:`UsageStore.aclose` closes the send end, so any later
``submit`` spills. The writer then writes everything still queued, and
``aclose`` waits for it at most ``drain_timeout`` seconds. After that it
cancels the writer, which spills what is left. ``aclose`` returns at most
``drain_timeout`` + 2 s after it was called: the 2 s are for closing the
connection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from trio_gateway._accounting import spill
from trio_gateway._accounting.usage_rows import INSERT, SCHEMA, SCHEMA_VERSION, Row, record_to_row
from trio_gateway._core.record import RequestRecord

__all__ = ["SchemaError", "UsageStore", "connect"]

logger = logging.getLogger("trio_gateway.usage")

T = TypeVar("T")

_BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's lock
_CLOSE_GRACE = 2.0  # seconds given to closing the connection at the end of run()
# A row that fails for one of these would fail again: it is rejected, not retried.
_BAD_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


class SchemaError(Exception):
    """The database is not one this version of trio-gateway can use."""


# --- the database (blocking: runs on the database thread) ----------------------


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the usage database at ``path`` and bring it to :data:`SCHEMA_VERSION`.

    Blocking. WAL mode (``:memory:`` has none), autocommit: callers write their
    own ``BEGIN``/``COMMIT``. Raises :class:`SchemaError` for a database made
    by a newer trio-gateway, or one with a ``requests`` table it did not make.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: safe from crashes, cheap commits
        conn.execute("BEGIN IMMEDIATE")
        try:
            _migrate(conn, path)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: str | Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: the usage database has schema version {version}, newer than this"
            f" trio-gateway knows ({SCHEMA_VERSION}); upgrade trio-gateway or point"
            " [accounting] database at another file"
        )
    if version == SCHEMA_VERSION:
        return
    found = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'requests'").fetchone()
    if found[0]:
        raise SchemaError(
            f"{path}: has a 'requests' table but no schema version:"
            " not a trio-gateway usage database"
        )
    # One statement at a time: executescript() would commit the open transaction.
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _insert(conn: sqlite3.Connection, rows: Sequence[Row]) -> int:
    """Insert ``rows`` in one transaction; return how many were new (not duplicates)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        inserted = conn.executemany(INSERT, rows).rowcount
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return int(inserted)


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

    ``path`` is a file, or ``":memory:"`` (then there is no spill file, and a
    record that would be spilled is counted in ``dropped`` and logged).
    ``queue_size`` records wait in memory at most; the writer inserts up to
    ``batch_size`` per transaction; ``submit`` waits at most
    ``submit_timeout`` seconds for room; ``aclose`` gives the writer
    ``drain_timeout`` seconds to write what is queued (``math.inf``: no limit).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        queue_size: int = 1024,
        batch_size: int = 256,
        submit_timeout: float = 1.0,
        drain_timeout: float = 10.0,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be at least 1")
        for name, value in (("submit_timeout", submit_timeout), ("drain_timeout", drain_timeout)):
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        self.path = path
        self.spill_path = spill.spill_path(path)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.submit_timeout = submit_timeout
        self.drain_timeout = drain_timeout
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
        self._conn: sqlite3.Connection | None = None  # only the database thread touches it
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = False  # run() was called
        self._open = False  # the connection is open and no close was asked for
        self._abandoned = False  # the writer gave up waiting for a job
        self._writer_scope = trio.CancelScope()  # aclose() cancels it when the drain runs out
        self._db_closed = trio.Event()
        self._finished = trio.Event()  # run() is over, or never will run

    @property
    def queued(self) -> int:
        """Records (and flush markers) waiting in the queue now."""
        return self._receive.statistics().current_buffer_used

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

    async def call_on_connection(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Return ``fn(connection)``, called on the database thread after the jobs before it.

        For reading the store's own database, which a ``:memory:`` database
        requires. ``fn`` blocks that thread, and so the writer: keep it short.
        A checkpoint. Cancelling it stops the wait, not ``fn``.
        """
        if not self._open:
            raise RuntimeError("the usage store is not running")
        return await self._call(lambda: fn(self._connection()))

    # --- the writer -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: open the database, import the spill file, write until closed.

        A checkpoint. Call it once, in a nursery that outlives the requests.
        With ``nursery.start`` it reports started once the database is open and
        the spill file imported, or raises :class:`SchemaError` (or a
        ``sqlite3.Error``) if the database cannot be used, having spilled
        anything already queued. Returns after :meth:`aclose` once every
        queued record is written or spilled (at once if ``aclose`` came first).

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
        try:
            with self._receive:
                try:
                    with self._writer_scope:
                        await self._call(self._open_database)
                        self._open = True
                        await self._import_spill()
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

    async def _write_until_closed(self) -> None:
        """Take what is queued, up to ``batch_size`` records, and write it; until closed.

        A checkpoint. Cancellation: the batch in flight is spilled by
        :meth:`_write`; what is still queued stays there for the caller.
        """
        while True:
            try:
                item = await self._receive.receive()
            except trio.EndOfChannel:
                return
            rows: list[Row] = []
            markers: list[trio.Event] = []
            while True:
                if isinstance(item, trio.Event):
                    markers.append(item)
                else:
                    rows.append(item)
                if len(rows) >= self.batch_size:
                    break
                try:
                    item = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                if rows:
                    await self._write(rows)
            finally:
                for marker in markers:
                    marker.set()

    async def _write(self, rows: list[Row]) -> None:
        """Write one batch on the database thread; on any failure spill it.

        A checkpoint. Cancellation stops the wait and spills the batch; the
        thread still finishes the transaction, so the batch may also be
        committed: its re-import then counts the rows as duplicates.
        """
        try:
            inserted = await self._call(lambda: self._write_batch(rows))
        except trio.Cancelled:
            self._spill(rows, "the usage writer was cancelled while writing them")
            raise
        except Exception as exc:
            self.write_errors += 1
            logger.error(
                "usage database: writing %d record(s) failed: %r; spilling them",
                len(rows),
                exc,
                exc_info=not isinstance(exc, sqlite3.Error),
            )
            self._spill(rows, "the database write failed")
            return
        self.written += inserted
        self.duplicates += len(rows) - inserted

    def _write_batch(self, rows: Sequence[Row]) -> int:
        """On the database thread: insert ``rows`` in one transaction; return the new ones.

        Tests override it to make the database slow or failing.
        """
        return _insert(self._connection(), rows)

    async def _import_spill(self) -> None:
        """Import what earlier runs spilled: first a file whose import was cut short, then the
        spill file. A checkpoint. A failure is counted, logged, and leaves the file for the
        next start. Cancellation stops the wait; the thread finishes the import.
        """
        if self.spill_path is None:
            return
        importing = spill.importing_path(self.spill_path)
        rejected_path = spill.rejected_path(self.spill_path)
        for _ in range(2):
            if not spill.claim(self.spill_path):
                return
            try:
                inserted, duplicates, rejected = await self._call(
                    functools.partial(self._import_file, importing, rejected_path)
                )
            except Exception as exc:
                self.write_errors += 1
                logger.error("usage database: importing %s failed: %r; kept it", importing, exc)
                return
            self.imported += inserted
            self.duplicates += duplicates
            self.rejected += rejected
            logger.info(
                "usage database: imported %d spilled record(s) (%d already there)",
                inserted,
                duplicates,
            )
            if rejected:
                logger.error(
                    "usage database: %d spilled line(s) could not be imported; kept in %s",
                    rejected,
                    rejected_path,
                )

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

    def _spill(self, rows: Sequence[Row], reason: str) -> None:
        """Append ``rows`` to the spill file, or count them dropped and log them. Never raises.

        Blocking, on purpose: one small append, so the records are safe before
        anyone returns.
        """
        if not rows:
            return
        lines = spill.encode(rows)
        if self.spill_path is not None:
            try:
                spill.append(self.spill_path, lines)
            except OSError as exc:
                reason = f"{reason}, and writing {self.spill_path} failed: {exc}"
            else:
                self.spilled += len(rows)
                logger.warning(
                    "usage database: %d record(s) spilled to %s: %s",
                    len(rows),
                    self.spill_path,
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
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
            assert self._token is not None
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._db_closed.set)

    def _import_file(self, path: Path, rejected_path: Path) -> tuple[int, int, int]:
        insert = functools.partial(_insert, self._connection())
        return spill.import_file(
            path, rejected_path, insert, chunk=self.batch_size, refused=_BAD_ROW_ERRORS
        )

    def _open_database(self) -> None:
        self._conn = connect(self.path)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the usage database is not open")
        return self._conn
