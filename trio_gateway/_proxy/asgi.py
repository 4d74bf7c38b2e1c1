"""The ASGI edge: the request's headers parsed once, and the helpers that answer.

This is the one place that reads ``scope["headers"]``: :meth:`RequestHeaders.parse`
walks them once per request and keeps what the gateway uses (credentials,
content type and length, the few client headers forwarded upstream). Every
other module asks the parsed object.

The send helpers are checkpoints (each ``send`` waits for hypercorn to take
the bytes); cancelled, they leave the response unfinished, which the server
turns into a cut connection, never into a clean end.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import trio

__all__ = [
    "FORWARDED_CLIENT_HEADERS",
    "AsgiBody",
    "Message",
    "Receive",
    "RequestHeaders",
    "Scope",
    "Send",
    "TrackedSend",
    "is_field_value",
    "send_json",
    "send_raw",
    "watch_disconnect",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Client headers that carry API semantics (versions, beta features), not identity.
FORWARDED_CLIENT_HEADERS = frozenset({b"anthropic-version", b"anthropic-beta", b"openai-beta"})
# What a forwarded value may hold: visible ASCII, spaces and tabs (RFC 9110
# field-value, without obs-text), so no CR, LF or NUL can reach an upstream
# header line whatever the server in front let through.
_FIELD_VALUE = re.compile(rb"[\x20-\x7e\t]*")


def is_field_value(value: bytes) -> bool:
    """Whether ``value`` may go into an upstream header line as it is."""
    return _FIELD_VALUE.fullmatch(value) is not None


class RequestHeaders:
    """The request headers the gateway reads, from one pass over the ASGI scope.

    Values are latin-1 text as ASGI gives them; the first of repeated headers
    wins. ``forwarded`` holds the client headers that go upstream as they
    are, and ``bad_forwarded`` names the first of them whose value is not
    plain visible ASCII (the checks refuse such a request).
    """

    __slots__ = (
        "authorization",
        "bad_forwarded",
        "content_length",
        "content_type",
        "forwarded",
        "x_api_key",
    )

    def __init__(self) -> None:
        self.authorization: str | None = None
        self.x_api_key: str | None = None
        self.content_type: str | None = None
        self.content_length: str | None = None
        self.forwarded: list[tuple[bytes, bytes]] = []
        self.bad_forwarded: str | None = None

    @classmethod
    def parse(cls, raw: Sequence[tuple[bytes, bytes]]) -> RequestHeaders:
        """Read ``raw`` (ASGI's lower-cased name, value pairs) once. Not a checkpoint."""
        headers = cls()
        for name, value in raw:
            if name in FORWARDED_CLIENT_HEADERS:
                value = bytes(value)
                headers.forwarded.append((name, value))
                if headers.bad_forwarded is None and not is_field_value(value):
                    headers.bad_forwarded = name.decode("ascii")
            elif name == b"authorization":
                if headers.authorization is None:
                    headers.authorization = bytes(value).decode("latin-1")
            elif name == b"x-api-key":
                if headers.x_api_key is None:
                    headers.x_api_key = bytes(value).decode("latin-1")
            elif name == b"content-type":
                if headers.content_type is None:
                    headers.content_type = bytes(value).decode("latin-1")
            elif name == b"content-length" and headers.content_length is None:
                headers.content_length = bytes(value).decode("latin-1")
        return headers


class AsgiBody:
    """The response body through ASGI ``send``, counting the bytes sent."""

    __slots__ = ("_send", "bytes_sent")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.bytes_sent = 0

    async def send(self, data: bytes) -> None:
        """Send part of the body. A checkpoint."""
        self.bytes_sent += len(data)
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes) -> None:
        """Send the last part of the body and end it. A checkpoint."""
        self.bytes_sent += len(data)
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


class TrackedSend:
    """The ASGI ``send``, noting when the response has been sent whole.

    ``client_left`` is set by :func:`watch_disconnect` when the client went
    away before that.
    """

    __slots__ = ("_send", "client_left", "finished")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.finished = False
        self.client_left = False

    async def send(self, message: Message) -> None:
        """Pass ``message`` on. A checkpoint."""
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            # Set first: hypercorn queues its http.disconnect inside this very
            # send, and the watcher may see it before the send returns.
            self.finished = True
        await self._send(message)


async def watch_disconnect(
    receive: Receive, scope: trio.CancelScope, response: TrackedSend
) -> None:
    """Cancel ``scope`` when the client disconnects. A checkpoint; never returns otherwise.

    Hypercorn reports a client that left as ``http.disconnect`` but does not
    cancel the app. It also reports ``http.disconnect`` once a complete
    response has gone out; that one is not a cancellation.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not response.finished:
                response.client_left = True
                scope.cancel(reason="client disconnected")
            return


async def send_raw(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    headers: Sequence[tuple[bytes, bytes]],
) -> None:
    """A whole answer: ``headers`` plus content-length and x-request-id. A checkpoint."""
    all_headers = [
        *headers,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    request_id: str,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """A whole JSON answer (see :func:`send_raw`). A checkpoint."""
    await send_raw(send, status, body, request_id, [(b"content-type", b"application/json"), *extra])
