"""Rate limits shared by several gateway processes: the token buckets live in Redis.

Theory of operation
-------------------

:class:`RedisRateLimiter` implements the two-method ``RateLimiter`` interface
with exactly the arithmetic of :class:`~trio_gateway._core.buckets.TokenBucket`
(and so of :class:`~trio_gateway._accounting.limiter.MemoryRateLimiter`), but
the buckets are Redis hashes that every process reads and writes:

1. **One script per call.** ``admit`` and ``charge`` each run :data:`SCRIPT`
   once (``EVALSHA``, loaded again by the client after a Redis restart). A
   script runs atomically, so two processes can never both take the last
   request of a minute: the check and the take are one step on the server.
2. **State.** Per limited key and limit, one hash,
   ``{prefix}{name}:rpm`` or ``{prefix}{name}:tpm``, with ``level`` (tokens
   left, below zero for ``tpm`` debt), ``updated`` (the time of ``level``) and
   ``capacity`` (the limit that made it; a different limit starts the bucket
   afresh, full, as the in-memory store does). Only the key's configured
   *name* is used: its secret and digest never reach Redis.
3. **Time** comes from the caller's ``clock`` (the wall clock by default, so
   processes agree on it) and is passed to the script, which never reads the
   server's clock. Numbers are written with 17 significant digits, so a
   level read back is the very double that was written, and the arithmetic
   matches the in-memory buckets bit for bit.
4. **Expiry.** Each write sets the hash's TTL to the time it needs to refill
   completely, plus :data:`TTL_MARGIN`. A full bucket and a missing one
   behave the same, so idle keys vanish without changing any answer.
5. **Failure.** Every call is bounded by a Trio cancel scope (``timeout``,
   50 ms by default). A call that fails or is late counts in
   :attr:`RedisRateLimiter.unavailable`, calls ``on_unavailable``, and logs a
   warning on ``trio_gateway.limits`` at most once per ``warn_every``
   seconds. Then ``admit`` admits (``fail_open``) or raises
   :class:`~trio_gateway._accounting.limiter.LimiterUnavailable`
   (``fail_closed``); ``charge`` never raises. The client reconnects on its
   own, so the gateway recovers when Redis is back, without a restart.

A call abandoned at its deadline may still run on the server, so a request
admitted while Redis is slow may have been counted too.

The client is Valkey GLIDE (``valkey-glide``), which runs natively under Trio
through anyio, keeps one multiplexed connection, and is unharmed when a
caller's cancel scope abandons a call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

import trio
from glide import (
    BackoffStrategy,
    GlideClient,
    GlideClientConfiguration,
    GlideError,
    Logger,
    LogLevel,
    NodeAddress,
    Script,
    ServerCredentials,
)

from trio_gateway._accounting.limiter import LimiterUnavailable
from trio_gateway._core.config import (
    GatewayConfig,
    KeyEntry,
    RedisErrorPolicy,
    split_redis_url,
)

__all__ = ["SCRIPT", "TTL_MARGIN", "RedisRateLimiter"]

logger = logging.getLogger("trio_gateway.limits")

#: Seconds a bucket's hash outlives the time it needs to refill completely.
TTL_MARGIN: Final = 1.0

#: The one script behind both methods; see the module docstring.
#: KEYS: the requests bucket, the tokens bucket. ARGV: "admit" or "charge",
#: now (seconds), rpm and tpm capacities ("0": no such limit), tokens to
#: charge, TTL margin (seconds). Returns the seconds to wait ("0": admitted).
SCRIPT: Final = """
local now = tonumber(ARGV[2])
local margin = tonumber(ARGV[6])

local function open(key, capacity)
  local state = redis.call('HMGET', key, 'level', 'updated', 'capacity')
  local level, updated = capacity, now
  if state[1] and state[2] and tonumber(state[3]) == capacity then
    level, updated = tonumber(state[1]), tonumber(state[2])
  end
  local rate = capacity / 60
  if now > updated then
    level = math.min(capacity, level + (now - updated) * rate)
    updated = now
  end
  return {key = key, capacity = capacity, rate = rate, level = level, updated = updated}
