"""Rewriting answers on their way to the client: streams event by event, JSON whole.

No I/O. :class:`StreamRewriter` joins the SSE codec to a kind's
:class:`Policy`. It is fed whatever one upstream read produced and returns the
bytes to send on, always whole items, so nothing the pipeline sends in
between (a keepalive comment, an error event) can split an event.

One rule set, two paths: each kind's policy rewrites an object (a chunk, a
``message``, a ``response``) with the same function whether the object came
in an event or as a whole JSON body (:func:`rewrite_json_body`), so a stream
and a JSON answer from the same upstream get the same rules.

The rules every kind shares live here:

* **A stream is complete only when its kind's end arrived** (the policy's
  ``complete``: Chat's ``[DONE]`` or a finished choice followed only by usage
  chunks, Messages' ``message_stop``, Responses' ``response.completed``,
  ``.incomplete`` or ``.failed``). An upstream body that ends cleanly
  before that is a truncation: :meth:`StreamRewriter.finish` ends the stream
  with the kind's error event (``upstream_truncated``), whatever the
  transport said.
* **An event the kind needs as JSON that is not a JSON object** ends the
  stream with the kind's error event (``upstream_invalid``); nothing of it
  is forwarded (its text may carry the upstream's model name). The last
  event of a body that ended without its blank line and does not parse is
  a cut, so it counts as a truncation.
* upstream comments become the gateway's own comment, so the upstream's
  identity does not leak;
* the events that claim a complete answer (``data: [DONE]``, and each kind's
  terminal events such as ``message_stop`` or ``response.completed``) are
  held back until the upstream body has ended cleanly, with everything after
  them; ``[DONE]`` goes out last, and only if upstream sent it, with its own
  ``id:`` line. A failure drops what was held and ends the stream with the
  kind's error event, so a client never sees a clean end followed by an
  error;
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

import json
import re
from typing import Any

import orjson

from trio_gateway._core.extract import Extracted, from_embeddings
from trio_gateway._core.kinds import Failure, FailureType
from trio_gateway.sse import DEFAULT_MAX_EVENT_BYTES, SSEDecoder, SSEError, SSEEvent

__all__ = [
    "GATEWAY_COMMENT",
    "REDACTED",
    "InvalidBody",
    "InvalidEvent",
    "PassThroughPolicy",
    "Policy",
    "StreamRewriter",
    "rewrite_json_body",
    "strip_cost",
]

GATEWAY_COMMENT = b": trio-gateway\n\n"
REDACTED = b"[redacted]"
_COST_FIELDS = ("cost", "cost_details", "is_byok")
# What a JSON value cut short can end in: nothing, a number, or part of a literal.
_PARTIAL_VALUE = re.compile(r"-[0-9]*|t|tr|tru|f|fa|fal|fals|n|nu|nul")
_NUMBER_TAIL = re.compile(r"\.[0-9]*(?:[eE][-+]?[0-9]*)?|[eE][-+]?[0-9]*")


class InvalidEvent(Exception):
    """An event the kind needs as JSON holds something else; the message is client-safe."""


class InvalidBody(Exception):
    """A whole answer that is not a JSON object; ``truncated`` if it is JSON cut short."""

    def __init__(self, truncated: bool) -> None:
        super().__init__("truncated JSON" if truncated else "not a JSON object")
        self.truncated = truncated


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


def require_object(event: SSEEvent) -> dict[str, Any] | None:
    """The JSON object in ``event``'s data; None for a block no client dispatches.

    A block of only unknown fields is not dispatched by SSE clients, so it
    passes. Any other block (a name, an id, a retry, or data, even empty)
    is handed to the SDK's JSON parser, so its data must be a JSON object:
    otherwise :class:`InvalidEvent`.
    """
    data = event.data
    if data is None and event.event is None and event.id is None and event.retry is None:
        return None
    payload = parse_object(data)
    if payload is None:
        name = "an event" if event.event is None else f"a {event.event!r} event"
        raise InvalidEvent(f"the upstream sent {name} whose data is not a JSON object")
    return payload


class Policy:
    """One API kind's rewrite rules. Subclasses override the hooks.

    ``rewrite_event`` returns the bytes to send instead of ``event``, or None
    to forward ``event.raw`` unchanged, and raises :class:`InvalidEvent` for
    an event the kind needs as JSON that is not. ``rewrite_body`` applies the
    same rules to a whole JSON answer in place. ``terminal_events`` names the
    events that claim the answer is complete; ``complete`` says whether the
    kind's end has arrived.
    """

    terminal_events: frozenset[str] = frozenset()
    done_completes = False  # whether ``data: [DONE]`` ends this kind's answer

    def __init__(self, public_model: str, *, free: bool, upstream_model: str = "") -> None:
        self.public_model = public_model
        self.upstream_model = upstream_model  # hidden in the upstream's error messages
        self.free = free
        self.extracted = Extracted()  # usage and ids, read before any stripping
        self.content_started = False  # a content token has passed
        self.complete = False  # the kind's end event arrived

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        raise NotImplementedError

    def hide_upstream_model(self, value: object) -> bool:
        """Put the public name for the upstream model's in every string of an error object.

        Error messages often name the model ("vendor/model is rate-limited").
        Generated content is never touched: only the objects a policy knows
        to be the upstream's errors come here. Returns whether any changed.
        """
        hidden = self.upstream_model
        if not hidden:
            return False
        changed = False
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, str):
                    if hidden in item:
                        value[key] = item.replace(hidden, self.public_model)
                        changed = True
                else:
                    changed |= self.hide_upstream_model(item)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    if hidden in item:
                        value[index] = item.replace(hidden, self.public_model)
                        changed = True
                else:
                    changed |= self.hide_upstream_model(item)
        return changed

    def rewrite_body(self, body: dict[str, Any]) -> bool:
        """Read usage from a whole JSON answer and rewrite it in place; whether it changed."""
        raise NotImplementedError

    def error_event(self, failure: Failure) -> bytes:
        raise NotImplementedError


class PassThroughPolicy(Policy):
    """For kinds with no stream rules of their own (a streamed transcription, say).

    Events pass untouched unless they carry a top-level ``model`` or
    ``usage``: the model becomes the public name, and a free route loses the
    cost. Data need not be JSON. The answer is complete at ``[DONE]`` or at
    an event whose name ends in ``.done`` (``transcript.text.done``). A
    failure ends the stream with an OpenAI-style ``{"error": ...}`` event.
    """

    done_completes = True

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        if event.event is not None and event.event.endswith(".done"):
            self.complete = True
        data = event.data
        if data is None or ('"model"' not in data and '"usage"' not in data):
            if data is not None and '.done"' in data and not self.complete:
                payload = parse_object(data)
                kind = payload.get("type") if payload is not None else None
                self.complete = isinstance(kind, str) and kind.endswith(".done")
            return None
        payload = parse_object(data)
        if payload is None:
            return None
        kind = payload.get("type")
        if isinstance(kind, str) and kind.endswith(".done"):
            self.complete = True
        return reencode(event, payload) if self.rewrite_body(payload) else None

    def rewrite_body(self, body: dict[str, Any]) -> bool:
        from_embeddings(body, self.extracted)
        changed = set_model(body, "model", self.public_model)
        changed |= self.hide_upstream_model(body.get("error"))
        if self.free:
            changed |= strip_cost(body.get("usage"))
        return changed

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


def valid_utf8(raw: bytes) -> bytes:
    """``raw`` itself if it is valid UTF-8, else with U+FFFD for each invalid sequence."""
    if raw.isascii():  # the common case, checked at C speed
        return raw
    try:
        raw.decode()
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").encode()
    return raw


_TRUNCATED_MESSAGE = "the upstream ended the answer before its end event"


class StreamRewriter:
    """Rewrites one event stream; see the module docstring for the rules.

    Once the upstream's bytes show a failure (an invalid event, a runaway
    one), ``failure`` is set: the bytes returned with it are the events
    before the failure, and everything fed after it is ignored. The caller
    then ends the stream with :meth:`fail`.
    """

    __slots__ = ("_decoder", "_done", "_held", "_policy", "_secret", "_terminal", "failure")

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
        self._done: bytes | None = None  # the upstream's [DONE] event, as it will go out
        self.failure: Failure | None = None

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def saw_done(self) -> bool:
        return self._done is not None

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send for ``chunk`` (maybe empty); sets ``failure`` if the bytes show one."""
        if self.failure is not None:
            return b""
        try:
            items = self._decoder.feed(chunk)
        except SSEError as exc:
            self.failure = Failure(FailureType.REWRITE_ERROR, str(exc))
            return b""
        return self._redacted(self._render(items, final=False))

    def finish(self) -> bytes:
        """Bytes to send at a clean end of the upstream body.

        For a complete answer: the last events, held events, ``[DONE]`` last.
        For an answer whose end never came (or whose last bytes fail), the
        events before the failure; ``failure`` is then set, and the caller
        ends the stream with :meth:`fail`. Not to be called after a failure.
        """
        try:
            items = self._decoder.close()
        except SSEError as exc:
            self.failure = Failure(FailureType.REWRITE_ERROR, str(exc))
            return b""
        out = self._render(items, final=True)
        if self.failure is not None:
            return self._redacted(out)
        done = self._done is not None and self._policy.done_completes
        if not (done or self._policy.complete):
            self.failure = Failure(FailureType.UPSTREAM_TRUNCATED, _TRUNCATED_MESSAGE)
            return self._redacted(out)
        if self._held:
            out += b"".join(self._held)
        if self._done is not None:
            out += self._done
        return self._redacted(out)

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
        """Bytes for ``items``; ``final``: they are the block the body ended in, unterminated."""
        parts: list[bytes] = []
        rewrite = self._policy.rewrite_event
        for item in items:
            if item.comment is not None:
                out = GATEWAY_COMMENT
            else:
                if final:  # the block the body ended in lacked its blank line
                    if (item.data, item.event, item.id, item.retry) == (None, None, None, None):
                        continue  # a field name cut short (``eve``): a piece of a line
                    item = item._replace(raw=_terminated(item.raw))
                if item.data == "[DONE]":
                    self._done = valid_utf8(item.raw)
                    continue
                try:
                    rewritten = rewrite(item)
                except InvalidEvent as exc:
                    # A final block that does not parse was cut where the body ended.
                    self.failure = (
                        Failure(FailureType.UPSTREAM_TRUNCATED, _TRUNCATED_MESSAGE)
                        if final
                        else Failure(FailureType.UPSTREAM_INVALID, str(exc))
                    )
                    break
                out = valid_utf8(item.raw) if rewritten is None else rewritten
                if self._held is None and item.event in self._terminal:
                    self._held = []
            if self._held is None:
                parts.append(out)
            else:
                self._held.append(out)
        return b"".join(parts)


