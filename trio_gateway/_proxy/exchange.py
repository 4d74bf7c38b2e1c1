"""One exchange with the upstream: try the deployments, answer the client, fill the record.

Theory of operation
===================

:meth:`Exchanger.run` is called by the app inside the request's nursery,
beside the disconnect watcher, and owns everything upstream-side:

1. **Attempts, before anything is committed** (docs/routing.md). The
   request's :class:`~trio_gateway._core.routing.Plan` names the deployment
   of each attempt: the model's own, then its fallbacks'. An attempt builds
   its upstream request (the body carries that deployment's model name) and
   :meth:`~trio_gateway._proxy.upstream.Upstreams.open` sends it and returns
   at the response headers. A connect error, a reset or a timeout before
   them, or a retryable status (429, 500, 502, 503, 504, 529) ends the
   attempt; while the plan has another, the failed answer is closed, a
   Retry-After is waited for if the next attempt goes back to the same
   deployment, and the next attempt begins. Every attempt and wait of the
   request ends by one deadline, ``first_byte`` seconds after it was routed;
   each attempt may take its share of the time left (the time left over the
   attempts left, itself included), so the last one ends at the deadline.
2. **The commit.** An answer is *committed* when the gateway takes it: a
   whole answer at its headers (any status not retried), an event stream at
   its first body bytes when the request may still retry (they are awaited
   before the client's response start, by
   :func:`~trio_gateway._proxy.router.first_chunk`), else at its headers.
   Nothing is retried after the commit, so nothing is retried once a
   status line or a byte has gone to the client.
3. A committed 2xx event stream is answered with the gateway's own stream
   headers and handed to :func:`~trio_gateway._proxy.pipeline.stream_events`,
   which owns the response from then on and closes it. Its timers are the
   gateway's one :class:`~trio_gateway._proxy.pipeline.Watchdog`, a Trio
   *system task* started with the first stream of each Trio run (so it runs
   whether or not the ASGI server sends lifespan events, and Trio cancels
   it when the run ends). It owns no channel end: it cancels a stream's
   reader scope, or hands its writer the keepalive word without blocking.
4. Anything else is read whole (bounded in size and silence), rewritten if it
   is JSON, and sent with a content-length; this module's ``finally`` closes
   the response. The last failed attempt's answer is passed on the same way
   when no attempt is left, or its failure is answered as a JSON error.

The client sees the public name of the model that answered (a fallback's,
when a fallback answered) and an ``x-gateway-served-by`` header naming it
and its upstream. Cancellation (the client left) can come at any await;
every way out closes the upstream response (shielded, bounded), and no
attempt outlives the request. The record is filled as the exchange goes, so
a cancelled exchange still leaves what it had reached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import orjson
import trio

from trio_gateway._accounting.metrics import GatewayMetrics
from trio_gateway._core.buckets import retry_after_header
from trio_gateway._core.config import GatewayConfig, ModelRoute
from trio_gateway._core.extract import Extracted
from trio_gateway._core.kinds import Failure, FailureType, Kind, error_body
from trio_gateway._core.multipart import replace_form_field
from trio_gateway._core.record import RequestRecord
from trio_gateway._core.routing import (
    RETRYABLE_STATUSES,
    Choice,
    Plan,
    is_retryable,
    retry_after_seconds,
)
from trio_gateway._proxy.asgi import AsgiBody, Send, send_raw
from trio_gateway._proxy.checks import Prepared
from trio_gateway._proxy.pipeline import StreamResult, Watchdog, stream_events
from trio_gateway._proxy.router import Router, first_chunk, wait_until
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
_JSON = (b"content-type", b"application/json")
Header = tuple[bytes, bytes]


@dataclass(slots=True)
class _Taken:
    """An attempt's answer, committed: an event stream, or a whole answer to read."""

    response: httpx.Response
    stream: bool


@dataclass(slots=True)
class _Failed:
    """An attempt that failed before the commit; ``response`` is open for a failed status."""

    failure: Failure
    response: httpx.Response | None = None
    retry_after: float | None = None  # seconds, from the failed answer's Retry-After


