"""Client keys: per-key model allowlists and rate limits (rpm, tpm), on the mock clock."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_MODEL,
    AsgiCall,
    FakeResponse,
    FakeUpstream,
    make_config,
    sse,
)
from trio_gateway._accounting.limiter import LimiterUnavailable, MemoryRateLimiter
from trio_gateway._core.buckets import TokenBucket, retry_after_header
from trio_gateway._core.config import KeyEntry, ModelRoute, hash_key
from trio_gateway._proxy.app import Gateway

OTHER_MODEL = "kilo/other-model"
OTHER_KEY = "second-client-key"

CHAT = ("/v1/chat/completions", {"model": PUBLIC_MODEL, "messages": []})
MESSAGES = ("/v1/messages", {"model": PUBLIC_MODEL, "max_tokens": 5, "messages": []})


def chat_answer(prompt_tokens: int = 40, completion_tokens: int = 10) -> FakeResponse:
    body = {
        "id": "gen-1",
        "object": "chat.completion",
        "model": "vendor/model:free",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    return FakeResponse(body=[orjson.dumps(body)], content_type="application/json")


def gateway_with(
    *keys: KeyEntry, answer: FakeResponse | None = None
) -> tuple[Gateway, FakeUpstream]:
    base = make_config()
    models = {
        **base.models,
        OTHER_MODEL: ModelRoute(OTHER_MODEL, "vendor", "vendor/other", free=False),
    }
    config = dataclasses.replace(base, models=models, keys=keys)
    upstream = FakeUpstream(answer or chat_answer())
    return Gateway(config, transport=upstream), upstream


def key(name: str = "tests", secret: str = CLIENT_KEY, **limits: Any) -> KeyEntry:
    return KeyEntry(name, hash_key(secret), **limits)


def call(
    route: tuple[str, dict[str, Any]] = CHAT, secret: str = CLIENT_KEY, **fields: Any
) -> AsgiCall:
    path, payload = route
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {secret}".encode()),
    ]
    return AsgiCall(path=path, body=orjson.dumps({**payload, **fields}), headers=headers)


def error_of(answer: AsgiCall) -> dict[str, Any]:
    body = answer.json_body()
    error = body["error"]
    assert isinstance(error, dict)
    return error


# --- the token bucket, pure ----------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_capacity_per_minute():
    bucket = TokenBucket(3, now=100.0)
    for _ in range(3):
        assert bucket.wait(100.0) == 0.0
        bucket.take(100.0)
    assert bucket.wait(100.0) == pytest.approx(20.0)  # one token every 60 / 3 s
    assert bucket.wait(110.0) == pytest.approx(10.0)
    assert bucket.wait(120.0) == 0.0
    assert bucket.wait(10_000.0) == 0.0
    assert bucket.level == 3.0  # never above capacity, however long it rested


def test_bucket_charge_goes_into_debt_and_waits_it_out():
    bucket = TokenBucket(600, now=0.0)  # 10 tokens per second
    bucket.charge(1000, now=0.0)
    assert bucket.level == -400.0
    assert bucket.wait(0.0) == pytest.approx(40.1)  # back to one whole token
    assert bucket.wait(40.1) == pytest.approx(0.0, abs=1e-9)


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one():
    assert retry_after_header(0.01) == b"1"
    assert retry_after_header(1.0) == b"1"
    assert retry_after_header(1.2) == b"2"
    assert retry_after_header(29.999) == b"30"


async def test_memory_limiter_counts_per_key_under_the_mock_clock(
    autojump_clock: trio.testing.MockClock,
):
    limiter = MemoryRateLimiter()
    alice, bob = key("alice", "a", rpm=2), key("bob", "b", rpm=2)
    assert await limiter.admit(alice) is None
    assert await limiter.admit(alice) is None
    assert await limiter.admit(alice) == pytest.approx(30.0)
    assert await limiter.admit(bob) is None, "keys have separate buckets"
    await trio.sleep(29.0)
    assert await limiter.admit(alice) == pytest.approx(1.0), "a refusal is not counted"
    await trio.sleep(1.0)
    assert await limiter.admit(alice) is None


async def test_memory_limiter_unlimited_key_is_always_admitted(
    autojump_clock: trio.testing.MockClock,
):
    limiter = MemoryRateLimiter()
    free = key()
    for _ in range(1000):
        assert await limiter.admit(free) is None
    await limiter.charge(free, 10**9)
    assert await limiter.admit(free) is None


async def test_memory_limiter_tpm_refuses_while_in_debt_without_taking_a_request(
    autojump_clock: trio.testing.MockClock,
):
    limiter = MemoryRateLimiter()
    both = key(rpm=2, tpm=60)  # tpm: 1 token per second
    assert await limiter.admit(both) is None
    await limiter.charge(both, 90)  # 60 - 90: 30 tokens in debt
    for _ in range(5):
        assert await limiter.admit(both) == pytest.approx(31.0)
    # The refusals took nothing from rpm: one of two requests is left.
    requests_only = dataclasses.replace(both, tpm=None)
    assert await limiter.admit(requests_only) is None
    assert await limiter.admit(requests_only) == pytest.approx(30.0)
    await trio.sleep(31.0)
    assert await limiter.admit(both) is None


# --- through the gateway -------------------------------------------------------------------


async def test_over_rpm_is_429_with_retry_after_in_openai_shape(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = gateway_with(key(rpm=2))
    for _ in range(2):
        assert (await call().run(gateway)).status == 200
    refused = await call().run(gateway)
    assert refused.status == 429
    assert refused.response_headers[b"retry-after"] == b"30"
    error = error_of(refused)
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert len(upstream.requests) == 2, "a refused request never goes upstream"
    await trio.sleep(30)
    assert (await call().run(gateway)).status == 200


async def test_over_rpm_is_429_in_anthropic_shape_for_messages(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = gateway_with(key(rpm=1))
    assert (await call(MESSAGES).run(gateway)).status == 200
    refused = await call(MESSAGES).run(gateway)
    assert refused.status == 429
    assert refused.response_headers[b"retry-after"] == b"60"
    body = refused.json_body()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert len(upstream.requests) == 1


async def test_tpm_is_charged_from_reported_usage_after_the_answer(
    autojump_clock: trio.testing.MockClock,
):
    gateway, upstream = gateway_with(key(tpm=60), answer=chat_answer(100, 20))
    assert (await call().run(gateway)).status == 200  # 60 - 120: 60 tokens in debt
    refused = await call().run(gateway)
    assert refused.status == 429
    assert refused.response_headers[b"retry-after"] == b"61"
    await trio.sleep(61)
    assert (await call().run(gateway)).status == 200
    assert len(upstream.requests) == 2


async def test_tpm_is_charged_for_a_streamed_answer_too(autojump_clock: trio.testing.MockClock):
    usage = {"prompt_tokens": 50, "completion_tokens": 20}
    chunk = {"id": "gen-1", "model": "vendor/model:free", "choices": []}
    stream = FakeResponse(body=sse({**chunk, "usage": usage}, "[DONE]"))
    gateway, _ = gateway_with(key(tpm=60), answer=stream)
    first = await call(stream=True).run(gateway)
    assert first.status == 200
    assert first.text.endswith(b"data: [DONE]\n\n")
    refused = await call(stream=True).run(gateway)
    assert refused.status == 429
    assert refused.response_headers[b"retry-after"] == b"11"  # 70 - 60 = 10 in debt, +1


async def test_tpm_counts_messages_cache_tokens(autojump_clock: trio.testing.MockClock):
    message = {
        "id": "msg_1",
        "type": "message",
        "model": "vendor/model:free",
        "content": [],
        "usage": {
            "input_tokens": 10,
            "output_tokens": 10,
            "cache_read_input_tokens": 30,
            "cache_creation_input_tokens": 20,
        },
    }
    answer = FakeResponse(body=[orjson.dumps(message)], content_type="application/json")
    gateway, _ = gateway_with(key(tpm=60), answer=answer)
    assert (await call(MESSAGES).run(gateway)).status == 200
    refused = await call(MESSAGES).run(gateway)
    assert refused.status == 429
    assert refused.response_headers[b"retry-after"] == b"11"  # 70 charged, 10 in debt


async def test_limits_are_per_key(autojump_clock: trio.testing.MockClock):
    gateway, _ = gateway_with(key(rpm=1), key("other", OTHER_KEY, rpm=1))
    assert (await call().run(gateway)).status == 200
    assert (await call().run(gateway)).status == 429
    assert (await call(secret=OTHER_KEY).run(gateway)).status == 200


async def test_bad_requests_are_refused_before_the_limit_counts(
    autojump_clock: trio.testing.MockClock,
):
    gateway, _ = gateway_with(key(rpm=1, models=frozenset({PUBLIC_MODEL})))
    assert (await call(model="kilo/no-such-model").run(gateway)).status == 404
    assert (await call(model=OTHER_MODEL).run(gateway)).status == 403
    assert (await call(secret="wrong").run(gateway)).status == 401
    assert (await call().run(gateway)).status == 200, "mistakes did not use up the minute"


async def test_disallowed_model_is_403_in_each_shape(autojump_clock: trio.testing.MockClock):
    gateway, upstream = gateway_with(key(models=frozenset({OTHER_MODEL})))
    chat = await call().run(gateway)
    assert chat.status == 403
    error = error_of(chat)
    assert error["type"] == "permission_error"
    assert error["code"] == "model_not_allowed"
    assert PUBLIC_MODEL in error["message"]
    messages = await call(MESSAGES).run(gateway)
    assert messages.status == 403
    assert messages.json_body()["type"] == "error"
    assert messages.json_body()["error"]["type"] == "permission_error"
    assert upstream.requests == []
    allowed = await call(model=OTHER_MODEL).run(gateway)
    assert allowed.status == 200
    assert len(upstream.requests) == 1


async def test_models_list_shows_only_what_the_key_may_use(
    autojump_clock: trio.testing.MockClock,
):
    gateway, _ = gateway_with(key(models=frozenset({OTHER_MODEL})), key("all", OTHER_KEY))
    auth = (b"authorization", f"Bearer {CLIENT_KEY}".encode())
    limited = await AsgiCall(method="GET", path="/v1/models", headers=[auth]).run(gateway)
    assert [model["id"] for model in limited.json_body()["data"]] == [OTHER_MODEL]
    auth = (b"authorization", f"Bearer {OTHER_KEY}".encode())
    everything = await AsgiCall(method="GET", path="/v1/models", headers=[auth]).run(gateway)
    assert [model["id"] for model in everything.json_body()["data"]] == [PUBLIC_MODEL, OTHER_MODEL]


async def test_huge_model_names_are_echoed_bounded(autojump_clock: trio.testing.MockClock):
    gateway, _ = gateway_with(key(models=frozenset({OTHER_MODEL})))
    answer = await call(model="x" * 1_000_000).run(gateway)
    assert answer.status == 404
    assert len(answer.text) < 500
    assert "x" * 100 + "..." in error_of(answer)["message"]


async def test_a_custom_limiter_backs_the_gateway(autojump_clock: trio.testing.MockClock):
    """The limiter is an interface: a shared store can stand in for the in-memory one."""

    class Recording:
        def __init__(self) -> None:
            self.admitted: list[str] = []
            self.charged: list[tuple[str, int]] = []

        async def admit(self, key: KeyEntry) -> float | None:
            self.admitted.append(key.name)
            return 2.5 if len(self.admitted) > 1 else None

        async def charge(self, key: KeyEntry, tokens: int) -> None:
            self.charged.append((key.name, tokens))

    limiter = Recording()
    config = dataclasses.replace(make_config(), keys=(key(tpm=1000),))
    gateway = Gateway(config, transport=FakeUpstream(chat_answer(7, 3)), limiter=limiter)
    assert (await call().run(gateway)).status == 200
    refused = await call().run(gateway)
    assert refused.status == 429
    assert refused.response_headers[b"retry-after"] == b"3"
    assert limiter.admitted == ["tests", "tests"]
    assert limiter.charged == [("tests", 10)], "only the request that ran is charged"


@pytest.mark.parametrize("route", [CHAT, MESSAGES], ids=["chat", "messages"])
async def test_an_unavailable_shared_limiter_failing_closed_is_503_in_the_kinds_shape(
    route: tuple[str, dict[str, Any]], autojump_clock: trio.testing.MockClock
):
    class Down:
        async def admit(self, key: KeyEntry) -> float | None:
            raise LimiterUnavailable("the rate-limit store (redis.internal:6379) did not answer")

        async def charge(self, key: KeyEntry, tokens: int) -> None:
            raise AssertionError("nothing ran, so nothing is charged")

    upstream = FakeUpstream(chat_answer())
    config = dataclasses.replace(make_config(), keys=(key(rpm=10),))
    gateway = Gateway(config, transport=upstream, limiter=Down())
    answer = await call(route).run(gateway)
    assert answer.status == 503
    assert answer.response_headers[b"retry-after"] == b"1"
    assert upstream.requests == []
    body = answer.json_body()
    assert body["error"]["type"] == (
        "overloaded_error" if route is MESSAGES else "service_unavailable"
    )
    assert "redis" not in answer.text.decode()
