"""Every use of hypercorn's private API, in one place.

This module is the only one that subclasses hypercorn's classes, overrides
their underscored methods, reads their attributes or imports
``hypercorn.events``, ``hypercorn.protocol`` or ``hypercorn.config.Sockets``.
None of that is hypercorn's documented API, so it may change in any release:
``pyproject.toml`` caps the dependency at ``hypercorn[trio]>=0.17,<0.19``.
Before raising the cap, read hypercorn's ``protocol/h11.py`` and
``trio/tcp_server.py`` against the list below, and run
``tests/test_hostile_http.py`` (its protocol tests drive these classes
directly, and the rest go through a real hypercorn).

What this module relies on, as of hypercorn 0.18:

* ``ProtocolWrapper`` looks the name ``H11Protocol`` up in
  ``hypercorn.protocol`` for each new connection (:func:`install_protocol`).
* ``H11Protocol``'s constructor arguments; its attributes ``config``,
  ``connection`` (an ``h11.Connection``), ``stream`` (``None`` while no
  app owns a request), ``send`` (to ``TCPServer.protocol_send``) and
  ``can_read``; its methods ``handle``, ``_check_protocol``,
  ``_create_stream``, ``_send_error_response``, ``_send_h11_event``,
  ``_maybe_recycle`` and ``_close_stream``; and that its reading path
  calls ``self.send(Closed())`` after a protocol error.
* ``TCPServer``: its reading task ends with ``protocol.handle(Closed())``;
  ``Updated(idle=False)`` stops the keep-alive timer task; the socket is
  closed only once every task of the connection's task group has ended.
* ``Config.create_sockets`` returns the listening ``Sockets`` before
  hypercorn calls ``listen`` on them.

Theory of operation
===================

Hypercorn runs two tasks per HTTP/1.1 connection, both of which may write
to and close the socket: a **reading task**, which parses the client's
bytes with h11 and hands each request to an app, and the **app's task**,
which answers. A third, the **keep-alive timer**, runs while the connection
is idle. :class:`GatewayH11Protocol` sets the rules between them (its
docstring numbers them): the reading task writes only while no app owns the
request; once an app does, the connection closes only after the app's
answer; and once the client's input has ended, nothing waits for another
request. :class:`Config` adds a kernel bound for clients that stop reading.
"""

from __future__ import annotations

import socket
from typing import Any

import h11
from hypercorn import protocol as hypercorn_protocol
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol

from trio_gateway._core.kinds import Kind, error_body

__all__ = ["Config", "GatewayH11Protocol", "install_protocol"]


class Config(HypercornConfig):
    """Hypercorn's settings, plus a kernel-enforced bound on stalled clients.

    A connection whose config is one of these runs :class:`GatewayH11Protocol`
    (see :func:`install_protocol`).

    Hypercorn shields its socket writes, so no cancellation can free a
    connection whose client has stopped reading. ``TCP_USER_TIMEOUT`` makes
    the kernel abort such a connection once it has made no progress for that
    long, zero-window probing included (Linux 5.11+); the blocked write then
    fails and the request's task ends. Accepted sockets inherit the option
    from the listening socket. ``stall_ms`` None: not set.
    """

    stall_ms: int | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        if self.stall_ms is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.stall_ms)
        return sockets


# The routes of Gateway._http, to answer a refused request in its endpoint's shape.
_KINDS_BY_PATH = {"/v1" + kind.path: kind for kind in Kind}


class _Connection(h11.Connection):
    """h11's server side, noting whether the request being answered arrived whole."""

    request_whole = False

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        event = super().next_event()
        if isinstance(event, h11.Request):
            self.request_whole = False
        elif isinstance(event, h11.EndOfMessage):
            self.request_whole = True
        return event


