"""The streaming pipeline: upstream reader -> rewriter -> client writer.

Theory of operation
===================

One streamed answer runs in one nursery: a reader task and the writer
joined by one zero-buffer memory channel. A watchdog times them: the
gateway's one :class:`Watchdog` task, shared by all its streams, or (when
``stream_events`` is called without one) a watchdog of the stream's own in
its nursery::

    upstream --raw bytes--> [reader task] --channel(0)--> [writer] --ASGI send--> client
                                  ^                      ^   rewriter (pure, inline)
                                  +---- [watchdog] ------+
                       cancels the reader's scope   hands the writer the keepalive word

1. **The reader task owns the upstream response and the channel's send end.**
   It reads one chunk at a time (whatever one upstream read produced), hands
   it over, and only then reads again. A zero-buffer channel means the
   hand-over completes only when the writer takes the chunk, so a slow client
   slows the upstream read: backpressure is the structure, not a policy.
   Memory in flight is bounded by the chunk being handed over, the batch the
   writer is sending (about ``_BATCH_BYTES`` of chunks that had already
   arrived, see :func:`_write_client`), and the rewriter's unfinished event
   (at most ``max_event_bytes``). The reader closes the upstream response on
   every way out (shielded, bounded): that socket closing is what makes a
   provider stop generating and billing.
2. **The writer (the request's own task) owns the receive end.** It feeds each
   chunk to the :class:`~trio_gateway._rewrite.base.StreamRewriter` inline (pure
   CPU work; a task of its own would add a switch per chunk and overlap
   nothing) and sends the whole items that come out, those of several chunks
   in one send when the reader can hand them over without a network read.
   Because it only ever sends whole items, the keepalive comment it sends
   after ``keepalive`` seconds without a chunk can never split an event.
3. **Failures travel as data.** An upstream error after headers (reset,
   truncation, idle timeout, shutdown) is caught at the boundary in the reader
   and handed over as a :class:`~trio_gateway._core.kinds.Failure`. The writer
   turns it into the kind's error event, so a failure is never mistaken for a
   clean end and a ``[DONE]`` never follows it.
4. **The upstream closes before the ending goes out.** The last bytes (the
   clean tail, or the error event) are sent only after the nursery has
   exited, that is after the reader has closed the upstream: a client that
   is slow to take the ending cannot keep a provider generating.
5. **Who cancels what.**

   * Client disconnect: the request's disconnect watcher cancels the scope
     around this whole pipeline. Both tasks unwind; the reader's ``finally``
     closes upstream; nothing more is sent.
   * Client stall: the reader gives up handing a chunk over after
     ``client_stall`` seconds, closes upstream and leaves. The writer may be
     stuck inside hypercorn's ``send``, which shields its socket write: if
     the client reads again the writer ends the stream with the error event;
     if it leaves, the send fails and nothing more is sent (see
     docs/cancellation.md).
   * Idle timeout and shutdown cancel the reader's one timer scope (in a
     read or a hand-over; idle and stall by the watchdog, shutdown through
     :class:`~trio_gateway._proxy.upstream.ExchangeControl`), never the
     reader itself, so it can still close the upstream and hand the failure
     over.
   * When the writer returns, ``stream_events`` cancels the reader (and a
     watchdog of the stream's own, if it runs one) with a reason, and the
     stream leaves the shared watchdog's heap.

6. **Timers without deadline moves, and without a task per stream.** The
   reader and the writer only stamp when each wait began (:class:`_Clocks`).
   The :class:`Watchdog` keeps every stream it times in a heap ordered by
   when to look at it next, sleeps until the first look, and acts then
   (:meth:`_Clocks.look`): it cancels the reader's scope, or hands a waiting
   writer the keepalive word with ``send_nowait`` on the reader's send end,
   which never blocks. So it owns no channel end and never waits on a
   stream. A stream is looked at when its earliest deadline falls due, and
   never later than its shortest timeout after the last look: a wait
   stamped after that look cannot end sooner, so every timer fires at its
   exact deadline. A stream registers when it starts and marks itself ended
   when its nursery exits, whatever the way out; the watchdog drops ended
   streams as it meets them, or all at once when they are over half its
   heap. A task per stream cost each stream about 2.8 KiB and 70 µs
   (``python -m bench._micro``); a heap entry costs a tuple.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Protocol

import httpx
import trio

from trio_gateway._core.config import Timeouts
from trio_gateway._core.kinds import Failure, FailureType
from trio_gateway._proxy.upstream import (
    HTTPX_ERRORS,
    ExchangeControl,
    close_response,
    failure_of,
    idle_failure,
    raw_chunks,
)
from trio_gateway._rewrite.base import StreamRewriter

__all__ = [
    "KEEPALIVE_COMMENT",
    "LATENCY_SAMPLE",
    "ClientBody",
    "StreamObserver",
    "StreamResult",
    "Watchdog",
    "stream_events",
]

KEEPALIVE_COMMENT = b": keepalive\n\n"
_BATCH_BYTES = 64 * 1024  # the most rewritten bytes gathered for one send
# The longest a batch may wait for more: each pass of a busy scheduler runs
# every other stream, so gathering must not cost an event more than this.
_BATCH_SECONDS = 0.005
# One send in this many reports its added latency (the first of each stream
# included): an unbiased sample of the distribution, for an eighth of the cost
# of a histogram update per send (see docs/operations.md, "Added latency").
LATENCY_SAMPLE = 8


class StreamObserver(Protocol):
    """Who watches a stream go by (metrics). Both calls are cheap and not checkpoints."""

    def keepalive_sent(self) -> None:
        """A keepalive comment went to the client."""

    def chunk_forwarded(self, latency: float) -> None:
        """Rewritten bytes of one or more upstream chunks (a batch) were handed to the server.

        Called for one send in ``LATENCY_SAMPLE`` of each stream: the first,
        and every ``LATENCY_SAMPLE``-th after it. ``latency`` is the
        gateway's own added delay: seconds from the arrival from upstream of
        the batch's first chunk to that hand-off.
        """


class ClientBody(Protocol):
    """Where the writer puts the response body (the ASGI ``send``, or a test double)."""

    async def send(self, data: bytes) -> None:
        """Send part of the body. A checkpoint."""

    async def end(self, data: bytes) -> None:
        """Send the last part of the body and end it. A checkpoint."""


@dataclass(slots=True)
class StreamResult:
    """How a stream ended; ``failure`` is None for a clean end."""

    failure: Failure | None = None
    first_content_at: float | None = None  # first content token handed to the server
    arrived_at: float = 0.0  # when the chunk now being handed over came from upstream


class _Keepalive:
    """The watchdog's word to a writer that has waited ``keepalive`` seconds: send a comment."""


