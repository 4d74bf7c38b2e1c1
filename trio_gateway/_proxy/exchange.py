"""One exchange with the upstream: send the request, answer the client, fill the record.

Theory of operation
===================

:meth:`Exchanger.run` is called by the app inside the request's nursery,
beside the disconnect watcher, and owns everything upstream-side:

1. :meth:`~trio_gateway._proxy.upstream.Upstreams.open` sends the request and
   returns at the response headers. A failure there (unreachable, first-byte
   timeout, a stop through the exchange's
   :class:`~trio_gateway._proxy.upstream.ExchangeControl`) is answered as a
   JSON error in the kind's shape.
2. A 2xx event stream is answered with the gateway's own stream headers and
   handed to :func:`~trio_gateway._proxy.pipeline.stream_events`, which owns
   the response from then on and closes it.
3. Anything else is read whole (bounded in size and silence), rewritten if it
   is JSON, and sent with a content-length; this module's ``finally`` closes
   the response.

Cancellation (the client left) can come at any await; every way out closes
the upstream response (shielded, bounded). The record is filled as the
exchange goes, so a cancelled exchange still leaves what it had reached.
"""

from __future__ import annotations

import httpx
import trio

from trio_gateway._accounting.metrics import GatewayMetrics
from trio_gateway._core.config import GatewayConfig, ModelRoute
from trio_gateway._core.extract import Extracted
from trio_gateway._core.kinds import Failure, FailureType, Kind, error_body
from trio_gateway._core.record import RequestRecord
from trio_gateway._proxy.asgi import AsgiBody, Send, send_json, send_raw
from trio_gateway._proxy.pipeline import StreamResult, stream_events
from trio_gateway._proxy.upstream import (
    ExchangeControl,
    UpstreamError,
    Upstreams,
    close_response,
    read_whole_body,
)
from trio_gateway._rewrite import policy_for
from trio_gateway._rewrite.base import REDACTED, InvalidBody, StreamRewriter, rewrite_json_body

__all__ = ["Exchanger"]

# Upstream response headers a client may see; everything else (cookies, provider
# identity, content-length of a body we rewrite) stays behind.
_PASSED_RESPONSE_HEADERS = ("retry-after",)
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class Exchanger:
    """Runs exchanges against the configured upstreams; one instance per gateway."""

    def __init__(
        self, config: GatewayConfig, upstreams: Upstreams, metrics: GatewayMetrics
    ) -> None:
        self._config = config
        self._upstreams = upstreams
        self._metrics = metrics

    async def run(
        self,
        kind: Kind,
        route: ModelRoute,
        request: httpx.Request,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
    ) -> None:
        """Open the upstream exchange and answer the client from it. A checkpoint.

        Cancelled (the client left), it closes the upstream and sends nothing more.
        """
        upstream = self._config.upstreams[route.upstream]
        try:
            response = await self._upstreams.open(upstream, request, control)
        except UpstreamError as exc:
            await _send_failure(send, kind, exc.failure, record)
            return
        record.headers_at = trio.current_time()
        content_type = response.headers.get("content-type", "").lower()
        if response.is_success and content_type.startswith("text/event-stream"):
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
        """Answer from an event stream. A checkpoint; owns and closes ``response``."""
        policy = policy_for(
            kind, route.public_name, free=route.free, upstream_model=route.upstream_model
        )
        rewriter = StreamRewriter(
            policy,
            max_event_bytes=self._config.max_event_bytes,
            secret=self._config.upstreams[route.upstream].api_key.encode(),
        )
        headers = [*_STREAM_HEADERS, (b"x-request-id", record.request_id.encode())]
        record.status = 200
        body = AsgiBody(send)
        result = StreamResult()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            with self._metrics.active_stream():
                await stream_events(
                    response,
                    rewriter,
                    body,
                    self._config.timeouts,
                    control,
                    self._metrics,
                    result,
                )
        finally:
            await close_response(response)  # if stream_events never started
            # Also when cancelled: a client that left still got what it got.
            record.bytes_to_client = body.bytes_sent
            record.first_token_at = result.first_content_at
            _note_extracted(record, policy.extracted)
        if result.failure is not None:
            record.error_type = result.failure.type

    async def _whole(
        self,
        kind: Kind,
        route: ModelRoute,
        response: httpx.Response,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
    ) -> None:
        """Answer from a whole body. A checkpoint; the caller closes ``response``."""
        config = self._config
        try:
            body = await read_whole_body(
                response, config.max_upstream_body_bytes, config.timeouts.idle, control
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
            record.error_type = FailureType.UPSTREAM_STATUS
            await _send_answer(send, record, 502, body)
            return
        policy = policy_for(
            kind, route.public_name, free=route.free, upstream_model=route.upstream_model
        )
        content_type = response.headers.get("content-type", "application/json")
        if status >= 400:
            record.error_type = FailureType.UPSTREAM_STATUS
        try:
            body = rewrite_json_body(body, policy)
        except InvalidBody as exc:
            if status < 400 and kind is Kind.TRANSCRIPTIONS:
                pass  # a transcription may be plain text or subtitles
            else:
                # The client's SDK parses JSON here. An HTML page from a proxy in
                # front of the provider, a 200 that is not the answer, or JSON cut
                # short becomes an error in the kind's shape.
                failure = (
                    FailureType.UPSTREAM_TRUNCATED
                    if exc.truncated
                    else FailureType.UPSTREAM_INVALID
                )
                what = "JSON cut short" if exc.truncated else "a body that is not a JSON object"
                message = f"the upstream answered {status} with {what}"
                if status < 400:
                    status = 502
                    record.error_type = failure
                body = error_body(kind, status, message, failure.value)
                content_type = "application/json"
        _note_extracted(record, policy.extracted)
        upstream_key = config.upstreams[route.upstream].api_key.encode()
        body = body.replace(upstream_key, REDACTED)
        headers = [(b"content-type", content_type.encode())]
        headers.extend(
            (name.encode(), response.headers[name].encode())
            for name in _PASSED_RESPONSE_HEADERS
            if name in response.headers
        )
        await _send_answer(send, record, status, body, headers)


def _note_extracted(record: RequestRecord, extracted: Extracted) -> None:
    record.usage = extracted.usage
    record.upstream_id = extracted.upstream_id
    record.finish_reason = extracted.finish_reason


async def _send_answer(
    send: Send,
    record: RequestRecord,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a whole answer and note it in ``record``. A checkpoint."""
    record.status = status
    if headers is None:
        await send_json(send, status, body, record.request_id)
    else:
        await send_raw(send, status, body, record.request_id, headers)
    record.bytes_to_client = len(body)


async def _send_failure(send: Send, kind: Kind, failure: Failure, record: RequestRecord) -> None:
    """Answer ``failure`` as a JSON error in the kind's shape. A checkpoint."""
    record.error_type = failure.type
    body = error_body(kind, failure.status, failure.message, failure.type.value)
    await _send_answer(send, record, failure.status, body)
