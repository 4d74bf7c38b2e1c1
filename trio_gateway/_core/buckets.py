"""Token-bucket arithmetic for per-key rate limits: requests and tokens per minute.

No I/O and no clock: :class:`TokenBucket` is pure arithmetic on times the
caller passes in. The stores that keep buckets (in memory, or shared by
several processes) live in :mod:`trio_gateway._accounting.limiter`, behind
its two-method ``RateLimiter`` interface:

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

from trio_gateway._core.kinds import Kind
from trio_gateway._core.record import RequestRecord

__all__ = [
    "MINUTE",
    "TokenBucket",
    "retry_after_header",
    "tokens_charged",
]

MINUTE = 60.0


class TokenBucket:
    """``capacity`` tokens, refilled at ``capacity`` per minute. No I/O, no clock.

    The level may go below zero (see :meth:`charge`); nothing can be taken
    until it is back to at least one token.
    """

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / MINUTE  # tokens per second
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


def tokens_charged(record: RequestRecord) -> int:
    """The tokens a finished request counts against ``tpm``: what the answer reported.

    Input plus output; for Messages also the cache reads and writes, which
    Anthropic reports outside ``input_tokens`` (OpenAI counts cached tokens
    inside ``prompt_tokens``).
    """
    usage = record.usage
    figures = [usage.input_tokens, usage.output_tokens]
    if record.kind is Kind.MESSAGES:
        figures += [usage.cached_tokens, usage.cache_write_tokens]
    return sum(figure for figure in figures if figure is not None)


def retry_after_header(wait: float) -> bytes:
    """``Retry-After`` for a wait in seconds: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait))).encode()
