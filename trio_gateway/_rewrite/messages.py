"""Anthropic Messages: named events; ``message_start`` and ``message_delta`` change.

The answer is complete at ``message_stop``. Every event's data must be a
JSON object; only the two that can change are rewritten.
"""

from __future__ import annotations

from typing import Any

import orjson

from trio_gateway._core.extract import from_messages
from trio_gateway._core.kinds import Failure
from trio_gateway._rewrite.base import Policy, reencode, require_object, set_model, strip_cost
from trio_gateway.sse import SSEEvent


class MessagesPolicy(Policy):
    """Model alias in the ``message``; cost stripping in both usage objects."""

    terminal_events = frozenset({"message_stop"})

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        payload = require_object(event)
        name = event.event
        if name == "message_start":
            message = payload.get("message") if payload is not None else None
            changed = isinstance(message, dict) and self.rewrite_body(message)
        elif name == "message_delta" and payload is not None:
            from_messages(payload, self.extracted)
            changed = self.free and strip_cost(payload.get("usage"))
        elif name == "error" and payload is not None:
            changed = self.hide_upstream_model(payload.get("error"))
        else:
            if name == "content_block_delta":
                self.content_started = True
            elif name == "message_stop" and payload is not None:
                self.complete = True
            return None
        return reencode(event, payload) if changed and payload is not None else None

    def rewrite_body(self, body: dict[str, Any]) -> bool:
        """The rules for a ``message`` (message_start's, or a whole answer); whether it changed."""
        from_messages(body, self.extracted)
        changed = set_model(body, "model", self.public_model)
        changed |= self.hide_upstream_model(body.get("error"))  # a whole error answer
        if self.free:
            changed |= strip_cost(body.get("usage"))
        return changed

    def error_event(self, failure: Failure) -> bytes:
        payload = {"type": "error", "error": {"type": "api_error", "message": failure.message}}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
