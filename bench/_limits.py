"""The ``limits`` scenario: what one admission costs with limits in Redis, against in memory.

A rate-limited request is admitted by :meth:`RateLimiter.admit` before it goes
upstream. In one process the buckets live in memory; shared by several
processes they live in Redis (``[limits] redis_url``), one round trip per
request. This scenario times ``admit`` itself, in this process, for both
stores, on a key whose limits are high enough that every call is admitted:
the figure is the latency and CPU a limited request pays, not the gateway's.
It needs the Redis at 127.0.0.1:6379 the tests use; without it, the Redis
figures are left out, with a note.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from bench._contenders import Endpoint
from bench._scenarios import Base, Context, Metrics, mock_argv, percentile
from trio_gateway._accounting.limiter import MemoryRateLimiter, RateLimiter
from trio_gateway._core.config import KeyEntry
from trio_gateway.testing.mock_upstream import StreamKind

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _time_admits(limiter: RateLimiter, key: KeyEntry, count: int) -> list[float]:
    """Seconds each of ``count`` admissions took (after 100 to warm up). A checkpoint."""
    for _ in range(100):
        await limiter.admit(key)
    took = []
    for _ in range(count):
        started = time.perf_counter()
        wait = await limiter.admit(key)
        took.append(time.perf_counter() - started)
        assert wait is None, "the bench key's limits are high enough to admit every call"
    return took


@dataclass(frozen=True)
class Limits(Base):
    """One admission's latency with the buckets in memory and in Redis."""

    name: ClassVar[str] = "limits"
    kinds: ClassVar[tuple[StreamKind, ...]] = ("chat",)
    needs_server: ClassVar[bool] = False
    warm_up: ClassVar[bool] = False
    only: ClassVar[frozenset[str] | None] = frozenset({"gateway"})
    headline: ClassVar[tuple[str, ...]] = (
        "memory_admit_us_p50",
        "redis_admit_us_p50",
        "redis_admit_us_p99",
        "redis_minus_memory_us",
    )
    admits: int = 2000
    time_limit: float = 60.0

    def mock_argv(self, port: int) -> list[str]:
        return mock_argv(port, tokens=1)

    async def measure(self, endpoint: Endpoint, context: Context) -> Metrics:
        key = KeyEntry(f"bench-{uuid.uuid4().hex}", "", rpm=10**9, tpm=10**12)
        memory = await _time_admits(MemoryRateLimiter(), key, self.admits)
        figures: dict[str, Any] = {"memory_admit_us_p50": statistics.median(memory) * 1e6}
        redis = await self._redis_admits(key, context)
        if redis:
            figures["redis_admit_us_p50"] = statistics.median(redis) * 1e6
            figures["redis_admit_us_p99"] = (percentile(redis, 99) or 0.0) * 1e6
            figures["redis_minus_memory_us"] = (
                figures["redis_admit_us_p50"] - figures["memory_admit_us_p50"]
            )
        return figures

    async def _redis_admits(self, key: KeyEntry, context: Context) -> list[float]:
        try:
            from trio_gateway._accounting.redis_limiter import RedisRateLimiter
        except ImportError as exc:  # pragma: no cover - the client is a dependency
            context.details["note"] = f"no Redis client: {exc}"
            return []
        prefix = f"trio-gateway-bench-{uuid.uuid4().hex}:"
        async with RedisRateLimiter(REDIS_URL, prefix=prefix, timeout=1.0) as limiter:
            with trio.move_on_after(2):
                await limiter.admit(key)
            if limiter.unavailable:
                context.details["note"] = f"Redis at {REDIS_URL} did not answer"
                return []
            return await _time_admits(limiter, key, self.admits)
        # (the keys expire by their TTL: the bucket of a full key lasts about a second)
