"""What one request leaves behind for accounting: the usage record. No I/O.

A :class:`RequestRecord` is created when a request is routed, filled in as
the exchange goes (the rewriter's extractor adds usage from the events it
already parses), and finished exactly once however the request ends. The
accounting sinks (the usage database, metrics, the request log) only ever
see finished records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["RecordSink", "RequestRecord", "Usage"]


@dataclass(slots=True)
class Usage:
    """Token counts and the upstream's cost, as the answer reported them (None: not reported)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from cache
    cache_write_tokens: int | None = None  # prompt tokens written to cache (Messages)
    reasoning_tokens: int | None = None
    cost: float | None = None  # the upstream's figure, taken before any stripping

    def merge(self, **figures: Any) -> None:
        """Set each given figure that is a number; bools and other types are ignored."""
        for name, value in figures.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            setattr(self, name, float(value) if name == "cost" else int(value))


@dataclass(slots=True)
class RequestRecord:
    """One request, as accounting sees it. Times are seconds on the Trio clock."""

    request_id: str
    kind: str  # "chat", "messages", "responses", "embeddings", "transcriptions"
    key_name: str
    public_model: str
    upstream: str
    upstream_model: str
    streamed: bool
    started_at: float  # trio.current_time() when the request was routed
    started_wall: float  # time.time() at the same moment, for the database
    status: int | None = None  # the HTTP status the client got
    usage: Usage = field(default_factory=Usage)
    upstream_id: str | None = None  # the upstream's response id
    finish_reason: str | None = None
    headers_at: float | None = None  # upstream response headers arrived
    first_token_at: float | None = None  # first content token went to the client
    ended_at: float | None = None
    bytes_to_client: int = 0
    cancelled: bool = False  # the client disconnected before the end
    error_type: str | None = None  # a FailureType value, or None for a clean end

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def time_to_headers(self) -> float | None:
        return None if self.headers_at is None else self.headers_at - self.started_at

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at


class RecordSink(Protocol):
    """Where finished records go (the usage database, for one)."""

    async def submit(self, record: RequestRecord) -> None:
        """Take a finished record. A checkpoint; returns within a bounded time.

        The gateway calls it from a shielded, time-bounded scope, so it also
        runs for a request that is being cancelled.
        """