_KEEPALIVE = _Keepalive()
_NOTHING = _Keepalive()  # the writer's "no item yet"; never sent
_ChannelItem = bytes | Failure | _Keepalive


class _Clocks:
    """One stream's timers: when each task's current wait began, stamped by the tasks,
    read by the watchdog.

    Plain attribute stores, so timing a wait costs no cancel-scope deadline
    move. ``read_since`` or ``handover_since`` (while ``handing_over``) is
    the reader's; ``writer_since`` is the writer's while it waits for a
    chunk (infinity otherwise). ``fired`` says which timer the watchdog
    fired on the reader's ``scope``; ``watched`` turns false when the
    stream ends, and the watchdog then drops it.
    """

    __slots__ = (
        "fired",
        "handing_over",
        "handover_since",
        "idle",
        "keepalive",
        "read_since",
        "scope",
        "stall",
        "step",
        "to_writer",
        "watched",
        "writer_since",
    )

    def __init__(
        self, now: float, timeouts: Timeouts, to_writer: trio.MemorySendChannel[_ChannelItem]
    ) -> None:
        self.read_since = now
        self.handover_since = now
        self.handing_over = False
        self.writer_since = math.inf
        self.scope = trio.CancelScope()  # the reader's timer, entered by the reader
        self.fired: FailureType | None = None
        self.idle = timeouts.idle
        self.stall = timeouts.client_stall
        self.keepalive = timeouts.keepalive
        self.step = min(self.idle, self.stall, self.keepalive)
        self.to_writer = to_writer  # for the keepalive word; the watchdog never blocks on it
        self.watched = True

    def look(self, now: float) -> float | None:
        """Act on what is due at ``now``; return when to look next, or None to stop.

        Cancels the reader's scope when its read outlasted ``idle`` or its
        hand-over ``client_stall`` (and stops), or hands a waiting writer
        the keepalive word. The next look is at the earliest deadline the
        stamps give, and never later than ``step`` (the shortest timeout)
        from now: a wait stamped after this look cannot end sooner, so every
        timer fires at its exact deadline. A writer that is busy when its
        keepalive falls due was not silent, and gets none. Not a checkpoint.
        """
        if self.handing_over:
            reader_due, why = self.handover_since + self.stall, FailureType.CLIENT_STALL
        else:
            reader_due, why = self.read_since + self.idle, FailureType.IDLE_TIMEOUT
        if reader_due <= now:
            self.fired = why
            self.scope.cancel(reason=why.value)
            return None
        writer_due = self.writer_since + self.keepalive
        if writer_due <= now:
            self.writer_since = writer_due = math.inf
            try:
                self.to_writer.send_nowait(_KEEPALIVE)
            except trio.WouldBlock:
                pass  # the writer is busy sending: not silent
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
        return min(reader_due, writer_due, now + self.step)