end

local function save(bucket)
  redis.call('HSET', bucket.key,
    'level', string.format('%.17g', bucket.level),
    'updated', string.format('%.17g', bucket.updated),
    'capacity', string.format('%.17g', bucket.capacity))
  local refill = (bucket.capacity - bucket.level) / bucket.rate
  redis.call('PEXPIRE', bucket.key, string.format('%d', math.ceil((refill + margin) * 1000)))
end

local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[1] == 'charge' then
  local tokens = open(KEYS[2], tpm)
  tokens.level = tokens.level - tonumber(ARGV[5])
  save(tokens)
  return '0'
end

local buckets = {}
local requests = nil
if rpm > 0 then
  requests = open(KEYS[1], rpm)
  buckets[#buckets + 1] = requests
end
if tpm > 0 then
  buckets[#buckets + 1] = open(KEYS[2], tpm)
end
local wait = 0
for _, bucket in ipairs(buckets) do
  local needed = (1 - bucket.level) / bucket.rate
  if needed > wait then
    wait = needed
  end
end
if wait <= 0 and requests then
  requests.level = requests.level - 1
end
for _, bucket in ipairs(buckets) do
  save(bucket)
end
return string.format('%.17g', wait)
"""

_script = Script(SCRIPT)  # type: ignore[no-untyped-call]  # glide leaves __init__ untyped


class RedisRateLimiter:
    """Token buckets in Redis, shared by every gateway process that uses the same prefix.

    Open it with ``async with`` (in the Trio run that uses it) before the
    first call; opening succeeds while Redis is down, and the client keeps
    reconnecting. ``unavailable`` counts the calls that failed or were late;
    ``on_unavailable`` is called once for each (for a metrics counter).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "trio-gateway:",
        timeout: float = 0.05,
        on_error: RedisErrorPolicy = "fail_open",
        clock: Callable[[], float] = time.time,
        warn_every: float = 60.0,
        on_unavailable: Callable[[], None] | None = None,
        ttl_margin: float = TTL_MARGIN,
    ) -> None:
        self._target = split_redis_url(url)
        self._ttl_margin = ttl_margin
        self._prefix = prefix
        self._timeout = timeout
        self._on_error = on_error
        self._clock = clock
        self._warn_every = warn_every
        self.on_unavailable = on_unavailable  # called once per failed or late call
        self._client: GlideClient | None = None
        self.unavailable = 0  # calls that failed or were late, since start
        self._failed_since_warning = 0
        self._warned_at: float | None = None
        self._down = False

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_unavailable: Callable[[], None] | None = None,
    ) -> RedisRateLimiter:
        """The limiter that ``[limits]`` describes; ``config.redis_url`` must be set."""
        if config.redis_url is None:
            raise ValueError("[limits] redis_url is not set")
        return cls(
            config.redis_url,
            prefix=config.redis_prefix,
            timeout=config.redis_timeout,
            on_error=config.on_redis_error,
            clock=clock,
            on_unavailable=on_unavailable,
        )

    @property
    def where(self) -> str:
        """``host:port/db`` of the Redis server: for logs, never with the password."""
        target = self._target
        return f"{target.host}:{target.port}/{target.db}"

    def key_names(self, key: KeyEntry) -> tuple[str, str]:
        """The Redis keys of ``key``'s requests and tokens buckets."""
        base = f"{self._prefix}{key.name}"
        return f"{base}:rpm", f"{base}:tpm"

    async def __aenter__(self) -> Self:
        """Create the client and try to connect, for at most 1 s. A checkpoint.

        Opening succeeds while Redis is down: the client keeps reconnecting.
        """
        # GLIDE's core logs to standard output, at WARN by default: a line per
        # failed reconnect. Failures are reported here, on trio_gateway.limits,
        # at most once a minute; keep only the core's errors (unless the
        # embedding program configured GLIDE's logger already).
        Logger.init(LogLevel.ERROR)
        target = self._target
        credentials = (
            None
            if target.password is None
            else ServerCredentials(password=target.password, username=target.username)
        )
        configuration = GlideClientConfiguration(
            [NodeAddress(target.host, target.port)],
            use_tls=target.tls,
            credentials=credentials,
            database_id=target.db,
            request_timeout=max(1, math.ceil(self._timeout * 1000)),  # milliseconds
            # Reconnect at once, then back off to at most 0.64 s between attempts.
            reconnect_strategy=BackoffStrategy(num_of_retries=6, factor=10, exponent_base=2),
            client_name="trio-gateway",
            lazy_connect=True,
        )
        self._client = client = await GlideClient.create(configuration)
        # Connect and load the script now, so the first request does not pay
        # for it (it takes longer than the timeout). A script call that names
        # no limit touches no key. Redis down: the first calls fail as usual.
        warm_up = ["admit", repr(self._clock()), "0", "0", "0", repr(self._ttl_margin)]
        with trio.move_on_after(max(1.0, self._timeout)), contextlib.suppress(GlideError):
            await client.invoke_script(_script, keys=[], args=warm_up)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's connection. A checkpoint; idempotent."""
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await client.close()

    async def admit(self, key: KeyEntry) -> float | None:
        """Count one request for ``key``, or return the seconds to wait (not counted).

        A checkpoint when ``key`` has a limit. Redis failed or late: None
        under ``fail_open``, :class:`LimiterUnavailable` under ``fail_closed``.
        """
        if key.rpm is None and key.tpm is None:
            return None
        reply = await self._run(key, "admit", 0)
        if reply is None:
            if self._on_error == "fail_closed":
                raise LimiterUnavailable(f"the rate-limit store ({self.where}) did not answer")
            return None
        wait = float(reply)
        return wait if wait > 0 else None

    async def charge(self, key: KeyEntry, tokens: int) -> None:
        """Charge ``tokens`` to ``key``'s ``tpm`` bucket, into debt if need be.

        A checkpoint when there is something to charge. Never raises for a
        Redis failure: the charge is lost, counted and logged.
        """
        if key.tpm is not None and tokens > 0:
            await self._run(key, "charge", tokens)

    async def _run(self, key: KeyEntry, operation: str, tokens: int) -> bytes | None:
        """Run the script for ``key`` within the timeout; None if Redis failed or was late."""
        if self._client is None:
            raise RuntimeError("RedisRateLimiter is not open: use `async with limiter:`")
        arguments = [
            operation,
            repr(self._clock()),  # repr: the shortest text that reads back as the same float
            str(key.rpm or 0),
            str(key.tpm or 0),
            str(tokens),
            repr(self._ttl_margin),
        ]
        problem = f"no answer within {self._timeout * 1000:g} ms"
        reply: object = None
        with trio.move_on_after(self._timeout):
            try:
                reply = await self._client.invoke_script(
                    _script, keys=list(self.key_names(key)), args=arguments
                )
            except GlideError as exc:
                problem = f"{type(exc).__name__}: {exc}"
        if isinstance(reply, bytes):
            self._answered()
            return reply
        if reply is not None:
            problem = f"unexpected reply {reply!r:.100}"
        self._failed(problem)
        return None

    def _answered(self) -> None:
        if self._down:
            self._down = False
            logger.info("rate limits: Redis at %s answers again", self.where)

    def _failed(self, problem: str) -> None:
        self.unavailable += 1
        self._failed_since_warning += 1
        self._down = True
        if self.on_unavailable is not None:
            self.on_unavailable()
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < self._warn_every:
            return
        outcome = (
            "requests are admitted without limits"
            if self._on_error == "fail_open"
            else "limited requests are refused with 503"
        )
        logger.warning(
            "rate limits: Redis at %s failed %d call(s) since the last warning (%s); %s",
            self.where,
            self._failed_since_warning,
            problem,
            outcome,
        )
        self._warned_at = now
        self._failed_since_warning = 0
