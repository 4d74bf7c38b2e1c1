"""Rewriting answers on their way to the client: streams event by event, JSON whole.

No I/O. :class:`StreamRewriter` joins the SSE codec to a kind's
:class:`Policy`. It is fed whatever one upstream read produced and returns the
bytes to send on, always whole items, so nothing the pipeline sends in
between (a keepalive comment, an error event) can split an event.

The rules every kind shares live here:

* upstream comments become the gateway's own comment, so the upstream's
  identity does not leak;
* ``data: [DONE]`` is held back and sent last, and only if upstream sent it
  and the stream ended cleanly; a failure ends the stream with the kind's
  error event instead;
* an event the policy leaves alone goes out byte for byte (``raw``); a
  changed one is re-serialised compactly, keeping its ``event:``, ``id:`` and
  ``retry:`` lines;
* a final event that lacked its blank line is delivered, terminated.
"""

from __future__ import annotations

from typing import Any

import orjson

from trio_gateway._kinds import Failure
from trio_gateway.sse import DEFAULT_MAX_EVENT_BYTES, SSEDecoder, SSEEvent

__all__ = [
    "GATEWAY_COMMENT",
    "PassThroughPolicy",
    "Policy",
    "StreamRewriter",
    "rewrite_json_body",
    "strip_cost",
]

GATEWAY_COMMENT = b": trio-gateway\n\n"
DONE = b"data: [DONE]\n\n"
_COST_FIELDS = ("cost", "cost_details", "is_byok")


def strip_cost(usage: object) -> bool:
    """Remove the upstream's cost fields from a usage object; return whether any were there."""
    if not isinstance(usage, dict):
        return False
    changed = False
    for name in _COST_FIELDS:
        if name in usage:
            del usage[name]
            changed = True
    return changed


def set_model(obj: dict[str, Any], key: str, public_model: str) -> bool:
    """Put the public model name at ``obj[key]`` if a model is there; return whether it changed."""
    if obj.get(key) is None or obj[key] == public_model:
        return False
    obj[key] = public_model
    return True


def reencode(event: SSEEvent, payload: dict[str, Any]) -> bytes:
    """Wire bytes of ``event`` with its data replaced by compact JSON of ``payload``."""
    head = b""
    if event.event is not None:
        head += b"event: " + event.event.encode() + b"\n"
    if event.id is not None:
        head += b"id: " + event.id.encode() + b"\n"
    if event.retry is not None:
        head += b"retry: %d\n" % event.retry
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


def parse_object(data: str | None) -> dict[str, Any] | None:
    """The JSON object in ``data``, or None when it is absent, not JSON or not an object."""
    if not data:
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Policy:
    """One API kind's rewrite rules. Subclasses override the two hooks.

    ``rewrite_event`` returns the bytes to send instead of ``event``, or None
    to forward ``event.raw`` unchanged (the cheap path: decide from the event
    name without parsing JSON wherever the kind allows).
    """

    def __init__(self, public_model: str, *, free: bool) -> None:
        self.public_model = public_model
        self.free = free

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        raise NotImplementedError

    def error_event(self, failure: Failure) -> bytes:
        raise NotImplementedError


class PassThroughPolicy(Policy):
    """For kinds with no stream rules of their own (a streamed transcription, say).

    Events pass untouched unless they carry a top-level ``model``, which
    becomes the public name; a failure ends the stream with an OpenAI-style
    ``{"error": ...}`` event.
    """

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        if event.data is None or '"model"' not in event.data:
            return None
        payload = parse_object(event.data)
        if payload is None or not set_model(payload, "model", self.public_model):
            return None
        return reencode(event, payload)

    def error_event(self, failure: Failure) -> bytes:
        payload = {"error": {"message": failure.message, "type": failure.type.value}}
        return b"data: " + orjson.dumps(payload) + b"\n\n"


def _terminated(raw: bytes) -> bytes:
    """``raw`` of a final event that lacked its blank line, with one added."""
    if raw.endswith(b"\n"):
        return raw + b"\n"
    if raw.endswith(b"\r"):
        return raw + b"\r"
    return raw + b"\n\n"


class StreamRewriter:
    """Rewrites one event stream; see the module docstring for the rules."""

    __slots__ = ("_decoder", "_policy", "saw_done")

    def __init__(self, policy: Policy, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._decoder = SSEDecoder(max_event_bytes)
        self._policy = policy
        self.saw_done = False

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send for ``chunk`` (maybe empty). Raises SSEError on a runaway event."""
        return self._render(self._decoder.feed(chunk), final=False)

    def finish(self) -> bytes:
        """Bytes to send at a clean end of the upstream stream, ``[DONE]`` last if it came."""
        out = self._render(self._decoder.close(), final=True)
        return out + DONE if self.saw_done else out

    def fail(self, failure: Failure) -> bytes:
        """The kind's error event. An unfinished upstream event is dropped: it may be cut short."""
        return self._policy.error_event(failure)

    def _render(self, items: list[SSEEvent], *, final: bool) -> bytes:
        parts: list[bytes] = []
        rewrite = self._policy.rewrite_event
        for item in items:
            if item.comment is not None:
                parts.append(GATEWAY_COMMENT)
            elif item.data == "[DONE]":
                self.saw_done = True
            else:
                out = rewrite(item)
                if out is not None:
                    parts.append(out)
                elif final:
                    parts.append(_terminated(item.raw))
                else:
                    parts.append(item.raw)
        return b"".join(parts)


def rewrite_json_body(body: bytes, public_model: str, *, free: bool) -> bytes:
    """A non-streamed answer with the public model name and, for free models, no cost.

    Every kind keeps ``model`` and ``usage`` at the top level of its JSON
    body. A body that is not a JSON object is returned unchanged.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(obj, dict):
        return body
    changed = set_model(obj, "model", public_model)
    if free:
        changed |= strip_cost(obj.get("usage"))
    return orjson.dumps(obj) if changed else body
