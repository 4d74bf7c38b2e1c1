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
        chunk_id = chunk.get("id")
        if isinstance(chunk_id, str):
            self.last_id = chunk_id
        model = chunk.get("model")
        changed = self._chunk_rules(chunk)
        changed |= self._rewrite_all_but_the_model(chunk)
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
        error = body.get("error")
        changed = error is not None and self.hide_upstream_model(error)
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

    def _chunk_rules(self, chunk: dict[str, Any]) -> bool:
        """The rules of chunks alone, in one pass over ``choices``; whether the chunk changed.

        Progress and completion: a finished choice completes the answer. A
        later chunk with choices but no finish (more content, another choice
        still running) makes it incomplete again. A usage chunk (one that
        carries ``usage``; OpenRouter's also has an empty choice) leaves it
        as it is.

        The fixes for strict clients, except in an error chunk: a chunk
        gets ``choices``, and a null ``delta.role`` is dropped.
        """
        choices = chunk.get("choices")
        if choices is None:
            if "error" in chunk:
                return False
            chunk["choices"] = []
            return True
        if not isinstance(choices, list) or not choices:
            return False
        fix = "error" not in chunk
        finished = changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason") is not None:
                finished = True
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if not self.content_started and any(delta.get(n) for n in _CONTENT_FIELDS):
                    self.content_started = True
                if fix and "role" in delta and delta["role"] is None:
                    del delta["role"]
                    changed = True
        if finished or not isinstance(chunk.get("usage"), dict):
            self.complete = finished
        return changed

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
