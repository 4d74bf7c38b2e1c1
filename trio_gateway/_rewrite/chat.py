"""OpenAI Chat Completions: every chunk is ``data: <chat.completion.chunk>``."""

from __future__ import annotations

from typing import Any

import orjson

from trio_gateway._core.extract import from_chat
from trio_gateway._core.kinds import Failure
from trio_gateway._rewrite.base import Policy, parse_object, reencode, set_model, strip_cost
from trio_gateway.sse import SSEEvent


class ChatPolicy(Policy):
    """Model alias, free-model cost stripping and strict-client fixes on every chunk.

    Every chunk carries ``model``, so every chunk is parsed.
    """

    def __init__(self, public_model: str, *, free: bool) -> None:
        super().__init__(public_model, free=free)
        self.last_id: str | None = None

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        chunk = parse_object(event.data)
        if chunk is None:
            return None
        if isinstance(chunk.get("id"), str):
            self.last_id = chunk["id"]
        from_chat(chunk, self.extracted)
        if not self.content_started:
            self.content_started = _has_content(chunk)
        changed = set_model(chunk, "model", self.public_model)
        if "error" not in chunk:
            changed |= _fix_for_strict_clients(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if self.free:
                changed |= strip_cost(usage)
            details = usage.get("prompt_tokens_details")
            if not isinstance(details, dict):
                usage["prompt_tokens_details"] = {"cached_tokens": 0}
                changed = True
            elif details.get("cached_tokens") is None:
                details["cached_tokens"] = 0
                changed = True
        return reencode(event, chunk) if changed else None

    def error_event(self, failure: Failure) -> bytes:
        error: dict[str, Any] = {
            "code": 504 if failure.is_timeout else 503,
            "message": failure.message,
            "type": failure.type.value,
        }
        payload: dict[str, Any] = {"error": error}
        if self.last_id is not None:
            payload = {"id": self.last_id, **payload}
        return b"data: " + orjson.dumps(payload) + b"\n\n"


def _has_content(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries generated content (text, refusal, reasoning or a tool call)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and any(
            delta.get(name) for name in ("content", "refusal", "reasoning", "tool_calls")
        ):
            return True
    return False


def _fix_for_strict_clients(chunk: dict[str, Any]) -> bool:
    """Give a chunk ``choices`` and drop null ``delta.role``; return whether it changed."""
    choices = chunk.get("choices")
    if choices is None:
        chunk["choices"] = []
        return True
    changed = False
    if isinstance(choices, list):
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and "role" in delta and delta["role"] is None:
                del delta["role"]
                changed = True
    return changed