class Watchdog:
    """The timers of many streams in one task: idle, client stall and keepalive.

    Each watched stream is looked at (:meth:`_Clocks.look`) when its next
    look falls due; a heap orders the looks, and :meth:`run` sleeps until
    the first. One task for every stream of a gateway, rather than one per
    stream, saves each stream a task's memory and start and cancellation.
    :meth:`watch` and :meth:`forget` are called by the streams, and are not
    checkpoints.
    """

    __slots__ = ("_forgotten", "_looks", "_numbers", "_sleep")

    def __init__(self) -> None:
        self._looks: list[tuple[float, int, _Clocks]] = []
        self._numbers = itertools.count()  # ties in time go in order of arrival
        self._sleep = trio.CancelScope()  # the current sleep of run(), or a spent scope
        self._forgotten = 0  # ended streams still in the heap

    def watch(self, clocks: _Clocks, now: float) -> None:
        """Start timing ``clocks`` from ``now``: its first look is one ``step`` later.

        Nothing of a stream can fall due sooner, as every stamp is ``now`` or
        later. Timers that are all off (infinite) are not watched.
        """
        if math.isinf(clocks.step):
            clocks.watched = False  # no timer; a shutdown stop goes through ExchangeControl
            return
        due = now + clocks.step
        heapq.heappush(self._looks, (due, next(self._numbers), clocks))
        if due < self._sleep.deadline:
            self._sleep.deadline = due

    @property
    def size(self) -> int:
        """Streams in the heap: those watched, and ended ones not yet dropped."""
        return len(self._looks)

    def forget(self, clocks: _Clocks) -> None:
        """Stop timing ``clocks``; it leaves the heap at its next look, or sooner.

        Once ended streams are over half the heap, the heap is rebuilt
        without them, so they cost memory for a bounded share only.
        """
        if not clocks.watched:
            return
        clocks.watched = False
        self._forgotten += 1
        looks = self._looks
        if self._forgotten > 32 and 2 * self._forgotten > len(looks):
            looks[:] = [entry for entry in looks if entry[2].watched]
            heapq.heapify(looks)
            self._forgotten = 0

    async def run(self) -> None:
        """Look at each stream when it falls due, for ever. A checkpoint; runs until cancelled."""
        looks = self._looks
        while True:
            with trio.CancelScope(deadline=looks[0][0] if looks else math.inf) as self._sleep:
                await trio.sleep_forever()
            now = trio.current_time()
            while looks and looks[0][0] <= now:
                _, _, clocks = heapq.heappop(looks)
                if not clocks.watched:
                    self._forgotten -= 1
                elif (due := clocks.look(now)) is not None:
                    heapq.heappush(looks, (due, next(self._numbers), clocks))
                else:
                    clocks.watched = False  # it fired, or its stream is over


async def _read_upstream(
    response: httpx.Response,
    to_writer: trio.MemorySendChannel[_ChannelItem],
    timeouts: Timeouts,
    control: ExchangeControl,
    result: StreamResult,
    clocks: _Clocks,
) -> None:
    """Reader task: owns ``response`` and ``to_writer``; closes both on every way out.

    A clean upstream end closes the channel. On a failure the upstream is
    closed first, then the failure is handed over.
    """
    try:
        with to_writer:
            failure = await _pump(response, to_writer, timeouts, control, result, clocks)
            if failure is not None:
                # Recorded before the hand-over: a writer stuck on a stalled client
                # may never take it, and must still not end the stream cleanly.
                result.failure = failure
                await close_response(response)
                with trio.move_on_after(timeouts.client_stall):
                    with contextlib.suppress(trio.BrokenResourceError):
                        await to_writer.send(failure)
    finally:
        await close_response(response)


