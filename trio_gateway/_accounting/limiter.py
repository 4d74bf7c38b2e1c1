"""Where per-key rate-limit state lives: the ``RateLimiter`` interface and its stores.

The gateway talks to a :class:`RateLimiter`, a two-method interface, so a
store shared by several gateway processes can replace
:class:`MemoryRateLimiter` (one process, in memory) without touching the
request path. The arithmetic is :class:`~trio_gateway._core.buckets.TokenBucket`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from trio_gateway._core.buckets import TokenBucket
from trio_gateway._core.config import KeyEntry

__all__ = ["LimiterUnavailable", "MemoryRateLimiter", "RateLimiter"]


class LimiterUnavailable(Exception):
    """The shared rate-limit store did not answer, and the gateway is set to refuse then.

    Raised by ``admit`` under ``[limits] on_redis_error = "fail_closed"``; the
    request is answered with 503 in its endpoint's error shape and is not sent
    upstream. Never raised by ``charge``.
    """


class RateLimiter(Protocol):
    """Where rate-limit state lives. Both methods are checkpoints for a shared store."""

    async def admit(self, key: KeyEntry) -> float | None:
        """Count one request for ``key``; or, if over a limit, seconds to wait (not counted)."""

    async def charge(self, key: KeyEntry, tokens: int) -> None:
        """Charge ``tokens`` to ``key``'s tokens-per-minute budget."""


class MemoryRateLimiter:
    """Token buckets in this process's memory, one pair per limited key.

    Not a checkpoint in practice: nothing here waits. State grows only with
    the configured keys, never with client input.
    """

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _bucket(self, table: dict[str, TokenBucket], name: str, capacity: int) -> TokenBucket:
        bucket = table.get(name)
        if bucket is None or bucket.capacity != capacity:
            bucket = table[name] = TokenBucket(capacity, self._clock())
        return bucket

    async def admit(self, key: KeyEntry) -> float | None:
        now = self._clock()
        requests = None if key.rpm is None else self._bucket(self._requests, key.name, key.rpm)
        tokens = None if key.tpm is None else self._bucket(self._tokens, key.name, key.tpm)
        buckets = [bucket for bucket in (requests, tokens) if bucket is not None]
        wait = max((bucket.wait(now) for bucket in buckets), default=0.0)
        if wait > 0:
            return wait
        if requests is not None:
            requests.take(now)
        return None

    async def charge(self, key: KeyEntry, tokens: int) -> None:
        if key.tpm is not None and tokens > 0:
            self._bucket(self._tokens, key.name, key.tpm).charge(tokens, self._clock())
