"""The upstream boundary: httpx clients, request building, and error translation.

All upstream I/O goes through httpx, and every httpx exception is translated
to a :class:`~trio_gateway._kinds.Failure` by one table, :func:`failure_of`
(used through :func:`upstream_errors`, or directly on the stream's hot
path). Messages are the gateway's own: httpx's text can
name the upstream host, and what the client reads must not.

Upstream requests are built afresh: the upstream's credentials from config,
the content type, and a short allowlist of client headers. The client's own
credentials and every other client header stay behind.

Requests go straight to an httpx *transport* (one connection pool per
upstream), not through ``httpx.AsyncClient``: the client's layers (auth,
redirects, its cookie jar, a wrapper around every body chunk) are all
things the gateway does not want, and they cost about 0.1 ms per request
and an async generator per chunk (docs/benchmarks.md). With no client,
there is no cookie jar: no upstream's cookie is ever kept.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager
from typing import cast

import httpx
import trio

from trio_gateway._core.config import GatewayConfig, Timeouts, Upstream
from trio_gateway._core.kinds import Failure, FailureType, Kind
from trio_gateway._version import __version__

__all__ = [
    "HTTPX_ERRORS",
    "ExchangeControl",
    "UpstreamError",
    "Upstreams",
    "close_response",
    "failure_of",
    "idle_failure",
    "next_chunk",
    "raw_chunks",
    "read_whole_body",
    "upstream_errors",
]

_CLOSE_GRACE = 2.0  # seconds a cancelled request may spend closing its upstream socket


class UpstreamError(Exception):
    """An upstream exchange failed; ``failure`` says how, in client-safe words."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


HTTPX_ERRORS = (httpx.TransportError, httpx.StreamError)


def idle_failure(idle: float) -> Failure:
    """The failure of an upstream that sent nothing for ``idle`` seconds (streams and bodies)."""
    return Failure(FailureType.IDLE_TIMEOUT, f"upstream sent nothing for {idle:g} s")


def failure_of(exc: httpx.TransportError | httpx.StreamError, phase: str) -> Failure:
    """The client-safe :class:`Failure` for an httpx exception: the one translation table.

    ``phase`` ("request" before response headers, "stream" after) decides the
    words: a reset before headers means unreachable, after them a cut stream.
    """
    if isinstance(exc, httpx.TimeoutException):
        return Failure(FailureType.UPSTREAM_TIMEOUT, f"upstream timed out ({phase})")
    if isinstance(exc, httpx.ConnectError):
        return Failure(FailureType.UPSTREAM_UNREACHABLE, "upstream could not be reached")
    if phase == "request":
        return Failure(FailureType.UPSTREAM_UNREACHABLE, "upstream closed the connection")
    return Failure(FailureType.UPSTREAM_RESET, "upstream connection lost mid-response")


@contextmanager
def upstream_errors(phase: str) -> Iterator[None]:
    """Raise :class:`UpstreamError` for any httpx exception raised inside (see failure_of)."""
    try:
        yield
    except HTTPX_ERRORS as exc:
        raise UpstreamError(failure_of(exc, phase)) from None


class ExchangeControl:
    """Lets another task stop an upstream exchange while it waits on upstream.

    Each wait on upstream (for response headers, for the next chunk) runs in
    a scope registered with :meth:`guarded`; :meth:`stop` cancels that scope
    (or makes the next :meth:`guarded` raise). The waiter then learns the
    failure from :meth:`stopped` or :meth:`check`. Only the wait is
    cancelled, never the task, so the task can still answer the client: a
    JSON error before headers, the kind's error event after them. Graceful
    shutdown uses this.
    """

    __slots__ = ("_scope", "failure")

    def __init__(self) -> None:
        self.failure: Failure | None = None
        self._scope: trio.CancelScope | None = None

    def stop(self, failure: Failure) -> None:
        """Stop the exchange with ``failure``; not a checkpoint. The first call wins."""
        if self.failure is None:
            self.failure = failure
            if self._scope is not None:
                self._scope.cancel(reason=failure.message)

    @contextmanager
    def guarded(self, scope: trio.CancelScope) -> Iterator[None]:
        """Register ``scope`` as the current wait; raise UpstreamError if stopped."""
        if self.failure is not None:
            raise UpstreamError(self.failure)
        self._scope = scope
        try:
            yield
        finally:
            self._scope = None

    def stopped(self) -> Failure | None:
        """The failure the exchange was stopped with, if it was. Not a checkpoint."""
        return self.failure

    def check(self) -> None:
        """Raise UpstreamError if the exchange was stopped. Not a checkpoint."""
        if self.failure is not None:
            raise UpstreamError(self.failure)


def raw_chunks(response: httpx.Response) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
    """The response body as it arrives, undecoded; the iterator is closed when the block exits.

    Iterates the response's byte stream itself, as ``aiter_raw`` would but
    without its layer (an async generator per chunk, and bookkeeping the
    gateway never reads). Closing the response stays the caller's job.
    """
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):  # pragma: no cover - httpx's own
        raise TypeError("expected an async response stream")
    # httpx's streams are async generators; the annotation is wider.
    return aclosing(cast(AsyncGenerator[bytes, None], aiter(stream)))