async def _pump(
    response: httpx.Response,
    to_writer: trio.MemorySendChannel[_ChannelItem],
    timeouts: Timeouts,
    control: ExchangeControl,
    result: StreamResult,
    clocks: _Clocks,
) -> Failure | None:
    """Read chunks and hand each over until the end; return the upstream's failure, if any.

    A checkpoint. Each wait is stamped in ``clocks`` (a read, or a hand-over
    the writer was not ready for) and timed by the :class:`Watchdog`, which cancels
    ``clocks.scope`` when ``idle`` or ``client_stall`` runs out. A chunk the
    writer is already waiting for is handed over with ``send_nowait``: no
    task switch of its own. A client that stalls is recorded in ``result``
    and ends the pump quietly.
    """
    async with raw_chunks(response) as chunks:
        if (stopped := control.stopped()) is not None:  # before the first read
            return stopped
        with clocks.scope as timer, control.guarded(timer):
            now = trio.current_time()
            while True:
                clocks.read_since = now
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return None
                except HTTPX_ERRORS as exc:
                    return failure_of(exc, "stream")
                now = result.arrived_at = trio.current_time()
                try:
                    to_writer.send_nowait(chunk)  # the writer was waiting for it
                except trio.WouldBlock:
                    clocks.handover_since = now
                    clocks.handing_over = True
                    try:
                        await to_writer.send(chunk)
                    except trio.BrokenResourceError:  # the writer has already finished
                        return None
                    clocks.handing_over = False
                    now = trio.current_time()
                except trio.BrokenResourceError:
                    return None
    # The watchdog fired, or the exchange was stopped.
    if (stopped := control.stopped()) is not None:
        return stopped
    if clocks.fired is FailureType.IDLE_TIMEOUT:
        return idle_failure(timeouts.idle)
    stall = timeouts.client_stall
    result.failure = Failure(FailureType.CLIENT_STALL, f"client took nothing for {stall:g} s")
    return None


class _Batch:
    """Rewritten bytes gathered for one send, with when and since when they waited.

    ``arrived_at``: when the first chunk came from upstream (for the added
    latency metric); ``started_at``: when the writer began gathering (None
    until :meth:`full` is first called).
    """

    __slots__ = ("arrived_at", "parts", "size", "started_at")

    def __init__(self) -> None:
        # Joined once, at take(): adding to one bytes object would copy it per chunk.
        self.parts: list[bytes] = []
        self.size = 0
        self.arrived_at = 0.0
        self.started_at: float | None = None

    def add(self, out: bytes, arrived_at: float) -> None:
        if out:
            if not self.size:
                self.arrived_at = arrived_at
            self.parts.append(out)
            self.size += len(out)

    def full(self) -> bool:
        """Whether to send now rather than wait for the reader's next chunk.

        Called when a chunk was waiting for the writer. The first call of a
        batch starts its clock: no checkpoint came since any chunk was added,
        so that is when gathering began; a chunk the writer waited for and
        sends alone never reads the clock.
        """
        now = trio.current_time()
        if self.started_at is None:
            self.started_at = now
        return self.size >= _BATCH_BYTES or (
            self.size > 0 and now - self.started_at >= _BATCH_SECONDS
        )

    def take(self) -> bytes:
        """The gathered bytes (one chunk's go out as they are, uncopied); empties the batch."""
        data = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        self.started_at = None
        return data