class Exchanger:
    """Runs exchanges against the configured upstreams; one instance per gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        upstreams: Upstreams,
        metrics: GatewayMetrics,
        router: Router,
    ) -> None:
        self._config = config
        self._upstreams = upstreams
        self._metrics = metrics
        self._router = router
        self._watchdog = Watchdog()
        self._watchdog_run: trio.lowlevel.TrioToken | None = None  # the run it runs in

    def _running_watchdog(self) -> Watchdog:
        """The streams' watchdog of this Trio run, started on first use. Not a checkpoint."""
        run = trio.lowlevel.current_trio_token()
        if self._watchdog_run is not run:
            self._watchdog, self._watchdog_run = Watchdog(), run
            trio.lowlevel.spawn_system_task(self._watchdog.run, name="trio-gateway stream timers")
        return self._watchdog

    async def run(
        self,
        kind: Kind,
        prepared: Prepared,
        forwarded: list[Header],
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
    ) -> None:
        """Try the deployments until one answers, and answer the client. A checkpoint.

        Cancelled (the client left), it closes the upstream, makes no further
        attempt and sends nothing more.
        """
        plan = self._router.plan(prepared.route)
        record.attempts = 0
        try:
            await self._attempts(kind, prepared, forwarded, send, record, control, plan)
        finally:
            record.failed_attempts = plan.failed_text()

    async def _attempts(
        self,
        kind: Kind,
        prepared: Prepared,
        forwarded: list[Header],
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
        plan: Plan,
    ) -> None:
        """The attempt loop (see the module docstring). A checkpoint."""
        metrics = self._metrics
        deadline = record.started_at + self._config.timeouts.first_byte
        choice = plan.next(trio.current_time(), deadline)
        if choice is None:
            await self._send_unavailable(kind, prepared.route, send, record)
            return
        tried: list[Header] = []  # the served-by header of the last attempt made
        while True:
            try:
                if choice.start_at > trio.current_time():  # a Retry-After holds it back
                    await wait_until(choice.start_at, control)
                control.check()  # a stopped exchange sends nothing more upstream
            except UpstreamError as exc:
                plan.abandon(choice)
                await _send_failure(send, kind, exc.failure, record, tried)
                return
            except BaseException:
                plan.abandon(choice)
                raise
            served = self._router.served_by(choice)
            tried = [served]
            record.attempts += 1
            record.upstream = choice.deployment.upstream
            record.upstream_model = choice.deployment.upstream_model
            metrics.deployment_attempt(choice.route.public_name, choice.deployment.upstream)
            ends_at = plan.attempt_deadline(trio.current_time(), deadline)
            try:
                outcome = await self._attempt(
                    kind, prepared, forwarded, choice, record, control, ends_at, plan.may_retry
                )
            except BaseException:
                plan.abandon(choice)
                raise
            if isinstance(outcome, _Taken):
                plan.succeeded(choice)
                await self._answer(kind, choice, outcome, send, record, control, served)
                return
            following = None
            if is_retryable(outcome.failure):
                now = trio.current_time()
                model, upstream = choice.route.public_name, choice.deployment.upstream
                metrics.deployment_failure(model, upstream)
                status = None if outcome.response is None else outcome.response.status_code
                if plan.failed(
                    choice, outcome.failure, now, status=status, retry_after=outcome.retry_after
                ):
                    metrics.deployment_cooldown(model, upstream)
                if now < deadline:  # past it, an attempt could only time out at once
                    following = plan.next(now, deadline)
            else:
                plan.abandon(choice)
            if following is None:  # the last attempt: its answer or its failure goes out
                if outcome.response is not None:
                    taken = _Taken(outcome.response, stream=False)
                    await self._answer(kind, choice, taken, send, record, control, served)
                else:
                    await _send_failure(send, kind, outcome.failure, record, [served])
                return
            if outcome.response is not None:
                await close_response(outcome.response)
            choice = following

    async def _attempt(
        self,
        kind: Kind,
        prepared: Prepared,
        forwarded: list[Header],
        choice: Choice,
        record: RequestRecord,
        control: ExchangeControl,
        deadline: float,
        may_retry: bool,
    ) -> _Taken | _Failed:
        """One attempt, up to its commit or its failure. A checkpoint.

        Returns the committed answer, or how the attempt failed (with the
        response still open for a failed status). Cancelled, it closes what
        it opened.
        """
        deployment = choice.deployment
        upstream = self._config.upstreams[deployment.upstream]
        request = self._upstreams.build_request(
            upstream,
            kind,
            _body_for(kind, prepared, deployment.upstream_model),
            content_type=prepared.content_type,
            stream=prepared.stream,
            forwarded=forwarded,
        )
        try:
            response = await self._upstreams.open(upstream, request, control, deadline=deadline)
        except UpstreamError as exc:
            return _Failed(exc.failure)
        record.headers_at = trio.current_time()
        status = response.status_code
        if status in RETRYABLE_STATUSES:
            failure = Failure(FailureType.UPSTREAM_STATUS, f"the upstream answered {status}")
            wait = retry_after_seconds(response.headers.get("retry-after"), time.time())
            return _Failed(failure, response, wait)
        content_type = response.headers.get("content-type", "").lower()
        stream = response.is_success and content_type.startswith("text/event-stream")
        if stream and may_retry:
            # Not committed until its first bytes: a silent 200 can still be retried.
            first_byte = self._config.timeouts.first_byte
            try:
                await first_chunk(response, deadline, control, first_byte)
            except UpstreamError as exc:
                await close_response(response)
                return _Failed(exc.failure)
            except BaseException:
                await close_response(response)
                raise
        return _Taken(response, stream)

    async def _answer(
        self,
        kind: Kind,
        choice: Choice,
        taken: _Taken,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
        served: Header,
    ) -> None:
        """Answer the client from a committed answer. A checkpoint; closes the response."""
        if taken.stream:
            await self._stream(kind, choice, taken.response, send, record, control, served)
            return
        try:
            await self._whole(kind, choice, taken.response, send, record, control, served)
        finally:
            await close_response(taken.response)

    async def _stream(
        self,
        kind: Kind,
        choice: Choice,
        response: httpx.Response,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
        served: Header,
    ) -> None:
        """Answer from an event stream. A checkpoint; owns and closes ``response``."""
        route, deployment = choice.route, choice.deployment
        policy = policy_for(
            kind, route.public_name, free=route.free, upstream_model=deployment.upstream_model
        )
        rewriter = StreamRewriter(
            policy,
            max_event_bytes=self._config.max_event_bytes,
            secret=self._config.upstreams[deployment.upstream].api_key.encode(),
        )
        headers = [*_STREAM_HEADERS, (b"x-request-id", record.request_id.encode()), served]
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
                    self._running_watchdog(),
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
        choice: Choice,
        response: httpx.Response,
        send: Send,
        record: RequestRecord,
        control: ExchangeControl,
        served: Header,
    ) -> None:
        """Answer from a whole body. A checkpoint; the caller closes ``response``."""
        config = self._config
        route, deployment = choice.route, choice.deployment
        try:
            body = await read_whole_body(
                response, config.max_upstream_body_bytes, config.timeouts.idle, control
            )
        except UpstreamError as exc:
            await _send_failure(send, kind, exc.failure, record, [served])
            return
        status = response.status_code
        if status in (401, 403, 407):
            # The upstream refused the gateway's own credentials: the client can
            # do nothing about it, and the upstream's words may quote the key.
            message = "the upstream refused the gateway's credentials"
            body = error_body(kind, 502, message, "upstream_auth")
            record.error_type = FailureType.UPSTREAM_STATUS
            await _send_answer(send, record, 502, body, [_JSON, served])
            return
        policy = policy_for(
            kind, route.public_name, free=route.free, upstream_model=deployment.upstream_model
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
        upstream_key = config.upstreams[deployment.upstream].api_key.encode()
        body = body.replace(upstream_key, REDACTED)
        headers = [(b"content-type", content_type.encode())]
        headers.extend(
            (name.encode(), response.headers[name].encode())
            for name in _PASSED_RESPONSE_HEADERS
            if name in response.headers
        )
        headers.append(served)
        await _send_answer(send, record, status, body, headers)

    async def _send_unavailable(
        self, kind: Kind, route: ModelRoute, send: Send, record: RequestRecord
    ) -> None:
        """Answer 503 when every deployment of the chain cools down. A checkpoint.

        No attempt was made: a probe of each cooling model is already in
        flight, and nothing else is left to try.
        """
        last, wait = self._router.unavailable(route, trio.current_time())
        failure_type = last.type if last is not None else FailureType.UPSTREAM_UNREACHABLE
        message = (
            "every deployment of this model is cooling down after failures; "
            f"retry in {retry_after_header(wait).decode()} s"
        )
        record.error_type = failure_type
        body = error_body(kind, 503, message, failure_type.value)
        await _send_answer(
            send, record, 503, body, [_JSON, (b"retry-after", retry_after_header(wait))]
        )


def _body_for(kind: Kind, prepared: Prepared, upstream_model: str) -> bytes:
    """The upstream body for a deployment: the prepared one, with its model name."""
    if upstream_model == prepared.route.upstream_model:
        return prepared.body  # the checks already put the first deployment's name in
    if kind is Kind.TRANSCRIPTIONS:
        _, body = replace_form_field(prepared.body, prepared.content_type, "model", upstream_model)
        return body
    payload = orjson.loads(prepared.body)
    payload["model"] = upstream_model
    return orjson.dumps(payload)


def _note_extracted(record: RequestRecord, extracted: Extracted) -> None:
    record.usage = extracted.usage
    record.upstream_id = extracted.upstream_id
    record.finish_reason = extracted.finish_reason


async def _send_answer(
    send: Send,
    record: RequestRecord,
    status: int,
    body: bytes,
    headers: list[Header],
) -> None:
    """Send a whole answer and note it in ``record``. A checkpoint."""
    record.status = status
    await send_raw(send, status, body, record.request_id, headers)
    record.bytes_to_client = len(body)


async def _send_failure(
    send: Send, kind: Kind, failure: Failure, record: RequestRecord, extra: list[Header]
) -> None:
    """Answer ``failure`` as a JSON error in the kind's shape. A checkpoint."""
    record.error_type = failure.type
    body = error_body(kind, failure.status, failure.message, failure.type.value)
    await _send_answer(send, record, failure.status, body, [_JSON, *extra])