async def next_chunk(
    chunks: AsyncIterator[bytes], idle: float, control: ExchangeControl
) -> bytes | None:
    """The next upstream chunk, or None at a clean end of the body.

    A checkpoint. Raises :class:`UpstreamError` when the upstream fails, is
    silent for ``idle`` seconds, or ``control`` is stopped. Cancellation
    leaves ``chunks`` unusable; close it.
    """
    with trio.move_on_after(idle) as read_scope, control.guarded(read_scope):
        try:
            with upstream_errors("stream"):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
    control.check()
    raise UpstreamError(idle_failure(idle))


async def read_whole_body(
    response: httpx.Response, limit: int, idle: float, control: ExchangeControl
) -> bytes:
    """The whole upstream body, bounded in size and in silence between reads.

    A checkpoint. Raises UpstreamError on a cut, a timeout, a stop through
    ``control`` or an oversize body. The caller still owns ``response``.
    """
    parts: list[bytes] = []
    size = 0
    async with raw_chunks(response) as chunks:
        while (chunk := await next_chunk(chunks, idle, control)) is not None:
            size += len(chunk)
            if size > limit:
                message = f"the upstream answer is over {limit} bytes"
                raise UpstreamError(Failure(FailureType.UPSTREAM_TOO_LARGE, message))
            parts.append(chunk)
    return b"".join(parts)


async def close_response(response: httpx.Response) -> None:
    """Close an upstream response, and with it its connection if unfinished.

    A checkpoint, but shielded and bounded: it runs to the end (or for at most
    a couple of seconds) even inside a cancelled scope, because closing the
    socket is what makes the provider stop generating. A response already
    closed (each owner on the way out closes it again) costs one schedule
    point and no cancel scope.
    """
    if response.is_closed:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _CLOSE_GRACE
        await response.aclose()


def _finite(seconds: float) -> float | None:
    return None if math.isinf(seconds) else seconds


class Upstreams:
    """One pooled httpx transport per configured upstream, and the requests sent to it.

    ``transport`` replaces the network for tests (a fake that yields chosen
    byte chunks); by default each upstream's pool speaks HTTP/1.1 over TCP.
    """

    def __init__(
        self, config: GatewayConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._config = config
        timeouts: Timeouts = config.timeouts
        # Connect (and pool wait) time out inside httpx; first byte, idle and
        # stall are the gateway's own cancel scopes around the work.
        httpx_timeout = httpx.Timeout(
            connect=timeouts.connect,
            pool=timeouts.connect,
            write=_finite(timeouts.first_byte),
            read=None,
        )
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # Made once, not per request: the parsed URL of each endpoint, and the
        # timeouts, which httpcore reads from each request's extensions.
        self._urls: dict[tuple[str, Kind], httpx.URL] = {}
        self._timeout = httpx_timeout.as_dict()  # read, never written, by httpx and httpcore
        self._transports: dict[str, httpx.AsyncBaseTransport] = {
            name: transport
            if transport is not None
            else httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
            for name in config.upstreams
        }

    async def aclose(self) -> None:
        """Close every pooled connection. A checkpoint."""
        for transport in {id(t): t for t in self._transports.values()}.values():
            await transport.aclose()

    def build_request(
        self,
        upstream: Upstream,
        kind: Kind,
        body: bytes,
        *,
        content_type: str,
        stream: bool,
        forwarded: Sequence[tuple[bytes, bytes]] = (),
    ) -> httpx.Request:
        """The upstream request: fresh headers, the upstream's credentials, no client ones.

        ``forwarded`` holds the only client headers that go along (API
        versions and betas: :data:`~trio_gateway._proxy.asgi.FORWARDED_CLIENT_HEADERS`).
        Built directly rather than by the client's ``build_request``, which
        would parse the URL and merge default headers on every request, and
        would send back cookies the upstream set while answering other
        clients (the client's jar is shared by every request).
        """
        headers: list[tuple[str, str]] = [
            ("content-type", content_type),
            ("accept", "text/event-stream" if stream else "application/json"),
            ("accept-encoding", "identity"),
            ("user-agent", f"trio-gateway/{__version__}"),
        ]
        if upstream.auth == "bearer":
            headers.append(("authorization", f"Bearer {upstream.api_key}"))
        else:
            headers.append(("x-api-key", upstream.api_key))
        headers.extend(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in forwarded
        )
        url = self._urls.get((upstream.name, kind))
        if url is None:
            url = self._urls[upstream.name, kind] = httpx.URL(upstream.base_url + kind.path)
        return httpx.Request(
            "POST", url, content=body, headers=headers, extensions={"timeout": self._timeout}
        )

    async def open(
        self,
        upstream: Upstream,
        request: httpx.Request,
        control: ExchangeControl,
        *,
        deadline: float | None = None,
    ) -> httpx.Response:
        """Send ``request`` and return once response headers arrive; the body streams later.

        A checkpoint. Raises :class:`UpstreamError` on failure, including the
        first-byte timeout and a stop through ``control``. Cancellation closes
        the half-made connection. The caller owns the response and must
        :func:`close_response` it. ``deadline`` (on the Trio clock) replaces
        now + ``first_byte``: the one deadline of a request's attempts.
        """
        first_byte = self._config.timeouts.first_byte
        if deadline is None:
            deadline = trio.current_time() + first_byte
        transport = self._transports[upstream.name]
        with (
            trio.move_on_at(deadline) as waited,
            control.guarded(waited),
            upstream_errors("request"),
        ):
            response = await transport.handle_async_request(request)
            response.request = request
            return response
        control.check()
        raise UpstreamError(
            Failure(
                FailureType.UPSTREAM_TIMEOUT,
                f"upstream sent no response headers within {first_byte:g} s",
            )
        )
