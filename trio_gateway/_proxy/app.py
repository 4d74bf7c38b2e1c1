"""The ASGI application: routing, authentication, request checks, and one exchange.

Theory of operation
===================

Each proxied request is handled in the task hypercorn gives it:

1. Checks that need no upstream happen first, each answered in the
   endpoint's own error shape: route and method, client key, body size (read
   with a bound, never buffered past it), content type, JSON, model, the
   key's model allowlist, then the key's rate limits (:mod:`trio_gateway._core.buckets`).
2. The request body is rebuilt with the upstream model name (and, for
   streamed chat, ``stream_options.include_usage``), and sent with fresh
   headers (:mod:`trio_gateway._proxy.upstream`).
3. The exchange runs in a nursery beside a **disconnect watcher** blocked on
   ASGI ``receive()``. Hypercorn reports a client that left as
   ``http.disconnect`` but does not cancel the app, so the watcher cancels
   the nursery (reason "client disconnected"); everything upstream-side
   unwinds and the upstream socket closes.
4. A 2xx event stream goes through :func:`trio_gateway._pipeline.stream_events`;
   anything else (JSON, errors, a stray HTML page) is read whole, bounded by
   ``max_upstream_body_bytes``, rewritten if it is JSON, and sent at once. A
   body the client could not parse (not a JSON object) becomes an error in
   the kind's shape.

Shutdown: :meth:`Gateway.drain` gives open streams ``timeouts.shutdown``
seconds, then stops their upstream reads so each ends with its kind's error
event rather than a cut connection.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import httpx
import orjson
import trio

from trio_gateway._accounting.json_log import RequestLogger
from trio_gateway._accounting.limiter import MemoryRateLimiter, RateLimiter
from trio_gateway._accounting.metrics import GatewayMetrics
from trio_gateway._accounting.usage_store import UsageStore
from trio_gateway._core.buckets import retry_after_header, tokens_charged
from trio_gateway._core.config import GatewayConfig, KeyEntry, ModelRoute
from trio_gateway._core.extract import Extracted
from trio_gateway._core.kinds import Failure, FailureType, Kind, error_body
from trio_gateway._core.multipart import MultipartError, replace_form_field
from trio_gateway._core.record import RecordSink, RequestRecord
from trio_gateway._proxy.pipeline import StreamResult, stream_events
from trio_gateway._proxy.upstream import (
    ExchangeControl,
    UpstreamError,
    Upstreams,
    bad_forwarded_header,
    close_response,
    is_field_value,
    next_chunk,
    raw_chunks,
)
from trio_gateway._rewrite.base import (
    REDACTED,
    PassThroughPolicy,
    Policy,
    StreamRewriter,
    rewrite_json_body,
)
from trio_gateway._rewrite.chat import ChatPolicy
from trio_gateway._rewrite.messages import MessagesPolicy
from trio_gateway._rewrite.responses import ResponsesPolicy

__all__ = ["Gateway"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ROUTES = {"/v1" + kind.path: kind for kind in Kind}
_POLICIES: dict[Kind, type[Policy]] = {
    Kind.CHAT: ChatPolicy,
    Kind.MESSAGES: MessagesPolicy,
    Kind.RESPONSES: ResponsesPolicy,
}
# Upstream response headers a client may see; everything else (cookies, provider
# identity, content-length of a body we rewrite) stays behind.
_PASSED_RESPONSE_HEADERS = ("retry-after",)
_ANONYMOUS = KeyEntry("anonymous", "")  # with allow_anonymous: no key, no limits
_CLOSE_GRACE = 2.0  # seconds given to closing pooled upstream connections
_ACCOUNTING_GRACE = 5.0  # seconds the accounting step of one request may take
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class RequestError(Exception):
    """A client mistake, answered with ``status`` in the endpoint's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = list(headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class Gateway:
    """The ASGI app. ``transport`` replaces the upstream network in tests."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sinks: Sequence[RecordSink] = (),
        store: UsageStore | None = None,
        request_log: RequestLogger | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.config = config
        self.upstreams = Upstreams(config, transport=transport)
        self.metrics = GatewayMetrics(models=config.models)
        self.store = store
        self.request_log = request_log
        self.limiter: RateLimiter = limiter or MemoryRateLimiter()
        self.sinks = [*sinks, *([store] if store is not None else [])]
        self.metrics.watch_store(store)
        self._closed = False
        self._open_exchanges: set[ExchangeControl] = set()
        self._exchanges_changed = trio.Event()
        self._stopping: Failure | None = None  # set once drain's grace has run out
        self._grace = trio.CancelScope()  # drain's wait; end_grace cancels it
        self._models_body = _models_body(list(config.models))

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
                _require_method(scope, "GET")
                await _send_json(send, 200, b'{"status":"ok"}', request_id)
            elif path == "/metrics":
                _require_method(scope, "GET")
                body, content_type = self.metrics.render()
                await _send_raw(
                    send, 200, body, request_id, [(b"content-type", content_type.encode())]
                )
            elif path == "/v1/models":
                _require_method(scope, "GET")
                key = self._authenticate(scope)
                await _send_json(send, 200, self._models_list(key), request_id)
            elif kind is not None:
                _require_method(scope, "POST")
                await self._proxy(kind, scope, receive, send, request_id)
            else:
                raise RequestError(404, f"no such endpoint: {path}", "not_found")
        except RequestError as exc:
            self.metrics.refused(None if kind is None else kind.label, exc.status)
            body = error_body(kind, exc.status, exc.message, exc.code)
            await _send_json(send, exc.status, body, request_id, exc.headers)

    def _models_list(self, key: KeyEntry) -> bytes:
        """The ``/v1/models`` body: every public model ``key`` may use."""
        if key.models is None:
            return self._models_body
        return _models_body([name for name in self.config.models if key.allows(name)])

    def _authenticate(self, scope: Scope) -> KeyEntry:
        """The client's configured key; raises RequestError(401) otherwise.

        Without credentials and with ``allow_anonymous``, an unrestricted key
        named "anonymous".
        """
        authorization = _header(scope, b"authorization")
        presented = _header(scope, b"x-api-key")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                # Credentials were meant, so anonymous access does not apply.
                raise RequestError(401, "expected Authorization: Bearer <key>", "invalid_api_key")
            presented = token.strip()
        if presented is None:
            if self.config.allow_anonymous:
                return _ANONYMOUS
            raise RequestError(401, "missing API key", "invalid_api_key")
        key = self.config.find_key(presented)
        if key is None:
            raise RequestError(401, "invalid API key", "invalid_api_key")
        return key

    def _route(self, model: object, key: KeyEntry) -> ModelRoute:
        """The route for ``model``; RequestError 400, 404, or 403 if ``key`` may not use it."""
        if not isinstance(model, str) or not model:
            raise RequestError(400, "`model` must be a non-empty string", "invalid_model")
        route = self.config.models.get(model)
        if route is None:
            raise RequestError(404, f"model {_shown(model)} does not exist", "model_not_found")
        if not key.allows(model):
            message = f"this key may not use model {_shown(model)}"
            raise RequestError(403, message, "model_not_allowed")
        return route

    async def _admit(self, key: KeyEntry) -> None:
        """Count the request against ``key``'s limits; RequestError(429) if over one."""
        if key.rpm is None and key.tpm is None:
            return
        wait = await self.limiter.admit(key)
        if wait is not None:
            message = f"rate limit exceeded for this key; retry in {wait:.1f} s"
            raise RequestError(
                429, message, "rate_limit_exceeded", [(b"retry-after", retry_after_header(wait))]
            )

    async def _proxy(
        self, kind: Kind, scope: Scope, receive: Receive, send: Send, request_id: str
    ) -> None:
        key = self._authenticate(scope)
        _refuse_declared_oversize(scope, self.config.max_body_bytes)
        # Hypercorn's timers stop at the request head; a trickled body is bounded here.
        with trio.move_on_after(self.config.timeouts.request_body) as body_timer:
            body = await _read_body(receive, self.config.max_body_bytes)
        if body_timer.cancelled_caught:
            seconds = self.config.timeouts.request_body
            message = f"the request body did not arrive within {seconds:g} s"
            raise RequestError(408, message, "request_timeout")
        content_type = _header(scope, b"content-type") or ""
        stream = False
        if kind is Kind.TRANSCRIPTIONS:
            route, body = self._prepare_form(body, content_type, key)
        else:
            route, body, stream = self._prepare_json(kind, body, content_type, key)
            content_type = "application/json"
        bad_header = bad_forwarded_header(scope["headers"])
        if bad_header is not None:
            message = f"header {bad_header} holds characters a header value may not"
            raise RequestError(400, message, "invalid_header")
        await self._admit(key)
        upstream = self.config.upstreams[route.upstream]
        request = self.upstreams.build_request(
            upstream,
            kind,
            body,
            content_type=content_type,
            stream=stream,
            client_headers=scope["headers"],
        )
        record = RequestRecord(
            request_id=request_id,
            kind=kind.label,
            key_name=key.name,
            public_model=route.public_name,
            upstream=route.upstream,
            upstream_model=route.upstream_model,
            streamed=stream,
            started_at=trio.current_time(),
            started_wall=time.time(),
        )
        response = _TrackedSend(send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _watch_disconnect, receive, nursery.cancel_scope, record, response
                )
                await self._exchange(kind, route, request, response.send, record)
                nursery.cancel_scope.cancel(reason="response finished")
        finally:
            await self._account(record, key)

    async def _account(self, record: RequestRecord, key: KeyEntry) -> None:
        """Finish ``record`` and hand it to every sink; runs even when cancelled.

        A checkpoint, shielded and bounded: each sink bounds its own wait, and
        the whole step gives up after ``_ACCOUNTING_GRACE`` seconds. It runs
        after the response has ended, so the client never waits on it.
        """
        record.ended_at = trio.current_time()
        if record.cancelled:
            record.error_type = FailureType.CLIENT_DISCONNECT.value
        self.metrics.observe(record)
        if self.request_log is not None:
            self.request_log.log(record)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _ACCOUNTING_GRACE
            if key.tpm is not None:
                await self.limiter.charge(key, tokens_charged(record))
            for sink in self.sinks:
                await sink.submit(record)

    def _prepare_json(
        self, kind: Kind, body: bytes, content_type: str, key: KeyEntry
    ) -> tuple[ModelRoute, bytes, bool]:
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "expected content-type application/json")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RequestError(400, "request body is not valid JSON", "invalid_json") from None
        if not isinstance(payload, dict):
            raise RequestError(400, "request body must be a JSON object", "invalid_json")
        route = self._route(payload.get("model"), key)
        payload["model"] = route.upstream_model
        stream = kind.streams and payload.get("stream") is True
        if stream and kind is Kind.CHAT:
            options = payload.get("stream_options")
            if not isinstance(options, dict):
                options = payload["stream_options"] = {}
            options["include_usage"] = True  # usage must arrive in the stream
        return route, orjson.dumps(payload), stream

    def _prepare_form(
        self, body: bytes, content_type: str, key: KeyEntry
    ) -> tuple[ModelRoute, bytes]:
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            raise RequestError(415, "expected content-type multipart/form-data")
        if not is_field_value(content_type.encode("latin-1")):
            # It goes upstream as it is, boundary included.
            message = "header content-type holds characters a header value may not"
            raise RequestError(400, message, "invalid_header")
        try:
            model, _ = replace_form_field(body, content_type, "model")
            route = self._route(model, key)
            _, body = replace_form_field(body, content_type, "model", route.upstream_model)
        except MultipartError as exc:
            raise RequestError(400, str(exc), "invalid_form") from None
        return route, body

    async def _exchange(
        self,
        kind: Kind,
        route: ModelRoute,
        request: httpx.Request,
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
                await self._exchange_upstream(kind, route, request, send, record, control)
        finally:
            self._open_exchanges.discard(control)
            self._exchanges_changed.set()

    async def _exchange_upstream(
        self,
        kind: Kind,
        route: ModelRoute,
        request: httpx.Request,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
    ) -> None:
        """Open the upstream exchange and answer from it. A checkpoint."""
        upstream = self.config.upstreams[route.upstream]
        try:
            response = await self.upstreams.open(upstream, request, control)
        except UpstreamError as exc:
            await _send_failure(send, kind, exc.failure, record)
            return
        record.headers_at = trio.current_time()
        content_type = response.headers.get("content-type", "").lower()
        if response.is_success and content_type.startswith("text/event-stream"):
            # stream_events owns the response from here and closes it.
            await self._stream(kind, route, response, send, record, control)
        else:
            try:
                await self._whole(kind, route, response, send, record, control)
            finally:
                await close_response(response)

    async def _stream(
        self,
        kind: Kind,
        route: ModelRoute,
        response: httpx.Response,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
    ) -> None:
        policy = _POLICIES.get(kind, PassThroughPolicy)(route.public_name, free=route.free)
        rewriter = StreamRewriter(
            policy,
            max_event_bytes=self.config.max_event_bytes,
            secret=self.config.upstreams[route.upstream].api_key.encode(),
        )
        headers = [*_STREAM_HEADERS, (b"x-request-id", record.request_id.encode())]
        record.status = 200
        body = _AsgiBody(send)
        result = StreamResult()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            with self.metrics.active_stream():
                await stream_events(
                    response, rewriter, body, self.config.timeouts, control, self.metrics, result
                )
        finally:
            await close_response(response)  # if stream_events never started
            # Also when cancelled: a client that left still got what it got.
            record.bytes_to_client = body.bytes_sent
            record.first_token_at = result.first_content_at
            _note_extracted(record, policy.extracted)
        if result.failure is not None:
            record.error_type = result.failure.type.value

    async def _whole(
        self,
        kind: Kind,
        route: ModelRoute,
        response: httpx.Response,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
    ) -> None:
        request_id = record.request_id
        try:
            body = await _read_upstream_body(
                response, self.config.max_upstream_body_bytes, self.config.timeouts.idle, control
            )
        except UpstreamError as exc:
            await _send_failure(send, kind, exc.failure, record)
            return
        status = response.status_code
        if status in (401, 403, 407):
            # The upstream refused the gateway's own credentials: the client can
            # do nothing about it, and the upstream's words may quote the key.
            message = "the upstream refused the gateway's credentials"
            body = error_body(kind, 502, message, "upstream_auth")
            record.status = 502
            record.error_type = FailureType.UPSTREAM_STATUS.value
            record.bytes_to_client = len(body)
            await _send_json(send, 502, body, request_id)
            return
        extracted = Extracted()
        rewritten = rewrite_json_body(
            body, route.public_name, free=route.free, kind=kind.label, extracted=extracted
        )
        _note_extracted(record, extracted)
        content_type = response.headers.get("content-type", "application/json")
        if status >= 400:
            record.error_type = FailureType.UPSTREAM_STATUS.value
        if rewritten is not None:
            body = rewritten
        elif status >= 400 or kind is not Kind.TRANSCRIPTIONS:
            # The client's SDK parses JSON here (a transcription may be plain
            # text). An HTML page from a proxy in front of the provider, or a
            # 200 that is not the answer, becomes an error in the kind's shape.
            message = f"the upstream answered {status} with a body that is not a JSON object"
            if status < 400:
                status = 502
                record.error_type = FailureType.UPSTREAM_INVALID.value
            body = error_body(kind, status, message, FailureType.UPSTREAM_INVALID.value)
            content_type = "application/json"
        record.status = status
        upstream_key = self.config.upstreams[route.upstream].api_key.encode()
        body = body.replace(upstream_key, REDACTED)
        headers = [(b"content-type", content_type.encode())]
        headers.extend(
            (name.encode(), response.headers[name].encode())
            for name in _PASSED_RESPONSE_HEADERS
            if name in response.headers
        )
        await _send_raw(send, status, body, request_id, headers)
        record.bytes_to_client = len(body)


class _AsgiBody:
    """The response body through ASGI ``send``, counting the bytes sent."""

    __slots__ = ("_send", "bytes_sent")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.bytes_sent = 0

    async def send(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


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


def _require_method(scope: Scope, method: str) -> None:
    if scope["method"] != method:
        message = f"method {scope['method']} not allowed; use {method}"
        raise RequestError(405, message, "method_not_allowed", [(b"allow", method.encode())])


def _shown(value: str, limit: int = 100) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters.

    Client input echoed in errors is bounded, so a huge model name cannot
    make a huge error body.
    """
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _refuse_declared_oversize(scope: Scope, limit: int) -> None:
    """RequestError(413) if ``Content-Length`` announces more than ``limit`` bytes.

    Refused before a byte of the body is read. A body without the header
    (chunked) is bounded while it is read.
    """
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is over {limit} bytes", "body_too_large")


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; RequestError(413) as soon as it passes ``limit``.

    A checkpoint. Raises RequestError(400) if the client leaves mid-body.
    Cancelled, it leaves the rest unread: answered early, hypercorn closes the
    connection rather than read on, because the request did not end.
    """
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over {limit} bytes", "body_too_large")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _read_upstream_body(
    response: httpx.Response, limit: int, idle: float, control: ExchangeControl
) -> bytes:
    """The whole upstream body, bounded in size and in silence between reads.

    A checkpoint. Raises UpstreamError on a cut, a timeout, a stop through
    ``control`` or an oversize body.
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


def _note_extracted(record: RequestRecord, extracted: Extracted) -> None:
    record.usage = extracted.usage
    record.upstream_id = extracted.upstream_id
    record.finish_reason = extracted.finish_reason


async def _send_failure(send: Send, kind: Kind, failure: Failure, record: RequestRecord) -> None:
    record.status = failure.status
    record.error_type = failure.type.value
    body = error_body(kind, failure.status, failure.message, failure.type.value)
    await _send_json(send, failure.status, body, record.request_id)
    record.bytes_to_client = len(body)


class _TrackedSend:
    """The ASGI ``send``, noting when the response has been sent whole."""

    __slots__ = ("_send", "finished")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            # Set first: hypercorn queues its http.disconnect inside this very
            # send, and the watcher may see it before the send returns.
            self.finished = True
        await self._send(message)


async def _watch_disconnect(
    receive: Receive, scope: trio.CancelScope, record: RequestRecord, response: _TrackedSend
) -> None:
    """Cancel ``scope`` when the client disconnects. A checkpoint; never returns otherwise.

    Hypercorn also reports ``http.disconnect`` once a complete response has
    gone out; that one is not a cancellation.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not response.finished:
                record.cancelled = True
                scope.cancel(reason="client disconnected")
            return


async def _send_raw(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    headers: list[tuple[bytes, bytes]],
) -> None:
    headers = [
        *headers,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await _send_raw(
        send, status, body, request_id, [(b"content-type", b"application/json")] + (extra or [])
    )
