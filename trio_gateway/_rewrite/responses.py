"""OpenAI Responses: named events with a ``sequence_number`` each.

The answer is complete at ``response.completed``, ``response.incomplete``
or ``response.failed``. Every event's data must be a JSON object.
"""

from __future__ import annotations

from typing import Any

import orjson

from trio_gateway._core.extract import from_responses
from trio_gateway._core.kinds import Failure, error_types
from trio_gateway._rewrite.base import Policy, reencode, require_object, set_model, strip_cost
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


class ResponsesPolicy(Policy):
    """Model alias and cost stripping in ``response``; an error event numbered last + 1."""

    terminal_events = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def __init__(self, public_model: str, *, free: bool, upstream_model: str = "") -> None:
        super().__init__(public_model, free=free, upstream_model=upstream_model)
        self.last_sequence = -1

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        payload = require_object(event)
        if payload is None:
            return None
        name = event.event
        # From a terminal event on, events are held back (see StreamRewriter) and
        # dropped on failure, so the error event numbers on from the last sent.
        if name in self.terminal_events:
            self.complete = True
        sequence = payload.get("sequence_number")
        if isinstance(sequence, int) and not self.complete:
            self.last_sequence = sequence
        if name not in _RESPONSE_EVENTS:
            if name == "error":  # the upstream's own: top-level fields, or nested
                return reencode(event, payload) if self.hide_upstream_model(payload) else None
            if not self.content_started and name is not None and name.endswith(".delta"):
                self.content_started = True
            return None
        response = payload.get("response")
        if not isinstance(response, dict) or not self.rewrite_body(response):
            return None
        return reencode(event, payload)

    def rewrite_body(self, body: dict[str, Any]) -> bool:
        """The rules for a ``response`` object (an event's, or a whole answer)."""
        from_responses(body, self.extracted)
        changed = set_model(body, "model", self.public_model)
        # The error of response.failed, or of a whole error answer.
        changed |= self.hide_upstream_model(body.get("error"))
        if self.free:
            changed |= strip_cost(body.get("usage"))
        return changed

    def error_event(self, failure: Failure) -> bytes:
        """The documented ``error`` event, with a nested ``error`` copy.

        openai-python, openai-node, langchain and pydantic-ai raise only when
        the data holds an ``error`` object; the top-level fields are the
        documented shape, which other clients read.
        """
        payload = {
            "type": "error",
            "sequence_number": self.last_sequence + 1,
            "code": failure.type.value,
            "message": failure.message,
            "param": None,
            "error": {
                "type": error_types(failure.status)[0],
                "code": failure.type.value,
                "message": failure.message,
                "param": None,
            },
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
