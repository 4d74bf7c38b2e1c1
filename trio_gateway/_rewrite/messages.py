"""Anthropic Messages: named events; only ``message_start`` and ``message_delta`` change."""

from __future__ import annotations

import orjson

from trio_gateway._core.extract import from_messages
from trio_gateway._core.kinds import Failure
from trio_gateway._rewrite.base import Policy, parse_object, reencode, set_model, strip_cost
from trio_gateway.sse import SSEEvent


class MessagesPolicy(Policy):
    """Model alias in ``message_start``; cost stripping in both usage objects.

    Decided from the event name, so content deltas pass without a JSON parse.
    """

    terminal_events = frozenset({"message_stop"})

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        name = event.event
        if name != "message_start" and name != "message_delta":
            if name == "content_block_delta":
                self.content_started = True
            return None
        payload = parse_object(event.data)
        if payload is None:
            return None
        changed = False
        if name == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                from_messages(message, self.extracted)
                changed = set_model(message, "model", self.public_model)
                if self.free:
                    changed |= strip_cost(message.get("usage"))
        else:
            from_messages(payload, self.extracted)
            changed = self.free and strip_cost(payload.get("usage"))
        return reencode(event, payload) if changed else None

    def error_event(self, failure: Failure) -> bytes:
        payload = {"type": "error", "error": {"type": "api_error", "message": failure.message}}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
