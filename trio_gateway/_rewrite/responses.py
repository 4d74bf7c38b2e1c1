"""OpenAI Responses: named events with a ``sequence_number`` each."""

from __future__ import annotations

import orjson

from trio_gateway._core.extract import from_responses
from trio_gateway._core.kinds import Failure
from trio_gateway._rewrite.base import Policy, parse_object, reencode, set_model, strip_cost
from trio_gateway.sse import SSEEvent

# The events that carry the whole ``response`` object (and so its model and usage).
_RESPONSE_EVENTS = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    }
)
_SEQUENCE_KEY = '"sequence_number":'


class ResponsesPolicy(Policy):
    """Model alias and cost stripping in ``response``; an error event numbered last + 1.

    Only the lifecycle events are parsed; for the rest the sequence number is
    read without parsing the JSON.
    """

    terminal_events = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def __init__(self, public_model: str, *, free: bool) -> None:
        super().__init__(public_model, free=free)
        self.last_sequence = -1
        # From a terminal event on, events are held back (see StreamRewriter) and
        # dropped on failure, so the error event numbers on from the last sent.
        self._holding = False

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        self._holding = self._holding or event.event in self.terminal_events
        name = event.event
        if name not in _RESPONSE_EVENTS:
            if not self.content_started and name is not None and name.endswith(".delta"):
                self.content_started = True
            if not self._holding:
                self._note_sequence(event.data)
            return None
        payload = parse_object(event.data)
        if payload is None:
            return None
        sequence = payload.get("sequence_number")
        if isinstance(sequence, int) and not self._holding:
            self.last_sequence = sequence
        response = payload.get("response")
        if not isinstance(response, dict):
            return None
        from_responses(response, self.extracted)
        changed = set_model(response, "model", self.public_model)
        if self.free:
            changed |= strip_cost(response.get("usage"))
        return reencode(event, payload) if changed else None

    def _note_sequence(self, data: str | None) -> None:
        if data is None:
            return
        at = data.rfind(_SEQUENCE_KEY)
        if at < 0:
            return
        digits = data[at + len(_SEQUENCE_KEY) :].lstrip(" ")
        end = 0
        while end < len(digits) and digits[end].isdigit() and digits[end].isascii():
            end += 1
        if end:
            self.last_sequence = int(digits[:end])

    def error_event(self, failure: Failure) -> bytes:
        payload = {
            "type": "error",
            "sequence_number": self.last_sequence + 1,
            "code": failure.type.value,
            "message": failure.message,
            "param": None,
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
