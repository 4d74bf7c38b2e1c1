"""Rate limits shared through Redis: the same answers as in memory, across processes.

Rules for these tests, on top of tests/conftest.py's:

1. They use a real Redis. The shared server at 127.0.0.1:6379 must answer:
   if it does not, they fail under CI and are skipped elsewhere
   (``tests/redis_support.py:require_redis`` says how to start it).
2. Each test writes only under a prefix of its own (a fresh uuid) and deletes
   every key under it afterwards.
3. Tests that stop, restart or pause Redis do it to a ``redis-server`` of
   their own on a free port (:class:`~tests.redis_support.RedisServer`),
   never to the shared one.
4. Bucket time comes from a :class:`FakeClock` that only moves when the test
   moves it, so refills and waits are exact. Redis itself runs in real time,
   so every test also carries an absolute ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from glide import GlideClient, GlideClientConfiguration, NodeAddress

from tests.helpers import (
    CLIENT_KEY,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    make_config,
    serve_command,
)
from tests.redis_support import (
    RedisServer,
    delete_under,
    eventually,
    keys_under,
    require_redis,
)
from trio_gateway._accounting.limiter import LimiterUnavailable, MemoryRateLimiter, RateLimiter
from trio_gateway._accounting.redis_limiter import TTL_MARGIN, RedisRateLimiter
from trio_gateway._core.buckets import retry_after_header
from trio_gateway._core.config import KeyEntry, hash_key
from trio_gateway._proxy.app import Gateway
from trio_gateway.testing.mock_upstream import MockUpstream, Script

TIME_LIMIT = 30
SECRET = "sk-client-secret-for-redis-tests"
DIGEST = hash_key(SECRET)
# Long enough that no bucket expires in real time while the fake clock stands still.
NO_EXPIRY = 3600.0
# A timeout no healthy call reaches on a busy machine, for the tests where Redis is up:
# a late answer there would fail open and change the count under test.
PATIENT = 1.0
# For the tests that stop Redis: bounded well under their 0.5 s checks, yet
# long enough that the calls made while it is up do not time out on a busy
# machine. The 50 ms default is tested on a paused Redis.
DOWN_TIMEOUT = 0.25


class FakeClock:
    """Wall-clock-like seconds that move only when the test moves them."""

    def __init__(self, now: float = 1_800_000_000.123456) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def key(name: str = "alice", **limits: Any) -> KeyEntry:
    return KeyEntry(name, DIGEST, **limits)


def retry_after(wait: float | None) -> bytes:
    """The ``Retry-After`` the gateway sends for a refusal's wait."""
    assert wait is not None, "refused"
    return retry_after_header(wait)


def shared_limiter(prefix: str, clock: FakeClock, **options: Any) -> RedisRateLimiter:
    """A limiter on the shared Redis, patient, whose buckets never expire during a test."""
    url = require_redis()
    options = {"timeout": PATIENT, "ttl_margin": NO_EXPIRY, **options}
    return RedisRateLimiter(url, prefix=prefix, clock=clock, **options)


def new_prefix() -> str:
    return f"test-trio-gateway:{uuid.uuid4().hex}:"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def admin() -> AsyncIterator[GlideClient]:
    """A client of the shared Redis, for reading what the limiter wrote."""
    require_redis()
    config = GlideClientConfiguration([NodeAddress("127.0.0.1", 6379)], request_timeout=2000)
    client = await GlideClient.create(config)
    yield client
    await client.close()


@pytest.fixture
async def prefix(admin: GlideClient) -> AsyncIterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    fresh = new_prefix()
    yield fresh
    with trio.fail_after(10):
        await delete_under(admin, fresh)


