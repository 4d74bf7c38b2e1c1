"""Rewriting answers on their way to the client: streams event by event, JSON whole.

No I/O. :class:`StreamRewriter` joins the SSE codec to a kind's
:class:`Policy`. It is fed whatever one upstream read produced and returns the
bytes to send on, always whole items, so nothing the pipeline sends in
between (a keepalive comment, an error event) can split an event.

The rules every kind shares live here:

* upstream comments become the gateway's own comment, so the upstream's
  identity does not leak;
* the events that claim a complete answer (``data: [DONE]``, and each kind's
  terminal events such as ``message_stop`` or ``response.completed``) are
  held back until the upstream body has ended cleanly, with everything after
  them; ``[DONE]`` goes out last, and only if upstream sent it. A failure
  drops what was held and ends the stream with the kind's error event, so a
  client never sees a clean end followed by an error;
* an event the policy leaves alone goes out byte for byte (``raw``); a
  changed one is re-serialised compactly, keeping its ``event:``, ``id:`` and
  ``retry:`` lines. The output is always valid UTF-8 (the body says
  ``charset=utf-8`` and both official SDKs decode strictly): raw bytes that
  are not valid UTF-8 go out with each invalid sequence replaced by U+FFFD,
  as the codec decoded them, and with their line structure intact;
* a final event that lacked its blank line is delivered, terminated;
* the upstream's key, should the upstream echo it, goes out as
  ``[redacted]``.
"""

from __future__ import annotations

from typing import Any

import orjson

from trio_gateway._core.extract import Extracted, from_embeddings, from_json_body
from trio_gateway._core.kinds import Failure
from trio_gateway.sse import DEFAULT_MAX_EVENT_BYTES, SSEDecoder, SSEEvent

__all__ = [
    "GATEWAY_COMMENT",
    "REDACTED",
    "PassThroughPolicy",
    "Policy",
    "StreamRewriter",
    "rewrite_json_body",
    "strip_cost",
]

GATEWAY_COMMENT = b": trio-gateway\n\n"
REDACTED = b"[redacted]"
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
    name without parsing JSON wherever the kind allows). ``terminal_events``
    names the events that claim the answer is complete.
    """

    terminal_events: frozenset[str] = frozenset()

    def __init__(self, public_model: str, *, free: bool) -> None:
        self.public_model = public_model
        self.free = free
        self.extracted = Extracted()  # usage and ids, read before any stripping
        self.content_started = False  # a content token has passed

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
        data = event.data
        if data is None or ('"model"' not in data and '"usage"' not in data):
            return None
        payload = parse_object(data)
        if payload is None:
            return None
        from_embeddings(payload, self.extracted)
        changed = set_model(payload, "model", self.public_model)
        if self.free:
            changed |= strip_cost(payload.get("usage"))
        return reencode(event, payload) if changed else None

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


def _valid_utf8(raw: bytes) -> bytes:
    """``raw`` itself if it is valid UTF-8, else with U+FFFD for each invalid sequence."""
    if raw.isascii():  # the common case, checked at C speed
        return raw
    try:
        raw.decode()
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").encode()
    return raw


class StreamRewriter:
    """Rewrites one event stream; see the module docstring for the rules."""

    __slots__ = ("_decoder", "_held", "_policy", "_secret", "_terminal", "saw_done")

    def __init__(
        self,
        policy: Policy,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        secret: bytes = b"",
    ) -> None:
        self._decoder = SSEDecoder(max_event_bytes)
        self._policy = policy
        self._terminal = policy.terminal_events
        self._held: list[bytes] | None = None  # a list once a terminal event arrived
        self._secret = secret  # replaced with REDACTED wherever the upstream echoes it
        self.saw_done = False

    @property
    def policy(self) -> Policy:
        return self._policy

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send for ``chunk`` (maybe empty). Raises SSEError on a runaway event."""
        return self._redacted(self._render(self._decoder.feed(chunk), final=False))

    def finish(self) -> bytes:
        """Bytes to send at a clean end of the upstream stream: held events, ``[DONE]`` last."""
        out = self._render(self._decoder.close(), final=True)
        if self._held:
            out += b"".join(self._held)
        return self._redacted(out + DONE if self.saw_done else out)

    def _redacted(self, out: bytes) -> bytes:
        # Output is whole events and a key holds no line break, so a key is
        # never split between two outputs. One C-speed search per read.
        if self._secret and self._secret in out:
            return out.replace(self._secret, REDACTED)
        return out

    def fail(self, failure: Failure) -> bytes:
        """The kind's error event, instead of anything held and any unfinished event."""
        self._held = None
        return self._policy.error_event(failure)

    def _render(self, items: list[SSEEvent], *, final: bool) -> bytes:
        parts: list[bytes] = []
        rewrite = self._policy.rewrite_event
        for item in items:
            if item.comment is not None:
                out = GATEWAY_COMMENT
            elif item.data == "[DONE]":
                self.saw_done = True
                continue
            else:
                rewritten = rewrite(item)
                if rewritten is not None:
                    out = rewritten
                elif final:
                    out = _valid_utf8(_terminated(item.raw))
                else:
                    out = _valid_utf8(item.raw)
                if self._held is None and item.event in self._terminal:
                    self._held = []
            if self._held is None:
                parts.append(out)
            else:
                self._held.append(out)
        return b"".join(parts)


def rewrite_json_body(
    body: bytes,
    public_model: str,
    *,
    free: bool,
    kind: str = "",
    extracted: Extracted | None = None,
) -> bytes | None:
    """A non-streamed answer with the public model name and, for free models, no cost.

    Every kind keeps ``model`` and ``usage`` at the top level of its JSON
    body. None if the body is not a JSON object. With ``extracted``, the
    usage the body reports (``kind`` decides where to look) is read into it
    first.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if extracted is not None:
        from_json_body(kind, obj, extracted)
    changed = set_model(obj, "model", public_model)
    if free:
        changed |= strip_cost(obj.get("usage"))
    return orjson.dumps(obj) if changed else body
