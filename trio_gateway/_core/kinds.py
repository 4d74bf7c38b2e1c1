"""API kinds, how each one spells an error, and why a request failed.

Pure data and functions: no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import orjson

__all__ = ["Failure", "FailureType", "Kind", "error_body", "error_types"]


class Kind(enum.Enum):
    """An API the gateway serves; the value is the path under ``/v1``."""

    CHAT = "/chat/completions"
    MESSAGES = "/messages"
    RESPONSES = "/responses"
    EMBEDDINGS = "/embeddings"
    TRANSCRIPTIONS = "/audio/transcriptions"

    @property
    def path(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """The short name used in records, logs and metrics ("chat", "messages", ...)."""
        return self.name.lower()

    @property
    def anthropic_errors(self) -> bool:
        """Whether errors take Anthropic's shape rather than OpenAI's."""
        return self is Kind.MESSAGES

    @property
    def streams(self) -> bool:
        """Whether the kind can answer with an event stream."""
        return self in (Kind.CHAT, Kind.MESSAGES, Kind.RESPONSES)


class FailureType(enum.StrEnum):
    """Why a request did not complete; the names used in logs and accounting."""

    CLIENT_DISCONNECT = "client_disconnect"
    CLIENT_STALL = "client_stall"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    UPSTREAM_STATUS = "upstream_status"
    UPSTREAM_TOO_LARGE = "upstream_too_large"
    UPSTREAM_INVALID = "upstream_invalid"  # a success answer that is not what was asked for
    UPSTREAM_TRUNCATED = "upstream_truncated"  # the body ended before the kind's end event
    REWRITE_ERROR = "rewrite_error"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class Failure:
    """A failure with a message that is safe to show a client (no secrets)."""

    type: FailureType
    message: str

    @property
    def is_timeout(self) -> bool:
        return self.type in (FailureType.UPSTREAM_TIMEOUT, FailureType.IDLE_TIMEOUT)

    @property
    def status(self) -> int:
        """The HTTP status this failure gets when no response has started yet."""
        if self.is_timeout:
            return 504
        if self.type is FailureType.SHUTDOWN:
            return 503
        return 502


# The error "type" for each status: (OpenAI, Anthropic).
_ERROR_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    502: ("upstream_error", "api_error"),
    503: ("service_unavailable", "overloaded_error"),
    504: ("timeout_error", "api_error"),
}


def error_types(status: int) -> tuple[str, str]:
    """The error ``type`` a client of each family expects for ``status``: (OpenAI, Anthropic)."""
    return _ERROR_TYPES.get(
        status, ("api_error", "api_error") if status >= 500 else ("invalid_request_error",) * 2
    )


def error_body(kind: Kind | None, status: int, message: str, code: str | None = None) -> bytes:
    """A JSON error body in the shape clients of ``kind`` parse.

    OpenAI kinds (and unknown paths): ``{"error": {"message", "type", "code",
    "param"}}``; Anthropic Messages: ``{"type": "error", "error": {"type",
    "message"}}``.
    """
    openai_type, anthropic_type = error_types(status)
    if kind is not None and kind.anthropic_errors:
        return orjson.dumps(
            {"type": "error", "error": {"type": anthropic_type, "message": message}}
        )
    return orjson.dumps(
        {"error": {"message": message, "type": openai_type, "code": code, "param": None}}
    )