class GatewayH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, hardened against hostile framing.

    Hypercorn runs two tasks per connection: a reading task that parses with
    h11, and the app's task that answers. Hypercorn lets both write to and
    close the socket, which is where the troubles below come from. The rules
    here: the reading task writes only while no app owns the request, and
    once the app does, the connection closes only after the app's answer.

    1. **Request smuggling.** h11 accepts both Content-Length and
       Transfer-Encoding (chunked wins) and parses what follows as the next
       request: a proxy in front that trusted Content-Length would see one
       request where the gateway serves two (RFC 9112 section 6.3). Such a
       request, and an HTTP/1.0 one with Transfer-Encoding (section 6.1), is
       answered with a 400 in its endpoint's error shape before any app
       sees it, and the connection is closed. (Refused in the app instead,
       the 400 raced the reading task's close, and was often lost.)
    2. **A protocol error while the app answers.** Stock hypercorn's reading
       task then writes its own error answer over the app's, and may meet
       the app closing the socket: the ``BusyResourceError`` that escapes
       ends the whole server (one client, one packet, e.g. ``GET /healthz
       HTTP/1.0`` and a byte after it). Here the reading task stays silent,
       and the rest of the input is dropped unparsed; the connection closes
       after the app's answer if the app has the whole request or has begun
       to answer, else at once (the app sees a disconnect). A client so gets
       a whole answer or none, never a cut one.
    3. **Refusals the client can read.** h11's own refusals (conflicting
       Content-Lengths, an unsupported or repeated Transfer-Encoding, a
       malformed or oversized head) get a JSON body, and 400 in place of
       h11's 501: a framing the gateway does not accept is the client's
       mistake, and RFC 9112 requires 400 when chunked is not the final
       coding, which h11 does not tell apart.
    4. **HTTP/1.1 only.** ``Upgrade`` is ignored (RFC 9110 section 7.8):
       the gateway has no WebSocket endpoint (stock hypercorn answered an
       upgrade with 500, or left the connection open for good after a bad
       handshake), and no HTTP/2 without TLS (h2c), whose connections the
       timers here do not bound (a bare preface held one open for good). A
       ``PRI`` request, HTTP/2's preface, is refused.
    5. **A client that has closed is let go at once.** Hypercorn's trio
       ``TCPServer`` closes the socket only when every task of the
       connection has ended, and the keep-alive timer is one of them. A
       client that closed a kept-alive connection after a complete answer
       (the common way an HTTP client lets a connection go) ended the
       reading task, but the timer ran on, so the socket sat in CLOSE_WAIT,
       holding its file descriptor, for ``client_headers`` seconds. (It was
       a race: when the client's FIN arrived before the app's task had
       finished, h11 saw the close and hypercorn closed after the answer.)
       Here, the end of the client's input stops the timer, so the socket
       closes at once; and an answer that ends after the input has ended
       closes the connection instead of waiting for a request that cannot
       come.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Upgrades are ignored, so this is never swapped for an H11WSConnection.
        self.connection: _Connection = _Connection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )
        self._send_to_server = self.send
        self.send = self._send_unless_answering
        self._broken = False  # the input broke framing; it is no longer parsed
        self._input_ended = False  # the client closed, reset, or the socket was closed

    async def handle(self, event: Event) -> None:
        """Handle ``event``; input after a framing error is dropped (then not a checkpoint)."""
        if isinstance(event, RawData) and event.data and self._broken:
            return  # dropped, not buffered: a client may keep sending
        if not isinstance(event, Closed):
            await super().handle(event)
            return
        # The connection's input has ended: hypercorn says so from the reading
        # task (the client closed or reset), from a failed write, and after it
        # closed the socket itself. See 5. in the class docstring.
        first = not self._input_ended
        self._input_ended = True
        await super().handle(event)  # an app still answering sees a disconnect
        if first:
            # Stop the keep-alive timer, the task that held an idle connection
            # open: with the reading task ended, the socket then closes at once.
            await self._send_to_server(Updated(idle=False))

    async def _maybe_recycle(self) -> None:
        """After an answer: wait for the next request, or close. A checkpoint."""
        if not self._input_ended:
            await super()._maybe_recycle()
            return
        # h11 may not know the input ended (a reset, say), and would wait for
        # another request: close instead.
        await self._close_stream()
        await self.send(Closed())

    async def _send_unless_answering(self, event: Event) -> None:
        """Pass ``event`` to the connection, but no close that would cut the app's answer.

        A checkpoint when it passes the event on.
        """
        # A Closed() while an app owns the request comes only from the reading
        # task's error path (_maybe_recycle clears the stream before it closes).
        if isinstance(event, Closed) and self.stream is not None:
            self._broken = True
            answering = self.connection.our_state not in {h11.IDLE, h11.SEND_RESPONSE}
            if answering or self.connection.request_whole:
                return  # the end of the app's answer closes the connection
        await self._send_to_server(event)

    async def _check_protocol(self, event: h11.Request) -> None:
        """Never switch to HTTP/2 (see 4. in the class docstring). Not a checkpoint."""

    async def _create_stream(self, request: h11.Request) -> None:
        """Hand ``request`` to the app, or refuse it and close. A checkpoint."""
        names = {name for name, _ in request.headers}
        refusal = None
        if b"transfer-encoding" in names:
            if b"content-length" in names:
                refusal = "the request has both Content-Length and Transfer-Encoding"
            elif request.http_version == b"1.0":
                refusal = "an HTTP/1.0 request cannot use Transfer-Encoding"
        if refusal is not None:
            path = request.target.partition(b"?")[0].decode("latin-1")
            await self._refuse(_KINDS_BY_PATH.get(path), 400, refusal, "ambiguous_length")
            await self.send(Closed())  # never read on: what follows may be a smuggled request
        elif request.method == b"PRI":
            message = "the gateway speaks HTTP/1.1 only"
            await self._refuse(None, 400, message, "unsupported_protocol")
            await self.send(Closed())
        else:
            if b"upgrade" in names:
                request = h11.Request(
                    method=request.method,
                    target=request.target,
                    headers=[
                        (name, value) for name, value in request.headers if name != b"upgrade"
                    ],
                    http_version=request.http_version,
                )
            await super()._create_stream(request)

    async def _send_error_response(self, status_code: int) -> None:
        """Refuse what h11 could not parse, unless an app answers (then not a checkpoint)."""
        if self.stream is not None:
            return  # the app answers this request: see 2. in the class docstring
        if status_code == 431:
            message = f"the request head is over {self.config.h11_max_incomplete_size} bytes"
            await self._refuse(None, 431, message, "headers_too_large")
        else:
            message = "the request is not valid HTTP/1.1, or its framing is not supported"
            await self._refuse(None, 400, message, "malformed_request")

    async def _refuse(self, kind: Kind | None, status: int, message: str, code: str) -> None:
        """Send a whole error answer that ends the connection. A checkpoint."""
        body = error_body(kind, status, message, code)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


def _h11_protocol(app: Any, config: HypercornConfig, *args: Any, **kwargs: Any) -> H11Protocol:
    """The HTTP/1.1 protocol for one connection: the gateway's for its own config."""
    protocol = GatewayH11Protocol if isinstance(config, Config) else H11Protocol
    return protocol(app, config, *args, **kwargs)


def install_protocol() -> None:
    """Make hypercorn use :class:`GatewayH11Protocol` for connections with a :class:`Config`.

    Hypercorn has no setting for its protocol class: ``ProtocolWrapper`` looks
    the name ``H11Protocol`` up in its module for each new connection, and the
    alternative, copies of ``worker_serve`` and ``TCPServer.run``, would drift
    from hypercorn. So the name is replaced, once per process, by a factory
    that is scoped by config rather than by time: a connection whose config
    is not a :class:`Config` gets stock hypercorn, so another hypercorn
    server in the same process is unaffected, even while the gateway runs.
    Not a checkpoint; idempotent.
    """
    # Not in hypercorn.protocol's __all__, hence the ignores.
    if hypercorn_protocol.H11Protocol is not _h11_protocol:  # type: ignore[attr-defined]
        hypercorn_protocol.H11Protocol = _h11_protocol  # type: ignore[attr-defined,assignment]
