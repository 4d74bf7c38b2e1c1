"""Usage extraction: what each kind's answers report, read from objects already parsed.

No I/O, and no second read of the body: each kind's policy calls its
function on the events it parses anyway and on the whole JSON body it
rewrites, before any cost is stripped. Each function fills an
:class:`Extracted`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trio_gateway._core.record import Usage

__all__ = ["Extracted", "from_chat", "from_embeddings", "from_messages", "from_responses"]


@dataclass(slots=True)
class Extracted:
    """Usage, ids and the finish reason, as the answer reported them."""

    usage: Usage = field(default_factory=Usage)
    upstream_id: str | None = None
    finish_reason: str | None = None

    def note_id(self, value: object) -> None:
        if isinstance(value, str) and self.upstream_id is None:
            self.upstream_id = value

    def note_finish(self, value: object) -> None:
        if isinstance(value, str):
            self.finish_reason = value


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def from_chat(obj: dict[str, Any], into: Extracted) -> None:
    """A chat.completion chunk or body: id, finish_reason, usage."""
    into.note_id(obj.get("id"))
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and (finish := choice.get("finish_reason")) is not None:
                into.note_finish(finish)
    usage = obj.get("usage")
    if isinstance(usage, dict):
        into.usage.merge(
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            cached_tokens=_dict(usage.get("prompt_tokens_details")).get("cached_tokens"),
            reasoning_tokens=_dict(usage.get("completion_tokens_details")).get("reasoning_tokens"),
            cost=usage.get("cost"),
        )


def from_messages(message: dict[str, Any], into: Extracted) -> None:
    """A Messages ``message`` (message_start's, or the JSON body) or a message_delta event."""
    into.note_id(message.get("id"))
    into.note_finish(message.get("stop_reason") or _dict(message.get("delta")).get("stop_reason"))
    usage = message.get("usage")
    if isinstance(usage, dict):
        into.usage.merge(
            input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),  # cumulative in message_delta
            cached_tokens=usage.get("cache_read_input_tokens"),
            cache_write_tokens=usage.get("cache_creation_input_tokens"),
            cost=usage.get("cost"),
        )


def from_responses(response: dict[str, Any], into: Extracted) -> None:
    """A Responses ``response`` object (from a lifecycle event, or the JSON body)."""
    into.note_id(response.get("id"))
    status = response.get("status")
    if status == "incomplete":
        into.note_finish(_dict(response.get("incomplete_details")).get("reason") or status)
    elif status in ("completed", "failed", "cancelled"):
        into.note_finish(status)
    usage = response.get("usage")
    if isinstance(usage, dict):
        into.usage.merge(
            input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),
            cached_tokens=_dict(usage.get("input_tokens_details")).get("cached_tokens"),
            reasoning_tokens=_dict(usage.get("output_tokens_details")).get("reasoning_tokens"),
            cost=usage.get("cost"),
        )


def from_embeddings(obj: dict[str, Any], into: Extracted) -> None:
    """An embeddings (or transcription) body: input tokens and cost, when reported."""
    usage = obj.get("usage")
    if isinstance(usage, dict):
        into.usage.merge(
            input_tokens=usage.get("prompt_tokens", usage.get("input_tokens")),
            output_tokens=usage.get("output_tokens"),
            cost=usage.get("cost"),
        )