async def _write_client(
    from_reader: trio.MemoryReceiveChannel[_ChannelItem],
    rewriter: StreamRewriter,
    body: ClientBody,
    result: StreamResult,
    observer: StreamObserver | None,
    clocks: _Clocks,
) -> bytes:
    """Writer: owns ``from_reader``; sends rewritten items and keepalives.

    Returns the ending to send once the upstream is closed: the clean tail,
    or the error event if the stream failed. Before each wait for a chunk it
    stamps ``clocks.writer_since``; the watchdog hands it the keepalive word
    over the channel once that wait has lasted ``keepalive`` seconds, so the
    comment goes out between whole items, and no cancel scope is needed.

    **Batching.** One upstream read often brings many chunks (a provider
    flushes each event as an HTTP chunk, and httpx yields them one by one),
    and one send per chunk would cost a system call each. When the reader
    is ahead (a chunk was waiting), the writer gives it two scheduler passes
    to hand over its next chunk, which it has only if no network read was
    needed, and so on; then it sends all it gathered at once, up to
    ``_BATCH_BYTES`` and for at most ``_BATCH_SECONDS`` (a pass of a busy
    scheduler can take milliseconds). A chunk the writer had to wait for is
    sent at once: batching never waits on the network. One send in
    ``LATENCY_SAMPLE`` reports its added latency to ``observer``.
    """
    batch = _Batch()
    sends = 0

    async def flush() -> None:
        nonlocal sends
        data = batch.take()
        if observer is not None and not sends % LATENCY_SAMPLE:
            observer.chunk_forwarded(trio.current_time() - batch.arrived_at)
        sends += 1
        await body.send(data)
        if result.first_content_at is None and rewriter.policy.content_started:
            result.first_content_at = trio.current_time()

    with from_reader:
        yields_left = 0  # scheduler passes to give a reader that is ahead
        while True:
            item: _ChannelItem | None = _NOTHING
            # The channel holds nothing: only a reader blocked in its hand-over
            # has a chunk to take without waiting. Its flag is asked first, as a
            # receive_nowait that finds nothing costs an exception.
            if clocks.handing_over:
                try:
                    item = from_reader.receive_nowait()
                except trio.WouldBlock:
                    pass  # taken already; the reader has not run since
                except trio.EndOfChannel:
                    item = None
                else:
                    yields_left = 0 if batch.full() else 2
            if item is _NOTHING:
                if yields_left:  # it may hold chunks that need no network read
                    # Two passes: Trio may run the writer first in the next one.
                    yields_left -= 1
                    await trio.lowlevel.checkpoint()
                    continue
                if batch.size:
                    await flush()
                    continue
                batch.started_at = None  # chunks that completed no event started none
                clocks.writer_since = trio.current_time()
                try:
                    item = await from_reader.receive()  # takes a chunk handed over meanwhile too
                except trio.EndOfChannel:
                    return _clean_ending(rewriter, result)
                clocks.writer_since = math.inf
                if item is _KEEPALIVE:
                    await body.send(KEEPALIVE_COMMENT)
                    if observer is not None:
                        observer.keepalive_sent()
                    continue
            if item.__class__ is not bytes:  # the end, or a failure
                if batch.size:  # events before the end go out as they would have
                    await flush()
                if not isinstance(item, Failure):
                    return _clean_ending(rewriter, result)
                result.failure = item
                return rewriter.fail(item)
            batch.add(rewriter.feed(item), result.arrived_at)
            if rewriter.failure is not None:  # invalid or runaway upstream bytes
                if batch.size:  # the events before it go out as they would have
                    await flush()
                result.failure = rewriter.failure
                return rewriter.fail(rewriter.failure)


def _clean_ending(rewriter: StreamRewriter, result: StreamResult) -> bytes:
    """The ending once the reader closed the channel without handing a failure over.

    Complete only if the kind's end arrived: a body that ended before it is
    a truncation, and ends with the kind's error event like any failure.
    """
    if result.failure is not None:  # the reader gave up on a stalled client
        return rewriter.fail(result.failure)
    tail = rewriter.finish()
    if rewriter.failure is not None:
        result.failure = rewriter.failure
        return tail + rewriter.fail(rewriter.failure)
    return tail


async def stream_events(
    response: httpx.Response,
    rewriter: StreamRewriter,
    body: ClientBody,
    timeouts: Timeouts,
    control: ExchangeControl,
    observer: StreamObserver | None = None,
    result: StreamResult | None = None,
    watchdog: Watchdog | None = None,
) -> StreamResult:
    """Stream ``response``'s events through ``rewriter`` to ``body``; say how it ended.

    Takes ownership of ``response`` (closed on return or cancellation). The
    caller has sent the response start. A checkpoint; on cancellation the
    upstream is closed and the client body is left unfinished, so no client
    can mistake it for a clean end. Pass ``result`` to read how far the
    stream got even when it is cancelled. ``watchdog`` times the stream if
    given (its :meth:`Watchdog.run` must be running); else a watchdog of its
    own runs in the stream's nursery.
    """
    result = result if result is not None else StreamResult()
    send_chan, receive_chan = trio.open_memory_channel[_ChannelItem](0)
    now = trio.current_time()
    clocks = _Clocks(now, timeouts, send_chan)
    private = watchdog is None
    if watchdog is None:
        watchdog = Watchdog()
    try:
        async with trio.open_nursery() as nursery:
            if private:
                nursery.start_soon(watchdog.run)
            watchdog.watch(clocks, now)
            nursery.start_soon(
                _read_upstream, response, send_chan, timeouts, control, result, clocks
            )
            ending = await _write_client(receive_chan, rewriter, body, result, observer, clocks)
            nursery.cancel_scope.cancel(reason="client writer finished")
    finally:
        watchdog.forget(clocks)
    await body.end(ending)
    return result
