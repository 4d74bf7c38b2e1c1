"""The ASGI application: the :class:`Gateway`, its routes, its lifespan and its drain.

Theory of operation
===================

Each proxied request is handled in the task hypercorn gives it:

1. Checks that need no upstream happen first (:mod:`~trio_gateway._proxy.checks`),
   each answered in the endpoint's own error shape.
2. A :class:`~trio_gateway._core.record.RequestRecord` is opened. The rate
   limits were charged once, whatever the number of attempts that follow.
3. The exchange (:mod:`~trio_gateway._proxy.exchange`) runs in a nursery
   beside a **disconnect watcher** blocked on ASGI ``receive()``. Hypercorn
   reports a client that left as ``http.disconnect`` but does not cancel the
   app, so the watcher cancels the nursery (reason "client disconnected");
   everything upstream-side unwinds and the upstream socket closes. When the
   exchange ends first, the request task cancels the watcher (reason
   "response finished"). The exchange builds each attempt's upstream
   request and tries the model's deployments and fallbacks
   (:class:`~trio_gateway._proxy.router.Router`, docs/routing.md).
4. However the request ended, :meth:`Gateway._account` finishes the record
   and hands it to the metrics, the request log and the usage store, in a
   shielded and bounded scope.

Shutdown: :meth:`Gateway.drain` gives open exchanges ``timeouts.shutdown``
seconds, then stops their upstream waits so each still answers its client:
a 503 before the upstream's headers, the kind's error event in a stream.
:meth:`Gateway.end_grace` cuts that grace short.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence

import httpx
import orjson
import trio

from trio_gateway._accounting.json_log import RequestLogger
from trio_gateway._accounting.limiter import MemoryRateLimiter, RateLimiter
from trio_gateway._accounting.metrics import GatewayMetrics
from trio_gateway._accounting.usage_store import UsageStore
from trio_gateway._core.buckets import tokens_charged
from trio_gateway._core.config import GatewayConfig, KeyEntry
from trio_gateway._core.kinds import Failure, FailureType, Kind, error_body
from trio_gateway._core.record import RecordSink, RequestRecord
from trio_gateway._proxy.asgi import (
    Receive,
    RequestHeaders,
    Scope,
    Send,
    TrackedSend,
    send_json,
    send_raw,
    watch_disconnect,
)
from trio_gateway._proxy.checks import (
    Prepared,
    RequestError,
    admit,
    authenticate,
    prepare,
    require_method,
)
from trio_gateway._proxy.exchange import Exchanger
from trio_gateway._proxy.router import Router
from trio_gateway._proxy.upstream import ExchangeControl, Upstreams

__all__ = ["Gateway"]

_ROUTES = {"/v1" + kind.path: kind for kind in Kind}
_CLOSE_GRACE = 2.0  # seconds given to closing pooled upstream connections
_ACCOUNTING_GRACE = 5.0  # seconds the accounting step of one request may take


class Gateway:
    """The ASGI app. ``transport`` replaces the upstream network in tests.

    ``rng`` is the random source of the weighted choice among a model's
    deployments; a seeded ``random.Random`` makes that choice repeatable.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sinks: Sequence[RecordSink] = (),
        store: UsageStore | None = None,
        request_log: RequestLogger | None = None,
        limiter: RateLimiter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.upstreams = Upstreams(config, transport=transport)
        deployments = {
            (name, d.upstream) for name, route in config.models.items() for d in route.deployments
        }
        self.metrics = GatewayMetrics(models=config.models, deployments=deployments)
        self.store = store
        self.request_log = request_log
        self.limiter: RateLimiter = limiter or MemoryRateLimiter()
        self.sinks = [*sinks, *([store] if store is not None else [])]
        self.metrics.watch_store(store)
        self.metrics.watch_limiter(self.limiter)
        self._closed = False
        self._open_exchanges: set[ExchangeControl] = set()
        self._exchanges_changed = trio.Event()
        self._stopping: Failure | None = None  # set once drain's grace has run out
        self._grace = trio.CancelScope()  # drain's wait; end_grace cancels it
        self._models_body = _models_body(list(config.models))
        self.router = Router(config, rng)
        self._exchanger = Exchanger(config, self.upstreams, self.metrics, self.router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        """Close pooled upstream connections and the request log. A checkpoint; safe twice.

        Shielded and bounded, like every close: it runs even while the
        server is being cancelled.
        """
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLOSE_GRACE
            await self.upstreams.aclose()
            if self.request_log is not None:
                await self.request_log.aclose()

    async def drain(self, grace: float) -> None:
        """Let open exchanges finish for ``grace`` seconds, then stop the rest.

        A checkpoint. A stopped exchange still answers its client: a 503
        JSON error before upstream headers, the kind's error event in a
        stream. Requests that arrive later are stopped at once.
        """
        if self._grace.cancel_called:  # end_grace came first
            grace = 0.0
        with trio.move_on_after(grace) as self._grace:
            while self._open_exchanges:
                self._exchanges_changed = trio.Event()
                await self._exchanges_changed.wait()
        self._stopping = Failure(FailureType.SHUTDOWN, "the gateway is shutting down")
        for control in list(self._open_exchanges):
            control.stop(self._stopping)

    def end_grace(self) -> None:
        """Cut :meth:`drain`'s grace short: stop every open exchange now. Not a checkpoint.

        Before ``drain`` has started, the next ``drain`` stops at once. Each
        stopped exchange still answers its client and leaves its record.
        """
        self._grace.cancel(reason="grace cut short")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = uuid.uuid4().hex
        path: str = scope["path"]
        kind = _ROUTES.get(path)
        try:
            if path == "/healthz":
                require_method(scope, "GET")
                await send_json(send, 200, b'{"status":"ok"}', request_id)
            elif path == "/metrics":
                require_method(scope, "GET")
                body, content_type = self.metrics.render()
                await send_raw(
                    send, 200, body, request_id, [(b"content-type", content_type.encode())]
                )
            elif path == "/v1/models":
                require_method(scope, "GET")
                key = authenticate(self.config, RequestHeaders.parse(scope["headers"]))
                await send_json(send, 200, self._models_list(key), request_id)
            elif kind is not None:
                require_method(scope, "POST")
                await self._proxy(kind, scope, receive, send, request_id)
            else:
                raise RequestError(404, f"no such endpoint: {path}", "not_found")
        except RequestError as exc:
            self.metrics.refused(kind, exc.status)
            body = error_body(kind, exc.status, exc.message, exc.code)
            await send_json(send, exc.status, body, request_id, exc.headers)

    def _models_list(self, key: KeyEntry) -> bytes:
        """The ``/v1/models`` body: every public model ``key`` may use."""
        if key.models is None:
            return self._models_body
        return _models_body([name for name in self.config.models if key.allows(name)])

    async def _proxy(
        self, kind: Kind, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        """Check, route and proxy one request, then account for it. A checkpoint.

        Raises RequestError for a request refused before routing (no record).
        Once routed, the request leaves exactly one record however it ends.
        """
        headers = RequestHeaders.parse(scope["headers"])
        key = authenticate(self.config, headers)
        prepared = await prepare(self.config, kind, headers, receive, key)
        await admit(self.limiter, key)  # once per client request, however many attempts
        route = prepared.route
        record = RequestRecord(
            request_id=request_id,
            kind=kind,
            key_name=key.name,
            public_model=route.public_name,
            upstream=route.upstream,
            upstream_model=route.upstream_model,
            streamed=prepared.stream,
            started_at=trio.current_time(),
            started_wall=time.time(),
        )
        response = TrackedSend(send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect, receive, nursery.cancel_scope, response)
                await self._exchange(kind, prepared, headers.forwarded, response.send, record)
                nursery.cancel_scope.cancel(reason="response finished")
        finally:
            record.cancelled = response.client_left
            await self._account(record, key)

    async def _account(self, record: RequestRecord, key: KeyEntry) -> None:
        """Finish ``record`` and hand it to every sink; runs even when cancelled.

        A checkpoint, shielded and bounded: each sink bounds its own wait, and
        the whole step gives up after ``_ACCOUNTING_GRACE`` seconds. It runs
        after the response has ended, so the client never waits on it.
        """
        record.ended_at = trio.current_time()
        if record.cancelled:
            record.error_type = FailureType.CLIENT_DISCONNECT
        self.metrics.observe(record)
        if self.request_log is not None:
            self.request_log.log(record)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _ACCOUNTING_GRACE
            if key.tpm is not None:
                await self.limiter.charge(key, tokens_charged(record))
            for sink in self.sinks:
                await sink.submit(record)

    async def _exchange(
        self,
        kind: Kind,
        prepared: Prepared,
        forwarded: list[tuple[bytes, bytes]],
        send: Send,
        record: RequestRecord,
    ) -> None:
        """Send upstream and answer the client; a checkpoint, cancelled on disconnect.

        Registered with :meth:`drain` for its whole life, so a shutdown can
        stop it at any stage and the client still gets an answer.
        """
        control = ExchangeControl()
        if self._stopping is not None:
            control.stop(self._stopping)
        self._open_exchanges.add(control)
        try:
            with self.metrics.open_exchange():
                await self._exchanger.run(kind, prepared, forwarded, send, record, control)
        finally:
            self._open_exchanges.discard(control)
            self._exchanges_changed.set()


def _models_body(names: list[str]) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "trio-gateway"}
                for name in names
            ],
        }
    )
