"""OpenAI Chat Completions: every chunk is ``data: <chat.completion.chunk>``.

The answer is complete at ``data: [DONE]``, or once a chunk finished a
choice (a non-null ``finish_reason``) and only usage chunks followed.
"""

from __future__ import annotations

from typing import Any

import orjson

from trio_gateway._core.extract import from_chat
from trio_gateway._core.kinds import Failure
from trio_gateway._rewrite.base import (
    Policy,
    reencode,
    require_object,
    set_model,
    strip_cost,
    valid_utf8,
)
from trio_gateway.sse import SSEEvent

_CONTENT_FIELDS = ("content", "refusal", "reasoning", "tool_calls")


class ChatPolicy(Policy):
    """Model alias, free-model cost stripping and strict-client fixes, chunks and bodies alike.

    Every chunk carries ``model``, so every chunk is parsed; one that is not
    a JSON object is an :class:`~trio_gateway._rewrite.base.InvalidEvent`.
    """

    done_completes = True

    def __init__(self, public_model: str, *, free: bool, upstream_model: str = "") -> None:
        super().__init__(public_model, free=free, upstream_model=upstream_model)
        self.last_id: str | None = None
        # The model field as the upstream writes it, and as it goes out: the
        # usual chunk differs from what it should be in this field alone.
        self._upstream_field = b'"model":' + orjson.dumps(upstream_model)
        self._public_field = b'"model":' + orjson.dumps(public_model)

    def rewrite_event(self, event: SSEEvent) -> bytes | None:
        chunk = require_object(event)
        if chunk is None:
            return None
        if isinstance(chunk.get("id"), str):
            self.last_id = chunk["id"]
        self._note_progress(chunk)
        model = chunk.get("model")
        changed = self._rewrite_all_but_the_model(chunk)
        if "error" not in chunk:
            changed |= _fix_for_strict_clients(chunk)
        if not changed:
            if model is None or model == self.public_model:
                return None
            if model == self.upstream_model:
                # Only the model changes: swap its bytes rather than re-serialise.
                # In compact JSON the field appears exactly once; anything else
                # (spaces, an escaped slash, a second copy) takes the slow path.
                raw = event.raw
                if raw.count(self._upstream_field) == 1:
                    return valid_utf8(raw.replace(self._upstream_field, self._public_field))
        set_model(chunk, "model", self.public_model)
        return reencode(event, chunk)

    def rewrite_body(self, body: dict[str, Any]) -> bool:
        """The rules a chunk and a whole ``chat.completion`` share; whether ``body`` changed.

        Model, cost and ``cached_tokens``. The strict-client fixes of
        ``choices`` and ``delta.role`` are for chunks only, the shape they fix.
        """
        changed = set_model(body, "model", self.public_model)
        return self._rewrite_all_but_the_model(body) or changed

    def _rewrite_all_but_the_model(self, body: dict[str, Any]) -> bool:
        """Usage read first; then cost, ``cached_tokens`` and the model hidden in errors."""
        from_chat(body, self.extracted)
        changed = self.hide_upstream_model(body.get("error"))
        usage = body.get("usage")
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
        return changed

    def _note_progress(self, chunk: dict[str, Any]) -> None:
        """Track content and completion: a finished choice completes the answer.

        A later chunk with choices but no finish (more content, another
        choice still running) makes it incomplete again. A usage chunk (one
        that carries ``usage``; OpenRouter's also has an empty choice) leaves
        it as it is.
        """
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return
        usage_chunk = isinstance(chunk.get("usage"), dict)
        finished = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason") is not None:
                finished = True
            if not self.content_started:
                delta = choice.get("delta")
                if isinstance(delta, dict) and any(delta.get(n) for n in _CONTENT_FIELDS):
                    self.content_started = True
        if finished or not usage_chunk:
            self.complete = finished

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
