"""The load generator: HTTP/1.1 over raw trio sockets with h11, reading SSE just enough to time it.

One stream is one connection: connect, send one request, read the answer
with h11 and cut its body at blank lines. A block that is not a comment is
an event and gets the arrival time of the read that completed it. Times are
``time.monotonic()`` (CLOCK_MONOTONIC), which other processes on the machine
share, so the cancel scenario can compare them with the mock's.

Nothing here parses an event's data: the client must cost as little as
possible, and it counts events, it does not check them (the test suite does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["StreamLog", "Target", "count_events", "run_stream"]

_READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Target:
    """One request to send: ``POST path`` to ``127.0.0.1:port``."""

    port: int
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def send(self, client: h11.Connection) -> bytes:
        """Put the whole request, head and body, through ``client``; return its bytes."""
        headers = [
            ("host", f"127.0.0.1:{self.port}"),
            ("content-type", "application/json"),
            ("content-length", str(len(self.body))),
            *self.headers,
        ]
        parts = [
            client.send(h11.Request(method="POST", target=self.path, headers=headers)),
            client.send(h11.Data(data=self.body)),
            client.send(h11.EndOfMessage()),
        ]
        return b"".join(part or b"" for part in parts)


@dataclass(slots=True)
class StreamLog:
    """What the client saw of one stream. Filled in as it goes, so a cancelled stream keeps it."""

    started: float = 0.0
    """Just before the request was sent."""
    first_byte_at: float | None = None
    """When the first response byte arrived."""
    events: list[float] = field(default_factory=list)
    """The arrival time of each event (comments excluded)."""
    body_bytes: int = 0
    status: int = 0
    complete: bool = False
    """The body ended normally (the terminating chunk arrived)."""
    error: str | None = None
    closed_at: float | None = None
    """When the client closed its socket."""

    @property
    def ttfb(self) -> float | None:
        """Seconds from sending the request to the first response byte."""
        return None if self.first_byte_at is None else self.first_byte_at - self.started


def count_events(body: bytes) -> int:
    """How many events (not comments) :func:`run_stream` counts in ``body``, read whole."""
    return sum(1 for block in body.split(b"\n\n")[:-1] if block and block[:1] != b":")


async def run_stream(
    target: Target,
    log: StreamLog,
    *,
    stop_after_events: int | None = None,
    read_rate: float | None = None,
    opening: trio.Semaphore | None = None,
) -> None:
    """Send ``target``'s request and read the answer into ``log``.

    A checkpoint. Reads to the end of the body, or closes the connection once
    ``stop_after_events`` events arrived, reading at most ``read_rate`` bytes
    per second when given. ``opening``, if given, is held from before the
    connect until the response head arrived, to bound how many connections
    are being opened at once. Failures are recorded in ``log.error``, not
    raised. Cancellation closes the socket and leaves ``log`` as it was.
    """
    if opening is not None:
        await opening.acquire()
    try:
        with trio.socket.socket() as sock:
            try:
                await sock.connect(("127.0.0.1", target.port))
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                client = h11.Connection(h11.CLIENT)
                request = target.send(client)
                log.started = time.monotonic()
                await _send_all(sock, request)
                await _read_response(sock, client, log, stop_after_events, read_rate, opening)
            except (OSError, h11.ProtocolError) as exc:
                log.error = f"{type(exc).__name__}: {exc}"
            finally:
                log.closed_at = time.monotonic()
    finally:
        if opening is not None and log.status == 0:  # else released when the head came
            opening.release()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _read_response(
    sock: trio.socket.SocketType,
    client: h11.Connection,
    log: StreamLog,
    stop_after_events: int | None,
    read_rate: float | None,
    opening: trio.Semaphore | None,
) -> None:
    """Read one response into ``log``; release ``opening`` at its head. A checkpoint."""
    pending = b""
    arrived = 0.0
    read_start = trio.current_time()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            if read_rate is not None:
                await trio.sleep_until(read_start + log.body_bytes / read_rate)
            data = await sock.recv(_READ_SIZE)
            arrived = time.monotonic()
            if log.first_byte_at is None:
                log.first_byte_at = arrived
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            log.status = event.status_code
            if event.status_code != 200:
                log.error = f"status {event.status_code}"
            if opening is not None:
                opening.release()
        elif isinstance(event, h11.Data):
            log.body_bytes += len(event.data)
            blocks = (pending + event.data).split(b"\n\n")
            pending = blocks.pop()
            for block in blocks:
                if block and block[:1] != b":":
                    log.events.append(arrived)
            if stop_after_events is not None and len(log.events) >= stop_after_events:
                return
        elif isinstance(event, h11.EndOfMessage):
            log.complete = True
            return
        else:  # ConnectionClosed before the end, or an interim response
            log.error = log.error or "connection closed before the end of the body"
            return