@pytest.fixture
async def throwaway(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, to kill, restart and pause."""
    server = RedisServer(tmp_path)
    with trio.fail_after(10):
        await server.start()
    yield server
    with trio.fail_after(10):
        await server.stop()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[RateLimiter]:
    """Each store in turn, on the same fake clock: the answers must be the same."""
    if request.param == "memory":
        yield MemoryRateLimiter(clock=clock)
        return
    fresh = new_prefix()
    redis = shared_limiter(fresh, clock)
    async with redis:
        yield redis
        with trio.fail_after(10):
            assert redis._client is not None
            await delete_under(redis._client, fresh)
    assert redis.unavailable == 0


# --- the same semantics in memory and in Redis ---------------------------------------------


async def test_rpm_exhausts_at_exactly_n_and_tells_how_long_to_wait(
    limiter: RateLimiter, clock: FakeClock
):
    with trio.fail_after(TIME_LIMIT):
        alice, bob = key("alice", rpm=2), key("bob", rpm=2)
        assert await limiter.admit(alice) is None
        assert await limiter.admit(alice) is None
        wait = await limiter.admit(alice)
        assert wait == pytest.approx(30.0)
        assert retry_after(wait) == b"30"
        assert await limiter.admit(bob) is None, "keys have separate buckets"
        clock.advance(29.0)
        wait = await limiter.admit(alice)
        assert wait == pytest.approx(1.0), "a refusal is not counted"
        assert retry_after(wait) == b"1"
        clock.advance(1.0)
        assert await limiter.admit(alice) is None
        assert await limiter.admit(alice) == pytest.approx(30.0)


async def test_a_bucket_refills_to_its_capacity_and_no_further(
    limiter: RateLimiter, clock: FakeClock
):
    with trio.fail_after(TIME_LIMIT):
        limited = key(rpm=5)
        assert await limiter.admit(limited) is None
        clock.advance(10_000.0)
        admitted = [await limiter.admit(limited) for _ in range(6)]
        assert admitted[:5] == [None] * 5
        assert admitted[5] == pytest.approx(12.0)  # one request every 60 / 5 s


async def test_an_unlimited_key_is_always_admitted(limiter: RateLimiter):
    with trio.fail_after(TIME_LIMIT):
        free = key()
        for _ in range(100):
            assert await limiter.admit(free) is None
        await limiter.charge(free, 10**9)
        assert await limiter.admit(free) is None


async def test_tpm_debt_refuses_without_taking_a_request(limiter: RateLimiter, clock: FakeClock):
    with trio.fail_after(TIME_LIMIT):
        both = key(rpm=2, tpm=60)  # tpm: 1 token per second
        assert await limiter.admit(both) is None
        await limiter.charge(both, 90)  # 60 - 90: 30 tokens in debt
        for _ in range(5):
            wait = await limiter.admit(both)
            assert wait == pytest.approx(31.0)
            assert retry_after(wait) == b"31"
        # The refusals took nothing from rpm: one of two requests is left.
        requests_only = dataclasses.replace(both, tpm=None)
        assert await limiter.admit(requests_only) is None
        assert await limiter.admit(requests_only) == pytest.approx(30.0)
        clock.advance(31.0)
        assert await limiter.admit(both) is None
        await limiter.charge(both, 0)  # nothing to charge: no change
        await limiter.charge(dataclasses.replace(both, tpm=None), 500)  # no tpm: no change
        assert await limiter.admit(dataclasses.replace(both, rpm=None)) is None  # tpm: 1 left


async def test_a_changed_limit_starts_a_fresh_bucket(limiter: RateLimiter, clock: FakeClock):
    with trio.fail_after(TIME_LIMIT):
        two = key(rpm=2, tpm=60)
        assert await limiter.admit(two) is None
        assert await limiter.admit(two) is None
        await limiter.charge(two, 1000)
        assert await limiter.admit(two) == pytest.approx(941.0)
        three = dataclasses.replace(two, rpm=3)
        # rpm is fresh (3 of 3), the unchanged tpm keeps its debt.
        assert await limiter.admit(dataclasses.replace(three, tpm=None)) is None
        assert await limiter.admit(three) == pytest.approx(941.0)
        fresh = dataclasses.replace(three, tpm=120)
        assert await limiter.admit(fresh) is None
        assert await limiter.admit(fresh) is None
        assert await limiter.admit(fresh) == pytest.approx(20.0)  # 3 of 3 taken


async def test_both_stores_give_bit_identical_answers_to_a_random_workload(clock: FakeClock):
    """A seeded random mix of admits, charges, limit changes and clock moves, side by side."""
    fresh = new_prefix()
    memory = MemoryRateLimiter(clock=clock)
    rng = random.Random(13)
    limits = [None, 1, 2, 7, 60, 1000]
    entries = {name: key(name, rpm=2, tpm=60) for name in ("alice", "bob", "carol")}
    admitted = refused = 0
    with trio.fail_after(TIME_LIMIT):
        async with shared_limiter(fresh, clock) as redis:
            try:
                for step in range(600):
                    name = rng.choice(list(entries))
                    roll = rng.random()
                    if roll < 0.03:  # the operator changes this key's limits
                        entries[name] = key(name, rpm=rng.choice(limits), tpm=rng.choice(limits))
                    elif roll < 0.6:
                        entry = entries[name]
                        answers = (await memory.admit(entry), await redis.admit(entry))
                        assert answers[0] == answers[1], (step, entry, answers)
                        refused += answers[0] is not None
                        admitted += answers[0] is None
                    elif roll < 0.8:
                        tokens = rng.choice([0, 1, 17, 250, 5000])
                        await memory.charge(entries[name], tokens)
                        await redis.charge(entries[name], tokens)
                    else:
                        clock.advance(rng.choice([0.001, 0.37, 1.0, 6.5, 29.99, 120.0]))
                assert redis.unavailable == 0
                assert admitted > 50, "the workload is admitted often"
                assert refused > 50, "and refused often"
            finally:
                assert redis._client is not None
                await delete_under(redis._client, fresh)


# --- shared by processes --------------------------------------------------------------------


async def test_two_limiters_share_one_minute(prefix: str, clock: FakeClock):
    """Two instances, as two processes would have: together exactly rpm requests."""
    limited = key(rpm=10)
    with trio.fail_after(TIME_LIMIT):
        async with (
            shared_limiter(prefix, clock) as first,
            shared_limiter(prefix, clock) as second,
        ):
            answers: list[float | None] = []

            async def ask(limiter: RedisRateLimiter) -> None:
                answers.append(await limiter.admit(limited))

            async with trio.open_nursery() as nursery:
                for index in range(10):
                    nursery.start_soon(ask, (first, second)[index % 2])
            assert answers == [None] * 10
            eleventh = await second.admit(limited)
            assert eleventh == pytest.approx(6.0)
            assert await first.admit(limited) == pytest.approx(6.0)
            clock.advance(6.0)
            assert await first.admit(limited) is None
            assert await second.admit(limited) == pytest.approx(6.0)


async def test_two_serve_processes_share_the_limit(tmp_path: Path, prefix: str, admin: GlideClient):
    """Two real `trio-gateway serve` processes, one key with rpm = 10, 15 requests over both."""
    url = require_redis()
    mock = MockUpstream(Script(tokens=3), api_key="upstream-key")
    config = tmp_path / "gateway.toml"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(mock.serve)
            config.write_text(
                f"""
[upstreams.mock]
base_url = "{mock.base_url}"
api_key_env = "REDIS_TEST_UPSTREAM_KEY"

[models."m"]
upstream = "mock"
upstream_model = "vendor/model"

[[keys]]
name = "shared"
sha256 = "{DIGEST}"
rpm = 10

[accounting]
database = ":memory:"

[log]
level = "off"

[limits]
redis_url = "{url}"
redis_prefix = "{prefix}"
redis_timeout = {PATIENT}
"""
            )
            env = {"REDIS_TEST_UPSTREAM_KEY": "upstream-key"}
            async with (
                serve_command(config, env) as one,
                serve_command(config, env) as two,
                httpx.AsyncClient(timeout=10) as client,
            ):
                answers: list[httpx.Response] = []

                async def ask(base: str) -> None:
                    answers.append(
                        await client.post(
                            f"{base}/v1/chat/completions",
                            headers={"authorization": f"Bearer {SECRET}"},
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                        )
                    )

                async with trio.open_nursery() as requests:
                    for index in range(15):
                        requests.start_soon(ask, (one.url, two.url)[index % 2])
            nursery.cancel_scope.cancel()
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * 10 + [429] * 5
    for refused in (answer for answer in answers if answer.status_code == 429):
        assert 1 <= int(refused.headers["retry-after"]) <= 6  # one request every 6 s
    assert len(mock.requests) == 10
    assert one.status == 0
    assert two.status == 0
    stored = await keys_under(admin, prefix)
    assert stored == [f"{prefix}shared:rpm".encode()]
    await assert_no_secret(admin, stored)


async def test_a_gateway_on_redis_answers_429_with_retry_after(prefix: str, clock: FakeClock):
    body = {
        "id": "gen-1",
        "object": "chat.completion",
        "model": "vendor/model:free",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20},
    }
    answer = FakeResponse(body=[orjson.dumps(body)], content_type="application/json")
    config = dataclasses.replace(
        make_config(), keys=(KeyEntry("tests", hash_key(CLIENT_KEY), rpm=2, tpm=60),)
    )

    def call() -> AsgiCall:
        return AsgiCall.json({"model": "kilo/free-model", "messages": []})

    with trio.fail_after(TIME_LIMIT):
        async with shared_limiter(prefix, clock) as redis:
            gateway = Gateway(config, transport=FakeUpstream(answer), limiter=redis)
            assert (await call().run(gateway)).status == 200  # 60 - 120: 60 tokens in debt
            refused = await call().run(gateway)
            assert refused.status == 429
            assert refused.response_headers[b"retry-after"] == b"61"
            clock.advance(61)
            assert (await call().run(gateway)).status == 200


# --- what is stored ---------------------------------------------------------------------


async def assert_no_secret(admin: GlideClient, stored: list[bytes]) -> None:
    for name in stored:
        assert SECRET.encode() not in name
        assert DIGEST.encode() not in name.lower()
        for field, value in (await admin.hgetall(name)).items():
            for text in (field, value):
                assert SECRET.encode() not in text
                assert DIGEST.encode() not in text.lower()


async def test_keys_are_named_by_the_key_name_and_never_hold_its_secret(
    prefix: str, clock: FakeClock, admin: GlideClient
):
    with trio.fail_after(TIME_LIMIT):
        async with shared_limiter(prefix, clock) as redis:
            entry = key("team-a", rpm=3, tpm=1000)
            assert await redis.admit(entry) is None
            await redis.charge(entry, 250)
        stored = sorted(await keys_under(admin, prefix))
        assert stored == [f"{prefix}team-a:rpm".encode(), f"{prefix}team-a:tpm".encode()]
        await assert_no_secret(admin, stored)
        state = await admin.hgetall(f"{prefix}team-a:tpm")
        assert state == {
            b"level": b"750",
            b"updated": repr(clock.now).encode(),
            b"capacity": b"1000",
        }


async def test_every_bucket_expires_once_it_would_be_full_again(
    prefix: str, clock: FakeClock, admin: GlideClient
):
    """TTL = the time to refill completely + TTL_MARGIN; idle keys vanish, answers unchanged."""
    margin_ms = TTL_MARGIN * 1000
    with trio.fail_after(TIME_LIMIT):
        async with shared_limiter(prefix, clock, ttl_margin=TTL_MARGIN) as redis:
            entry = key(rpm=10, tpm=60)
            assert await redis.admit(entry) is None  # rpm: 9 of 10, 6 s to refill
            rpm_ttl = await admin.pttl(f"{prefix}alice:rpm")
            assert 6000 + margin_ms - 500 < rpm_ttl <= 6000 + margin_ms
            tpm_ttl = await admin.pttl(f"{prefix}alice:tpm")  # full: the margin only
            assert 0 < tpm_ttl <= margin_ms
            await redis.charge(entry, 90)  # 60 - 90: 90 s to refill at 1 token per second
            tpm_ttl = await admin.pttl(f"{prefix}alice:tpm")
            assert 90_000 + margin_ms - 500 < tpm_ttl <= 90_000 + margin_ms
            for name in await keys_under(admin, prefix):
                assert await admin.ttl(name) > 0, "no bucket lives forever"


# --- when Redis fails -------------------------------------------------------------------------


async def test_fail_open_admits_counts_and_warns_once_per_interval_then_recovers(
    throwaway: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="trio_gateway.limits")
    counted: list[None] = []
    limited = key(rpm=1)
    with trio.fail_after(TIME_LIMIT):
        async with RedisRateLimiter(
            throwaway.url,
            prefix=new_prefix(),
            clock=clock,
            timeout=DOWN_TIMEOUT,
            ttl_margin=NO_EXPIRY,
            on_unavailable=lambda: counted.append(None),
        ) as redis:
            assert await redis.admit(limited) is None
            assert await redis.admit(limited) == pytest.approx(60.0)
            await throwaway.kill()
            for _ in range(3):
                assert await within(0.5, redis.admit, limited) is None  # admitted: fail open
            await within(0.5, redis.charge, dataclasses.replace(limited, tpm=10), 100)
            assert redis.unavailable == 4
            assert len(counted) == 4
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, "at most one warning per minute"
            assert "127.0.0.1" in warnings[0].getMessage()
            assert "admitted without limits" in warnings[0].getMessage()
            clock.advance(60.0)
            assert await redis.admit(limited) is None
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 2
            assert "failed 4 call(s)" in warnings[1].getMessage()

            await throwaway.start()  # the same port, empty: the bucket starts full
            await eventually(lambda: refuses(redis, limited))  # fail open until it is back
            # Back: the bucket is in Redis again, and the script was loaded again.
            assert await redis.admit(limited) == pytest.approx(60.0)
            assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_fail_closed_refuses_while_redis_is_down_and_charge_never_raises(
    throwaway: RedisServer, clock: FakeClock
):
    limited = key(rpm=5, tpm=100)
    with trio.fail_after(TIME_LIMIT):
        async with RedisRateLimiter(
            throwaway.url,
            prefix=new_prefix(),
            clock=clock,
            timeout=DOWN_TIMEOUT,
            on_error="fail_closed",
        ) as redis:
            assert await redis.admit(limited) is None
            await throwaway.kill()
            with pytest.raises(LimiterUnavailable, match="did not answer"):
                await within(0.5, redis.admit, limited)
            await within(0.5, redis.charge, limited, 500)  # lost, counted, not raised
            assert redis.unavailable == 2
            assert await redis.admit(key()) is None, "an unlimited key never asks Redis"
            await throwaway.start()
            await eventually(lambda: answers(redis, limited))


@pytest.mark.parametrize("on_error", ["fail_open", "fail_closed"])
async def test_a_paused_redis_costs_at_most_the_timeout(
    throwaway: RedisServer, clock: FakeClock, on_error: str
):
    """SIGSTOP: the socket stays open but nothing answers; each call gives up at 50 ms."""
    limited = key(rpm=5, tpm=100)
    with trio.fail_after(TIME_LIMIT):
        async with RedisRateLimiter(
            throwaway.url,
            prefix=new_prefix(),
            clock=clock,
            on_error="fail_open" if on_error == "fail_open" else "fail_closed",
        ) as redis:
            assert await redis.admit(limited) is None
            before = redis.unavailable  # 0, unless the machine is very busy
            throwaway.pause()
            try:
                for _ in range(3):
                    if on_error == "fail_open":
                        assert await within(0.5, redis.admit, limited) is None
                    else:
                        with pytest.raises(LimiterUnavailable):
                            await within(0.5, redis.admit, limited)
                    await within(0.5, redis.charge, limited, 10)
            finally:
                throwaway.resume()
            assert redis.unavailable == before + 6
            await eventually(lambda: answers(redis, limited))


async def test_redis_down_at_start_then_up(tmp_path: Path, clock: FakeClock):
    server = RedisServer(tmp_path)  # not started yet: nothing listens on its port
    limited = key(rpm=1)
    try:
        with trio.fail_after(TIME_LIMIT):
            started = trio.current_time()
            async with RedisRateLimiter(
                server.url, prefix=new_prefix(), clock=clock, timeout=DOWN_TIMEOUT
            ) as redis:
                assert trio.current_time() - started < 3, "opening never waits for Redis"
                assert await within(0.5, redis.admit, limited) is None
                assert redis.unavailable >= 1
                await server.start()
                await eventually(lambda: refuses(redis, limited))
                assert await redis.admit(limited) == pytest.approx(60.0)
    finally:
        with trio.fail_after(10):
            await server.stop()


async def test_cancelled_calls_leave_the_client_usable(prefix: str, clock: FakeClock):
    """Callers' cancel scopes abandon calls at random points; later calls still pair up."""
    rng = random.Random(7)
    with trio.fail_after(TIME_LIMIT):
        async with shared_limiter(prefix, clock) as redis:

            async def impatient(worker: int) -> None:
                for index in range(50):
                    with trio.move_on_after(rng.random() * 0.002):
                        await redis.admit(key(f"noise-{worker}-{index}", rpm=1000))

            async with trio.open_nursery() as nursery:
                for worker in range(4):
                    nursery.start_soon(impatient, worker)
            assert redis.unavailable == 0, "a caller's cancellation is not a Redis failure"
            limited = key("after", rpm=5)
            answers = [await redis.admit(limited) for _ in range(6)]
            assert answers[:5] == [None] * 5
            assert answers[5] == pytest.approx(12.0)


async def refuses(limiter: RateLimiter, entry: KeyEntry) -> bool:
    """Whether ``limiter`` refuses ``entry`` now (under fail_open, Redis is answering then)."""
    return await limiter.admit(entry) is not None


async def answers(limiter: RedisRateLimiter, entry: KeyEntry) -> bool:
    """Whether Redis answers ``limiter`` now: the call neither failed open nor raised."""
    before = limiter.unavailable
    with contextlib.suppress(LimiterUnavailable):
        await limiter.admit(entry)
    return limiter.unavailable == before


async def within(seconds: float, call: Callable[..., Any], *args: Any) -> Any:
    """Await ``call(*args)``; fail unless it returned (or raised) within ``seconds``."""
    started = trio.current_time()
    try:
        return await call(*args)
    finally:
        assert trio.current_time() - started < seconds