def rewrite_json_body(body: bytes, policy: Policy) -> bytes:
    """A whole JSON answer under ``policy``'s rules; the body itself if nothing changed.

    The policy reads the usage the body reports first (``policy.extracted``).
    Raises :class:`InvalidBody` if the body is not a JSON object:
    ``truncated`` when it is JSON cut short (the parser ran out of input).
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidBody(truncated=_cut_short(body)) from None
    if not isinstance(obj, dict):
        raise InvalidBody(truncated=False)
    return orjson.dumps(obj) if policy.rewrite_body(obj) else body


def _cut_short(body: bytes) -> bool:
    """Whether ``body``, which does not parse, is JSON that ends too early.

    Only on the error path, so the stdlib parser, whose errors say where and
    why: the input ran out inside a string, a literal, a number or a
    container (maybe inside a UTF-8 character the cut split), rather than
    meeting a wrong byte.
    """
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return False
        text = body[: exc.start].decode("utf-8", "replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        rest = text[exc.pos :].rstrip()
        if exc.msg.startswith("Unterminated string") or not rest:
            return True
        if exc.msg == "Expecting value":  # a literal or a number begun
            return _PARTIAL_VALUE.fullmatch(rest) is not None
        # A number parsed whole, then what would have continued it ("1." or "1e").
        number_went_on = (
            exc.msg.startswith("Expecting ',' delimiter") and text[exc.pos - 1].isdigit()
        )
        return number_went_on and _NUMBER_TAIL.fullmatch(rest) is not None
    return False
