"""The checks a request passes before anything goes upstream, in their order.

Each check raises :class:`RequestError`, which the app answers in the
endpoint's own error shape. The order (see docs/configuration.md) is: route
and method (the app), client key, declared body size, the body itself (read
with a bound and a deadline), content type, JSON or the multipart form, the
model and the key's allowlist, forwarded header values, then the key's rate
limits, last, so a client's mistakes never use up its minute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import trio

from trio_gateway._accounting.limiter import LimiterUnavailable, RateLimiter
from trio_gateway._core.buckets import retry_after_header
from trio_gateway._core.config import GatewayConfig, KeyEntry, ModelRoute
from trio_gateway._core.kinds import Kind
from trio_gateway._core.multipart import MultipartError, replace_form_field
from trio_gateway._proxy.asgi import Receive, RequestHeaders, Scope, is_field_value

__all__ = ["ANONYMOUS", "Prepared", "RequestError", "admit", "authenticate", "prepare"]

ANONYMOUS = KeyEntry("anonymous", "")  # with allow_anonymous: no key, no limits


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request that passed the checks: its route and the body to send upstream."""

    route: ModelRoute
    body: bytes
    content_type: str
    stream: bool


def require_method(scope: Scope, method: str) -> None:
    """RequestError(405, with ``Allow``) unless the request uses ``method``."""
    if scope["method"] != method:
        message = f"method {scope['method']} not allowed; use {method}"
        raise RequestError(405, message, "method_not_allowed", [(b"allow", method.encode())])


def shown(value: str, limit: int = 100) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters.

    Client input echoed in errors is bounded, so a huge model name cannot
    make a huge error body.
    """
    return repr(value if len(value) <= limit else value[:limit] + "...")


def authenticate(config: GatewayConfig, headers: RequestHeaders) -> KeyEntry:
    """The client's configured key; raises RequestError(401) otherwise.

    Without credentials and with ``allow_anonymous``, an unrestricted key
    named "anonymous".
    """
    presented = headers.x_api_key
    if headers.authorization is not None:
        scheme, _, token = headers.authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            # Credentials were meant, so anonymous access does not apply.
            raise RequestError(401, "expected Authorization: Bearer <key>", "invalid_api_key")
        presented = token.strip()
    if presented is None:
        if config.allow_anonymous:
            return ANONYMOUS
        raise RequestError(401, "missing API key", "invalid_api_key")
    key = config.find_key(presented)
    if key is None:
        raise RequestError(401, "invalid API key", "invalid_api_key")
    return key


async def prepare(
    config: GatewayConfig, kind: Kind, headers: RequestHeaders, receive: Receive, key: KeyEntry
) -> Prepared:
    """Read and check the body, route its model, and build the upstream body.

    A checkpoint. Raises RequestError for the first check that fails.
    Cancelled, it leaves the rest of the body unread: answered early,
    hypercorn closes the connection rather than read on.
    """
    _refuse_declared_oversize(headers, config.max_body_bytes)
    # Hypercorn's timers stop at the request head; a trickled body is bounded here.
    with trio.move_on_after(config.timeouts.request_body) as body_timer:
        body = await _read_body(receive, config.max_body_bytes)
    if body_timer.cancelled_caught:
        seconds = config.timeouts.request_body
        message = f"the request body did not arrive within {seconds:g} s"
        raise RequestError(408, message, "request_timeout")
    content_type = headers.content_type or ""
    if kind is Kind.TRANSCRIPTIONS:
        prepared = _prepare_form(config, body, content_type, key)
    else:
        prepared = _prepare_json(config, kind, body, content_type, key)
    if headers.bad_forwarded is not None:
        message = f"header {headers.bad_forwarded} holds characters a header value may not"
        raise RequestError(400, message, "invalid_header")
    return prepared


async def admit(limiter: RateLimiter, key: KeyEntry) -> None:
    """Count the request against ``key``'s limits; RequestError(429) if over one.

    RequestError(503) when a shared store is unavailable and configured to
    fail closed. A checkpoint when ``key`` has limits (a shared store waits
    on the network, bounded by its own timeout).
    """
    if key.rpm is None and key.tpm is None:
        return
    try:
        wait = await limiter.admit(key)
    except LimiterUnavailable:
        # fail_closed, and the shared store did not answer. Its words name its
        # host, so the client gets the gateway's own.
        message = "rate limits are unavailable; retry shortly"
        raise RequestError(
            503, message, "rate_limits_unavailable", [(b"retry-after", b"1")]
        ) from None
    if wait is not None:
        message = f"rate limit exceeded for this key; retry in {wait:.1f} s"
        raise RequestError(
            429, message, "rate_limit_exceeded", [(b"retry-after", retry_after_header(wait))]
        )


def _route(config: GatewayConfig, model: object, key: KeyEntry) -> ModelRoute:
    """The route for ``model``; RequestError 400, 404, or 403 if ``key`` may not use it."""
    if not isinstance(model, str) or not model:
        raise RequestError(400, "`model` must be a non-empty string", "invalid_model")
    route = config.models.get(model)
    if route is None:
        raise RequestError(404, f"model {shown(model)} does not exist", "model_not_found")
    if not key.allows(model):
        message = f"this key may not use model {shown(model)}"
        raise RequestError(403, message, "model_not_allowed")
    return route


def _refuse_declared_oversize(headers: RequestHeaders, limit: int) -> None:
    """RequestError(413) if ``Content-Length`` announces more than ``limit`` bytes.

    Refused before a byte of the body is read. A body without the header
    (chunked) is bounded while it is read.
    """
    declared = headers.content_length
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is over {limit} bytes", "body_too_large")


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; RequestError(413) as soon as it passes ``limit``.

    A checkpoint. Raises RequestError(400) if the client leaves mid-body.
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


def _prepare_json(
    config: GatewayConfig, kind: Kind, body: bytes, content_type: str, key: KeyEntry
) -> Prepared:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "expected content-type application/json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_json")
    route = _route(config, payload.get("model"), key)
    payload["model"] = route.upstream_model
    stream = kind.streams and payload.get("stream") is True
    if stream and kind is Kind.CHAT:
        options = payload.get("stream_options")
        if not isinstance(options, dict):
            options = payload["stream_options"] = {}
        options["include_usage"] = True  # usage must arrive in the stream
    return Prepared(route, orjson.dumps(payload), "application/json", stream)


def _prepare_form(config: GatewayConfig, body: bytes, content_type: str, key: KeyEntry) -> Prepared:
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise RequestError(415, "expected content-type multipart/form-data")
    if not is_field_value(content_type.encode("latin-1")):
        # It goes upstream as it is, boundary included.
        message = "header content-type holds characters a header value may not"
        raise RequestError(400, message, "invalid_header")
    try:
        model, _ = replace_form_field(body, content_type, "model")
        route = _route(config, model, key)
        _, body = replace_form_field(body, content_type, "model", route.upstream_model)
    except MultipartError as exc:
        raise RequestError(400, str(exc), "invalid_form") from None
    return Prepared(route, body, content_type, stream=False)
