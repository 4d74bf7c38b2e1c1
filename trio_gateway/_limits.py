"""Per-key rate limits: requests and tokens per minute, as token buckets.

:class:`TokenBucket` is pure arithmetic on times the caller passes in. The
gateway talks to a :class:`RateLimiter`, a two-method interface, so a store
shared by several gateway processes can replace :class:`MemoryRateLimiter`
(one process, in memory) without touching the request path:

* :meth:`RateLimiter.admit` runs before a request goes upstream. It takes one
  request from the key's ``rpm`` bucket and checks that its ``tpm`` bucket is
  not in debt; a refusal says how long to wait.
* :meth:`RateLimiter.charge` runs in the accounting step, after the answer
  has ended, with the tokens the answer reported. Tokens are only known
  then, so the ``tpm`` bucket may go into debt; requests are refused until
  it has refilled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio

from trio_gateway._config import KeyEntry
from trio_gateway._record import RequestRecord

__all__ = [
    "MemoryRateLimiter",
    "RateLimiter",
    "TokenBucket",
    "retry_after_header",
    "tokens_charged",
]

_MINUTE = 60.0


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity`` per minute. No I/O, no clock.

    The level may go below zero (see :meth:`charge`); nothing can be taken
    until it is back to at least one token.
    """

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / _MINUTE  # tokens per second
        self.level = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until one token is available; 0.0 if one is available now."""
        self._refill(now)
        return max(0.0, (1.0 - self.level) / self.rate)

    def take(self, now: float) -> None:
        """Remove one token; the caller has checked :meth:`wait` first."""
        self._refill(now)
        self.level -= 1.0

    def charge(self, amount: int, now: float) -> None:
        """Remove ``amount`` tokens, going into debt if there are not enough."""
        self._refill(now)
        self.level -= amount


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


def tokens_charged(record: RequestRecord) -> int:
    """The tokens a finished request counts against ``tpm``: what the answer reported.

    Input plus output; for Messages also the cache reads and writes, which
    Anthropic reports outside ``input_tokens`` (OpenAI counts cached tokens
    inside ``prompt_tokens``).
    """
    usage = record.usage
    figures = [usage.input_tokens, usage.output_tokens]
    if record.kind == "messages":
        figures += [usage.cached_tokens, usage.cache_write_tokens]
    return sum(figure for figure in figures if figure is not None)


def retry_after_header(wait: float) -> bytes:
    """``Retry-After`` for a wait in seconds: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait))).encode()
