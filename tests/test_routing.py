"""Routing that survives a failing provider: deployments, retries and fallbacks (docs/routing.md).

The rules of this file, on top of those in ``tests/conftest.py``:

1. Every test that waits runs under ``autojump_clock``, against
   :class:`~tests.helpers.FakeUpstream`, so each time asserted is exact.
2. Each upstream is a host of its own (``https://NAME.invalid/v1``), and
   :class:`ByUpstream` answers each request from the script of the upstream
   it went to, so each deployment behaves as the test says.
3. The random source of the weighted choice is seeded: every run makes the
   same choices.
4. The end-to-end tests (the official SDKs against a real hypercorn and two
   mock providers on 127.0.0.1:0) carry an absolute ``trio.fail_after``.
5. The pure rules (:mod:`trio_gateway._core.routing`) are tested without trio.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

import anthropic
import httpx
import openai
import orjson
import pytest
import trio
import trio.testing

from tests.helpers import (
    CLIENT_KEY,
    STALL,
    AsgiCall,
    BodyStep,
    FakeResponse,
    FakeUpstream,
    ListSink,
    start_serving,
)
from trio_gateway._core.config import (
    ConfigError,
    Deployment,
    GatewayConfig,
    KeyEntry,
    ModelRoute,
    Routing,
    Timeouts,
    Upstream,
    hash_key,
)
from trio_gateway._core.kinds import Failure, FailureType
from trio_gateway._core.record import RequestRecord
from trio_gateway._core.routing import (
    Cooldowns,
    Plan,
    chain_of,
    default_retries,
    retry_after_seconds,
    weighted_pick,
)
from trio_gateway._proxy.app import Gateway
from trio_gateway.sse import SSEEvent
from trio_gateway.testing.mock_upstream import (
    MockUpstream,
    Script,
    StreamKind,
    render_error,
    render_json,
    render_stream,
    script_from_request,
)

T = TypeVar("T")

SMART = "kilo/smart"
CHEAP = "kilo/cheap"
UPSTREAMS = ("openrouter", "direct", "backup", "spare")
PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}
KINDS = tuple(PATHS)
# The event that says a stream ended cleanly, per kind.
CLEAN_END = {"chat": "[DONE]", "messages": "message_stop", "responses": "response.completed"}
FIRST_BYTE = 30.0


def upstream(name: str) -> Upstream:
    return Upstream(name, f"https://{name}.invalid/v1", f"sk-{name}-secret-key")


def primary_with_fallback(**route: Any) -> list[ModelRoute]:
    """kilo/smart on openrouter, falling back to kilo/cheap on direct."""
    return [
        ModelRoute(SMART, "openrouter", "vendor/a", fallbacks=(CHEAP,), **route),
        ModelRoute(CHEAP, "direct", "cheap-1"),
    ]


def make_config(
    models: Sequence[ModelRoute],
    *,
    first_byte: float = FIRST_BYTE,
    routing: Routing | None = None,
    key: KeyEntry | None = None,
) -> GatewayConfig:
    return GatewayConfig(
        upstreams={name: upstream(name) for name in UPSTREAMS},
        models={route.public_name: route for route in models},
        keys=(key or KeyEntry("tests", hash_key(CLIENT_KEY)),),
        timeouts=Timeouts(first_byte=first_byte),
        routing=routing or Routing(),
    )


@dataclass
class Asked:
    """One request as an upstream saw it."""

    upstream: str
    model: str
    at: float


class ByUpstream:
    """The fake providers: each request is answered from the script of its upstream.

    A script is one answer, or a list played in turn (its last answer then
    repeats). ``asked`` notes every request: upstream, model and time.
    """

    def __init__(self, **scripts: FakeResponse | list[FakeResponse]) -> None:
        self.scripts = scripts
        self.turns: dict[str, int] = {}
        self.asked: list[Asked] = []

    def __call__(self, request: httpx.Request) -> FakeResponse:
        name = (request.url.host or "").removesuffix(".invalid")
        body = request.content
        model = str(orjson.loads(body)["model"]) if body.startswith(b"{") else ""
        self.asked.append(Asked(name, model, trio.current_time()))
        script = self.scripts[name]
        if isinstance(script, FakeResponse):
            return script
        turn = self.turns.get(name, 0)
        self.turns[name] = turn + 1
        return script[min(turn, len(script) - 1)]

    @property
    def upstreams(self) -> list[str]:
        return [asked.upstream for asked in self.asked]


@dataclass
class Setup:
    gateway: Gateway
    fake: FakeUpstream
    answers: ByUpstream
    sink: ListSink = field(default_factory=ListSink)

    @property
    def record(self) -> RequestRecord:
        return self.sink.records[-1]


def setup(
    models: Sequence[ModelRoute], answers: ByUpstream, *, seed: int = 1, **config: Any
) -> Setup:
    sink = ListSink()
    fake = FakeUpstream(answers)
    gateway = Gateway(
        make_config(models, **config), transport=fake, sinks=[sink], rng=random.Random(seed)
    )
    return Setup(gateway, fake, answers, sink)


def stream_writes(kind: str, model: str) -> list[bytes]:
    """The mock provider's event stream of ``kind``, one write per event."""
    return render_stream(cast(StreamKind, kind), Script(tokens=3), model)


def stream_answer(kind: str, model: str, **answer: Any) -> FakeResponse:
    return FakeResponse(body=stream_writes(kind, model), **answer)


def json_answer(kind: str, model: str) -> FakeResponse:
    body = render_json(cast(StreamKind, kind), Script(tokens=3), model)
    return FakeResponse(body=[body], content_type="application/json")


def status_answer(kind: str, status: int, **answer: Any) -> FakeResponse:
    body = render_error(kind, status, f"upstream says {status} for vendor/a")
    return FakeResponse(body=[body], status=status, content_type="application/json", **answer)


def request(kind: str, model: str = SMART, *, stream: bool = True, **kwargs: Any) -> AsgiCall:
    payload: dict[str, Any] = {"model": model, "stream": stream}
    if kind == "responses":
        payload["input"] = "hi"
    else:
        payload["messages"] = [{"role": "user", "content": "hi"}]
    if kind == "messages":
        payload["max_tokens"] = 16
    return AsgiCall.json(payload, path=PATHS[kind], **kwargs)


def models_seen(call: AsgiCall) -> set[str]:
    """Every ``model`` value anywhere in the answer (events or JSON body)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                if name == "model" and isinstance(item, str):
                    found.add(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    if call.response_headers.get(b"content-type", b"").startswith(b"text/event-stream"):
        for event in call.events:
            if event.data and event.data != "[DONE]":
                walk(orjson.loads(event.data))
    else:
        walk(call.json_body())
    return found


def last_event(call: AsgiCall) -> SSEEvent:
    return [event for event in call.events if event.data is not None][-1]


def assert_clean_stream(kind: str, call: AsgiCall, public: str) -> None:
    assert call.status == 200
    assert call.ended
    last = last_event(call)
    assert (last.data if kind == "chat" else last.event) == CLEAN_END[kind]
    assert models_seen(call) == {public}


def assert_error_event(kind: str, call: AsgiCall) -> None:
    last = last_event(call)
    if kind == "chat":
        assert "error" in orjson.loads(last.data or "")
    else:
        assert last.event == "error"


def served_by(call: AsgiCall) -> bytes:
    return call.response_headers[b"x-gateway-served-by"]


# --- every retryable cause, at each phase, for each kind ----------------------------------------

# cause -> (the primary's answer, the failed_attempts entry, when the fallback is asked)
RETRYABLE_CAUSES: dict[str, tuple[Callable[[str], FakeResponse], str, float]] = {
    "connect_error": (
        lambda kind: FakeResponse(error=httpx.ConnectError("refused")),
        "openrouter:upstream_unreachable",
        0.0,
    ),
    "reset_before_headers": (
        lambda kind: FakeResponse(error=httpx.RemoteProtocolError("disconnected")),
        "openrouter:upstream_unreachable",
        0.0,
    ),
    "connect_timeout": (
        lambda kind: FakeResponse(headers_delay=2.0, error=httpx.ConnectTimeout("slow")),
        "openrouter:upstream_timeout",
        2.0,
    ),
    # Two attempts share the 30 s: the first is cut at its half, 15 s.
    "first_byte_timeout_on_headers": (
        lambda kind: FakeResponse(headers_delay=1e6),
        "openrouter:upstream_timeout",
        15.0,
    ),
    "ok_but_no_event_before_first_byte": (
        lambda kind: FakeResponse(body=[STALL]),
        "openrouter:upstream_timeout",
        15.0,
    ),
    "ok_then_reset_before_the_first_byte": (
        lambda kind: FakeResponse(body=[3.0, httpx.ReadError("reset")]),
        "openrouter:upstream_reset",
        3.0,
    ),
    "ok_then_empty_body": (
        lambda kind: FakeResponse(body=[3.0]),
        "openrouter:upstream_truncated",
        3.0,
    ),
    **{
        f"status_{status}": (
            partial(lambda status, kind: status_answer(kind, status), status),
            f"openrouter:upstream_status:{status}",
            0.0,
        )
        for status in (429, 500, 502, 503, 504, 529)
    },
}


@pytest.mark.parametrize("cause", RETRYABLE_CAUSES)
@pytest.mark.parametrize("kind", KINDS)
async def test_each_retryable_cause_fails_over_before_the_first_byte(
    kind: str, cause: str, autojump_clock: trio.testing.MockClock
):
    primary, failed, asked_at = RETRYABLE_CAUSES[cause]
    answers = ByUpstream(openrouter=primary(kind), direct=stream_answer(kind, "cheap-1"))
    s = setup(primary_with_fallback(), answers)
    call = await request(kind).run(s.gateway)
    # One clean stream, from the fallback, under the fallback's public name.
    assert_clean_stream(kind, call, CHEAP)
    assert served_by(call) == b"kilo/cheap; upstream=direct"
    assert [(a.upstream, a.model) for a in answers.asked] == [
        ("openrouter", "vendor/a"),
        ("direct", "cheap-1"),
    ]
    assert answers.asked[1].at == pytest.approx(asked_at)
    record = s.record
    assert (record.attempts, record.failed_attempts) == (2, failed)
    assert (record.public_model, record.upstream, record.upstream_model) == (
        SMART,
        "direct",
        "cheap-1",
    )
    assert record.error_type is None
    if s.fake.bodies and len(s.fake.bodies) == 2:  # the failed answer was closed at once
        assert s.fake.bodies[0].closed_at == pytest.approx(asked_at)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_retryable_status_fails_over_for_a_whole_answer(
    kind: str, status: int, autojump_clock: trio.testing.MockClock
):
    answers = ByUpstream(openrouter=status_answer(kind, status), direct=json_answer(kind, "c1"))
    s = setup(primary_with_fallback(), answers)
    call = await request(kind, stream=False).run(s.gateway)
    assert call.status == 200
    assert models_seen(call) == {CHEAP}
    assert served_by(call) == b"kilo/cheap; upstream=direct"
    assert answers.upstreams == ["openrouter", "direct"]
    assert s.record.failed_attempts == f"openrouter:upstream_status:{status}"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_error_status_is_passed_on_without_a_retry(
    kind: str, status: int, autojump_clock: trio.testing.MockClock
):
    answers = ByUpstream(openrouter=status_answer(kind, status), direct=json_answer(kind, "c1"))
    s = setup(primary_with_fallback(), answers)
    call = await request(kind).run(s.gateway)
    assert answers.upstreams == ["openrouter"]
    # As before routing: the gateway's own 502 when the upstream refused its key.
    assert call.status == (502 if status in (401, 403) else status)
    assert served_by(call) == b"kilo/smart; upstream=openrouter"
    assert b"vendor/a" not in call.text  # the public name replaced the upstream's
    assert (s.record.attempts, s.record.failed_attempts) == (1, None)
    assert s.record.error_type is FailureType.UPSTREAM_STATUS


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failure_after_the_first_byte_is_never_retried(
    kind: str, autojump_clock: trio.testing.MockClock
):
    writes: list[BodyStep] = [*stream_writes(kind, "vendor/a")[:3]]
    writes += [1.0, httpx.ReadError("reset")]
    answers = ByUpstream(openrouter=FakeResponse(body=writes), direct=stream_answer(kind, "c1"))
    s = setup(primary_with_fallback(), answers)
    call = await request(kind).run(s.gateway)
    assert call.status == 200
    assert_error_event(kind, call)
    assert models_seen(call) == {SMART}
    assert answers.upstreams == ["openrouter"]
    assert served_by(call) == b"kilo/smart; upstream=openrouter"
    assert s.record.error_type is FailureType.UPSTREAM_RESET
    assert (s.record.attempts, s.record.failed_attempts) == (1, None)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_first_byte_commits_a_stream_that_may_still_retry(
    kind: str, autojump_clock: trio.testing.MockClock
):
    """The client's response start waits for the first upstream bytes, then goes at once."""
    writes = stream_writes(kind, "vendor/a")
    body: list[BodyStep] = [4.0, writes[0], 100.0, *writes[1:]]
    answers = ByUpstream(openrouter=FakeResponse(body=body), direct=stream_answer(kind, "c1"))
    s = setup(primary_with_fallback(), answers)
    async with trio.open_nursery() as nursery:
        call = request(kind)
        nursery.start_soon(call.run, s.gateway)
        await trio.sleep(3.9)
        statuses = [call.status]  # headers came at 0; nothing committed yet
        await trio.sleep(0.2)
        statuses.append(call.status)
    assert statuses == [None, 200]
    assert trio.current_time() == pytest.approx(104)  # past first_byte: committed, no retry
    assert_clean_stream(kind, call, SMART)
    assert answers.upstreams == ["openrouter"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_model_with_one_deployment_commits_at_the_headers_as_before(
    kind: str, autojump_clock: trio.testing.MockClock
):
    """No retry is possible, so nothing waits for the first byte: the stream goes out as it did."""
    answers = ByUpstream(openrouter=FakeResponse(body=[STALL]))
    s = setup([ModelRoute(SMART, "openrouter", "vendor/a")], answers)
    async with trio.open_nursery() as nursery:
        call = request(kind)
        nursery.start_soon(call.run, s.gateway)
        await trio.sleep(0.001)
        assert call.status == 200  # the response start went with the upstream's headers
        call.disconnect()
    assert s.fake.bodies[0].closed_at == pytest.approx(0.001)
    assert (s.record.attempts, s.record.failed_attempts) == (1, None)


# --- cooldowns ----------------------------------------------------------------------------------

# openrouter is all but certain to be chosen first (seeded anyway).
TWO_DEPLOYMENTS = [
    ModelRoute(
        SMART,
        deployments=(
            Deployment("openrouter", "vendor/a", 1000.0),
            Deployment("direct", "a-2025", 0.001),
        ),
    )
]


async def test_a_deployment_cools_down_after_k_failures_in_w_seconds_and_comes_back(
    autojump_clock: trio.testing.MockClock,
):
    routing = Routing(cooldown_failures=2, cooldown_window=10, cooldown_seconds=30)
    answers = ByUpstream(
        openrouter=status_answer("chat", 503), direct=stream_answer("chat", "a-2025")
    )
    s = setup(TWO_DEPLOYMENTS, answers, routing=routing)

    async def at(when: float) -> list[str]:
        await trio.sleep_until(when)
        before = len(answers.asked)
        call = await request("chat").run(s.gateway)
        assert_clean_stream("chat", call, SMART)
        return answers.upstreams[before:]

    assert await at(0) == ["openrouter", "direct"]
    # 11 s later the first failure is out of the window: still one failure.
    assert await at(11) == ["openrouter", "direct"]
    assert await at(15) == ["openrouter", "direct"]  # two within 10 s: cooling until 45
    assert "trio_gateway_deployment_cooldowns_total" in s.gateway.metrics.render()[0].decode()
    assert await at(16) == ["direct"]
    assert await at(44.999) == ["direct"]
    answers.scripts["openrouter"] = stream_answer("chat", "vendor/a")
    assert await at(45) == ["openrouter"]  # back on its own, exactly at the end
    assert await at(46) == ["openrouter"]


async def test_while_every_deployment_cools_down_one_probe_goes_through(
    autojump_clock: trio.testing.MockClock,
):
    routing = Routing(cooldown_failures=1, cooldown_window=10, cooldown_seconds=30)
    slow_503 = status_answer("chat", 503, headers_delay=5.0)
    answers = ByUpstream(
        openrouter=[status_answer("chat", 503), slow_503, stream_answer("chat", "vendor/a")],
        direct=stream_answer("chat", "cheap-1"),
    )
    s = setup(primary_with_fallback(), answers, routing=routing)
    first = await request("chat").run(s.gateway)  # openrouter fails: cooling until 30
    assert models_seen(first) == {CHEAP}
    await trio.sleep_until(1)
    calls = [request("chat"), request("chat")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls[0].run, s.gateway)
        await trio.sleep(0.5)
        nursery.start_soon(calls[1].run, s.gateway)
    # The first was the probe (failed at 6, cooling again until 36, then served by the
    # fallback); the second did not wait for it: straight to the fallback at 1.5.
    assert answers.upstreams[2:] == ["openrouter", "direct", "direct"]
    assert [a.at for a in answers.asked[2:]] == pytest.approx([1, 1.5, 6])
    assert all(models_seen(call) == {CHEAP} for call in calls)
    # A probe that succeeds ends the cooldown at once.
    await trio.sleep_until(7)
    probe = await request("chat").run(s.gateway)
    assert models_seen(probe) == {SMART}
    after = await request("chat").run(s.gateway)
    assert models_seen(after) == {SMART}
    assert answers.upstreams[-2:] == ["openrouter", "openrouter"]


async def test_with_every_deployment_cooling_and_the_probe_out_the_others_get_the_last_error(
    autojump_clock: trio.testing.MockClock,
):
    routing = Routing(cooldown_failures=1, cooldown_window=10, cooldown_seconds=30)
    both = [
        ModelRoute(
            SMART,
            deployments=(Deployment("openrouter", "vendor/a"), Deployment("direct", "a-2025")),
        )
    ]
    answers = ByUpstream(
        openrouter=status_answer("messages", 503, headers_delay=5.0),
        direct=status_answer("messages", 503, headers_delay=5.0),
    )
    s = setup(both, answers, routing=routing)
    first = await request("messages").run(s.gateway)
    assert first.status == 503  # both failed; the last answer was passed on
    assert s.record.attempts == 2
    assert trio.current_time() == pytest.approx(10)  # both cool down until 35 and 40
    calls = [request("messages"), request("messages")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls[0].run, s.gateway)
        await trio.sleep(1)
        nursery.start_soon(calls[1].run, s.gateway)
    probe, refused = calls
    assert probe.status == 503
    assert refused.status == 503
    assert refused.part_times[0] == pytest.approx(11)  # at once, nothing sent upstream
    error = refused.json_body()["error"]
    assert error["type"] == "overloaded_error"
    assert "cooling down" in error["message"]
    assert refused.response_headers[b"retry-after"] == b"24"  # openrouter's ends at 35
    assert b"x-gateway-served-by" not in refused.response_headers
    record = s.sink.records[1]  # the refused one ended first
    assert (record.attempts, record.error_type) == (0, FailureType.UPSTREAM_STATUS)
    assert len(answers.asked) == 3


# --- weighted choice ----------------------------------------------------------------------------

WEIGHTED = [
    ModelRoute(
        SMART,
        deployments=(
            Deployment("openrouter", "vendor/a", 3),
            Deployment("direct", "a-2025", 1),
        ),
    )
]


async def first_choices(seed: int, requests: int) -> list[str]:
    answers = ByUpstream(
        openrouter=json_answer("chat", "vendor/a"), direct=json_answer("chat", "a-2025")
    )
    s = setup(WEIGHTED, answers, seed=seed)
    for _ in range(requests):
        call = await request("chat", stream=False).run(s.gateway)
        assert call.status == 200
    assert [record.attempts for record in s.sink.records] == [1] * requests
    return answers.upstreams


async def test_weighted_choice_follows_the_weights(autojump_clock: trio.testing.MockClock):
    chosen = await first_choices(seed=7, requests=400)
    # Binomial(400, 3/4): mean 300, standard deviation 8.7; five of them either side.
    assert 257 <= chosen.count("openrouter") <= 343
    assert chosen.count("openrouter") + chosen.count("direct") == 400


async def test_weighted_choice_is_a_deterministic_sequence_of_the_seed(
    autojump_clock: trio.testing.MockClock,
):
    chosen = await first_choices(seed=42, requests=20)
    assert chosen == await first_choices(seed=42, requests=20)
    # One draw per request: the point rng.random() * (3 + 1) falls in openrouter's 3.
    rng = random.Random(42)
    expected = ["openrouter" if rng.random() * 4 < 3 else "direct" for _ in range(20)]
    assert chosen == expected
    assert await first_choices(seed=43, requests=20) != chosen


async def test_weighted_choice_skips_what_this_request_already_tried(
    autojump_clock: trio.testing.MockClock,
):
    answers = ByUpstream(openrouter=status_answer("chat", 500), direct=status_answer("chat", 500))
    s = setup(WEIGHTED, answers, seed=3)
    call = await request("chat", stream=False).run(s.gateway)
    assert call.status == 500  # the last answer, passed on
    assert sorted(answers.upstreams) == ["direct", "openrouter"]  # each once: retries = 1
    assert s.record.attempts == 2


# --- fallbacks, retries and the deadline --------------------------------------------------------

CHAIN = [
    ModelRoute("a", "openrouter", "model-a", fallbacks=("b", "c")),
    ModelRoute("b", "direct", "model-b", fallbacks=("d",)),
    ModelRoute("c", "backup", "model-c"),
    ModelRoute("d", "spare", "model-d"),
]


@pytest.mark.parametrize("kind", KINDS)
async def test_fallbacks_are_tried_in_order_depth_first(
    kind: str, autojump_clock: trio.testing.MockClock
):
    failing = status_answer(kind, 503)
    answers = ByUpstream(openrouter=failing, direct=failing, backup=failing, spare=failing)
    s = setup(CHAIN, answers)
    call = await request(kind, "a").run(s.gateway)
    assert [(a.upstream, a.model) for a in answers.asked] == [
        ("openrouter", "model-a"),
        ("direct", "model-b"),
        ("spare", "model-d"),
        ("backup", "model-c"),
    ]
    assert call.status == 503  # the last answer, under its model's public name
    assert served_by(call) == b"c; upstream=backup"
    assert b"model-c" not in call.text
    record = s.record
    assert record.attempts == 4
    assert record.failed_attempts == (
        "openrouter:upstream_status:503;direct:upstream_status:503;"
        "spare:upstream_status:503;backup:upstream_status:503"
    )
    assert (record.upstream, record.upstream_model) == ("backup", "model-c")


async def test_retries_bound_the_attempts_and_a_new_round_starts_over(
    autojump_clock: trio.testing.MockClock,
):
    answers = ByUpstream(
        openrouter=[status_answer("chat", 502)] * 3 + [stream_answer("chat", "vendor/a")],
        direct=status_answer("chat", 502),
    )
    s = setup(primary_with_fallback(retries=3), answers)
    call = await request("chat").run(s.gateway)
    assert answers.upstreams == ["openrouter", "direct", "openrouter", "direct"]
    assert call.status == 502  # four attempts, all failed: the last answer
    s2 = setup(primary_with_fallback(retries=0), ByUpstream(openrouter=status_answer("chat", 502)))
    call = await request("chat").run(s2.gateway)
    assert call.status == 502
    assert s2.answers.upstreams == ["openrouter"]


async def test_the_deadline_holds_across_attempts(autojump_clock: trio.testing.MockClock):
    """Three silent attempts share first_byte; the last is cut exactly at it."""
    silent = FakeResponse(headers_delay=1e6)
    answers = ByUpstream(openrouter=silent, direct=silent, backup=silent)
    models = [
        ModelRoute("a", "openrouter", "model-a", fallbacks=("b", "c")),
        ModelRoute("b", "direct", "model-b"),
        ModelRoute("c", "backup", "model-c"),
    ]
    s = setup(models, answers)
    call = await request("responses", "a").run(s.gateway)
    assert [a.at for a in answers.asked] == pytest.approx([0, 10, 20])
    assert trio.current_time() == pytest.approx(FIRST_BYTE)
    assert call.status == 504
    assert call.json_body()["error"]["code"] == "upstream_timeout"
    assert served_by(call) == b"c; upstream=backup"
    assert s.record.failed_attempts == (
        "openrouter:upstream_timeout;direct:upstream_timeout;backup:upstream_timeout"
    )


async def test_the_last_attempt_gets_all_the_time_left(autojump_clock: trio.testing.MockClock):
    answers = ByUpstream(
        openrouter=status_answer("chat", 503, headers_delay=4.0),
        direct=FakeResponse(body=[STALL]),
    )
    s = setup(primary_with_fallback(), answers)
    call = await request("chat").run(s.gateway)
    # The last attempt commits at its headers (nothing can follow it): its silence is
    # then the idle timer's, as before routing.
    assert call.status == 200
    assert [a.at for a in answers.asked] == pytest.approx([0, 4])
    s2 = setup(
        primary_with_fallback(),
        ByUpstream(
            openrouter=status_answer("chat", 503, headers_delay=4.0),
            direct=FakeResponse(headers_delay=1e6),
        ),
    )
    start = trio.current_time()
    call = await request("chat").run(s2.gateway)
    assert call.status == 504
    assert [a.at - start for a in s2.answers.asked] == pytest.approx([0, 4])
    assert trio.current_time() - start == pytest.approx(FIRST_BYTE)  # not 4 + 30


# --- Retry-After --------------------------------------------------------------------------------

ONE_WITH_A_RETRY = [ModelRoute(SMART, "openrouter", "vendor/a", retries=1)]


async def test_retry_after_shorter_than_the_time_left_is_waited_for(
    autojump_clock: trio.testing.MockClock,
):
    busy = status_answer("chat", 429, extra_headers={"retry-after": "5"})
    answers = ByUpstream(openrouter=[busy, stream_answer("chat", "vendor/a")])
    s = setup(ONE_WITH_A_RETRY, answers)
    call = await request("chat").run(s.gateway)
    assert_clean_stream("chat", call, SMART)
    assert [a.at for a in answers.asked] == pytest.approx([0, 5])
    assert s.fake.bodies[0].closed_at == pytest.approx(0)  # not held while waiting
    assert (s.record.attempts, s.record.failed_attempts) == (2, "openrouter:upstream_status:429")


async def test_retry_after_longer_than_the_time_left_is_passed_on(
    autojump_clock: trio.testing.MockClock,
):
    busy = status_answer("chat", 429, extra_headers={"retry-after": "30"})
    answers = ByUpstream(openrouter=[busy, stream_answer("chat", "vendor/a")])
    s = setup(ONE_WITH_A_RETRY, answers)
    call = await request("chat").run(s.gateway)
    assert call.status == 429
    assert call.response_headers[b"retry-after"] == b"30"
    assert answers.upstreams == ["openrouter"]
    assert trio.current_time() == pytest.approx(0)


async def test_retry_after_does_not_hold_back_another_deployment(
    autojump_clock: trio.testing.MockClock,
):
    busy = status_answer("chat", 429, extra_headers={"retry-after": "20"})
    answers = ByUpstream(openrouter=busy, direct=stream_answer("chat", "cheap-1"))
    s = setup(primary_with_fallback(), answers)
    call = await request("chat").run(s.gateway)
    assert_clean_stream("chat", call, CHEAP)
    assert [a.at for a in answers.asked] == pytest.approx([0, 0])


# --- cancellation -------------------------------------------------------------------------------


async def test_a_client_leaving_during_a_retry_after_wait_stops_the_chain(
    autojump_clock: trio.testing.MockClock,
):
    busy = status_answer("chat", 503, extra_headers={"retry-after": "10"})
    answers = ByUpstream(openrouter=[busy, stream_answer("chat", "vendor/a")])
    s = setup(ONE_WITH_A_RETRY, answers)
    call = request("chat")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, s.gateway)
        await trio.sleep(3)
        call.disconnect()
    assert trio.current_time() == pytest.approx(3)
    await trio.sleep(20)
    assert answers.upstreams == ["openrouter"]  # no further attempt, then or later
    assert s.fake.bodies[0].closed_at == pytest.approx(0)
    assert call.status is None
    record = s.record
    assert record.cancelled
    assert record.error_type is FailureType.CLIENT_DISCONNECT
    assert (record.attempts, record.failed_attempts) == (1, "openrouter:upstream_status:503")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_client_leaving_while_a_stream_has_sent_nothing_closes_it_at_once(
    kind: str, autojump_clock: trio.testing.MockClock
):
    answers = ByUpstream(openrouter=FakeResponse(body=[STALL]), direct=stream_answer(kind, "c1"))
    s = setup(primary_with_fallback(), answers)
    call = request(kind)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, s.gateway)
        await trio.sleep(3)
        call.disconnect()
    await trio.sleep(60)
    assert answers.upstreams == ["openrouter"]
    assert s.fake.bodies[0].closed_at == pytest.approx(3)  # the upstream closed at that instant
    assert call.status is None


async def test_a_client_leaving_during_a_later_attempt_stops_it(
    autojump_clock: trio.testing.MockClock,
):
    answers = ByUpstream(
        openrouter=status_answer("chat", 503), direct=FakeResponse(headers_delay=1e6)
    )
    s = setup(primary_with_fallback(), answers)
    call = request("chat")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, s.gateway)
        await trio.sleep(2)
        call.disconnect()
    assert trio.current_time() == pytest.approx(2)
    assert answers.upstreams == ["openrouter", "direct"]
    assert s.record.cancelled


async def test_a_shutdown_drain_stops_a_waiting_retry_with_503(
    autojump_clock: trio.testing.MockClock,
):
    busy = status_answer("messages", 503, extra_headers={"retry-after": "10"})
    answers = ByUpstream(openrouter=[busy, stream_answer("messages", "vendor/a")])
    s = setup(ONE_WITH_A_RETRY, answers)
    call = request("messages")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call.run, s.gateway)
        await trio.sleep(1)
        await s.gateway.drain(grace=2)
    assert trio.current_time() == pytest.approx(3)
    assert call.status == 503
    assert "shutting down" in call.json_body()["error"]["message"]
    assert served_by(call) == b"kilo/smart; upstream=openrouter"
    assert answers.upstreams == ["openrouter"]
    assert s.record.error_type is FailureType.SHUTDOWN


# --- accounting, the header, limits, metrics ----------------------------------------------------


async def test_the_record_names_the_answering_deployment_and_each_failed_attempt(
    autojump_clock: trio.testing.MockClock,
):
    answers = ByUpstream(
        openrouter=[FakeResponse(headers_delay=1e6), status_answer("chat", 503)],
        direct=[FakeResponse(error=httpx.ConnectError("refused")), json_answer("chat", "c1")],
    )
    models = [
        ModelRoute(SMART, "openrouter", "vendor/a", fallbacks=(CHEAP,), retries=3),
        ModelRoute(CHEAP, "direct", "cheap-1"),
    ]
    s = setup(models, answers)
    call = await request("chat", stream=False).run(s.gateway)
    assert call.status == 200
    assert served_by(call) == b"kilo/cheap; upstream=direct"
    # Two rounds of the chain, in its order; the first attempt had its quarter of 30 s.
    assert [(a.upstream, a.at) for a in answers.asked] == [
        ("openrouter", 0),
        ("direct", 7.5),
        ("openrouter", 7.5),
        ("direct", 7.5),
    ]
    record = s.record
    assert record.attempts == 4
    assert record.failed_attempts == (
        "openrouter:upstream_timeout;direct:upstream_unreachable;openrouter:upstream_status:503"
    )
    assert (record.public_model, record.upstream, record.upstream_model) == (
        SMART,
        "direct",
        "cheap-1",
    )
    assert record.usage.input_tokens is not None
    assert len(s.sink.records) == 1  # one record per client request
    assert b"sk-" not in served_by(call)


async def test_a_gateway_error_after_attempts_names_the_last_deployment(
    autojump_clock: trio.testing.MockClock,
):
    refused = FakeResponse(error=httpx.ConnectError("refused"))
    s = setup(primary_with_fallback(), ByUpstream(openrouter=refused, direct=refused))
    call = await request("chat").run(s.gateway)
    assert call.status == 502
    assert call.json_body()["error"]["code"] == "upstream_unreachable"
    assert served_by(call) == b"kilo/cheap; upstream=direct"
    assert s.record.failed_attempts == "openrouter:upstream_unreachable;direct:upstream_unreachable"


class CountingLimiter:
    def __init__(self) -> None:
        self.admitted = 0
        self.charged: list[int] = []

    async def admit(self, key: KeyEntry) -> float | None:
        self.admitted += 1
        return None

    async def charge(self, key: KeyEntry, tokens: int) -> None:
        self.charged.append(tokens)


async def test_rpm_and_tpm_are_charged_once_per_client_request(
    autojump_clock: trio.testing.MockClock,
):
    answers = ByUpstream(
        openrouter=status_answer("chat", 503), direct=json_answer("chat", "cheap-1")
    )
    key = KeyEntry("limited", hash_key(CLIENT_KEY), rpm=2, tpm=100_000)
    limiter = CountingLimiter()
    gateway = Gateway(
        make_config(primary_with_fallback(), key=key),
        transport=FakeUpstream(answers),
        limiter=limiter,
    )
    call = await request("chat", stream=False).run(gateway)
    assert call.status == 200
    assert len(answers.asked) == 2
    assert limiter.admitted == 1
    assert len(limiter.charged) == 1
    # With the real buckets: two client requests of two attempts each fit in rpm = 2.
    real = Gateway(make_config(primary_with_fallback(), key=key), transport=FakeUpstream(answers))
    statuses = [(await request("chat", stream=False).run(real)).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_metrics_count_attempts_failures_and_cooldowns_per_deployment(
    autojump_clock: trio.testing.MockClock,
):
    routing = Routing(cooldown_failures=1, cooldown_window=10, cooldown_seconds=30)
    answers = ByUpstream(
        openrouter=status_answer("chat", 503), direct=json_answer("chat", "cheap-1")
    )
    s = setup(primary_with_fallback(), answers, routing=routing)
    await request("chat", stream=False).run(s.gateway)
    text = s.gateway.metrics.render()[0].decode()
    for line in (
        'trio_gateway_deployment_attempts_total{model="kilo/smart",upstream="openrouter"} 1.0',
        'trio_gateway_deployment_attempts_total{model="kilo/cheap",upstream="direct"} 1.0',
        'trio_gateway_deployment_failures_total{model="kilo/smart",upstream="openrouter"} 1.0',
        'trio_gateway_deployment_cooldowns_total{model="kilo/smart",upstream="openrouter"} 1.0',
    ):
        assert line in text
    assert 'deployment_failures_total{model="kilo/cheap"' not in text


async def test_the_answering_models_own_cost_rule_applies(
    autojump_clock: trio.testing.MockClock,
):
    """The answering model's rules apply: a paid fallback keeps the cost a free primary drops."""
    models = [
        ModelRoute(SMART, "openrouter", "vendor/a", free=True, fallbacks=(CHEAP,)),
        ModelRoute(CHEAP, "direct", "cheap-1", free=False),
    ]
    answers = ByUpstream(
        openrouter=status_answer("chat", 503), direct=stream_answer("chat", "cheap-1")
    )
    s = setup(models, answers)
    call = await request("chat").run(s.gateway)
    assert_clean_stream("chat", call, CHEAP)
    assert b'"cost"' in call.text


# --- the pure rules -----------------------------------------------------------------------------


def test_chain_of_is_depth_first_each_model_once():
    models = {route.public_name: route for route in CHAIN}
    assert [route.public_name for route in chain_of(models, "a")] == ["a", "b", "d", "c"]
    assert default_retries(chain_of(models, "a")) == 3
    assert default_retries(chain_of(models, "c")) == 0


def test_weighted_pick_draws_once_and_never_for_one_candidate():
    one = [Deployment("u", "m")]
    rng = random.Random(5)
    state = rng.getstate()
    assert weighted_pick(one, rng) is one[0]
    assert rng.getstate() == state
    two = [Deployment("u", "a", 1), Deployment("u", "b", 3)]
    assert weighted_pick(two, random.Random(5)) is two[random.Random(5).random() * 4 >= 1]


def test_cooldowns_count_failures_in_a_sliding_window():
    failure = Failure(FailureType.UPSTREAM_STATUS, "503")
    cooldowns = Cooldowns(failures=3, window=10, seconds=5)
    key = ("u", "m")
    assert not cooldowns.failed(key, failure, 0, probe=False)
    assert not cooldowns.failed(key, failure, 5, probe=False)
    assert not cooldowns.failed(key, failure, 10, probe=False)  # 0 is 10 s old: out
    assert cooldowns.failed(key, failure, 14, probe=False)  # 5, 10, 14
    assert cooldowns.cooling(key, 18.999)
    assert not cooldowns.cooling(key, 19)
    assert not cooldowns.failed(key, failure, 15, probe=False)  # cooling: not lengthened
    assert cooldowns.back_at(key) == 19
    assert cooldowns.failed(key, failure, 20, probe=True)  # a failed probe: 5 s more
    assert cooldowns.back_at(key) == 25
    cooldowns.succeeded(key, probe=True)
    assert not cooldowns.cooling(key, 21)
    off = Cooldowns(failures=0, window=10, seconds=5)
    assert not any(off.failed(key, failure, t, probe=False) for t in range(10))
    assert off.last_failure(key) == failure


def test_a_plan_takes_the_probe_once_and_releases_it():
    route = ModelRoute("m", deployments=(Deployment("u", "a"), Deployment("v", "b")))
    failure = Failure(FailureType.UPSTREAM_TIMEOUT, "slow")
    cooldowns = Cooldowns(failures=1, window=10, seconds=30)
    for key in (("u", "a"), ("v", "b")):
        cooldowns.failed(key, failure, 0, probe=False)
    plan = Plan((route,), 2, cooldowns, random.Random(1), use_cooldowns=True)
    probe = plan.next(1, 30)
    assert probe is not None
    assert probe.probe
    other = Plan((route,), 2, cooldowns, random.Random(1), use_cooldowns=True)
    assert other.next(1, 30) is None  # the probe is out
    assert plan.failed(probe, failure, 2)  # cooling again, from 2
    assert plan.next(3, 30) is None  # one probe per model per request
    assert cooldowns.probe_free("m")


def test_retry_after_is_read_as_seconds_or_a_date():
    assert retry_after_seconds("5", 0) == 5
    assert retry_after_seconds(" 1.5 ", 0) == 1.5
    assert retry_after_seconds(None, 0) is None
    assert retry_after_seconds("-1", 0) is None
    assert retry_after_seconds("soon", 0) is None
    now = 1_700_000_000.0
    assert retry_after_seconds(email.utils.formatdate(now + 7, usegmt=True), now) == 7
    assert retry_after_seconds(email.utils.formatdate(now - 7, usegmt=True), now) == 0


def test_a_route_in_code_is_checked_like_the_file():
    with pytest.raises(ConfigError, match=r"^models\.m\.deployments\[1\]\.weight: expected"):
        ModelRoute("m", deployments=(Deployment("u", "a"), Deployment("u", "b", 0)))
    with pytest.raises(ConfigError, match=r"^models\.m\.retries: expected a whole number"):
        ModelRoute("m", "u", "a", retries=11)
    short = ModelRoute("m", "u", "a")
    assert short.deployments == (Deployment("u", "a", 1.0),)
    listed = ModelRoute("m", deployments=(Deployment("u", "a", 2), Deployment("v", "b")))
    assert (listed.upstream, listed.upstream_model) == ("u", "a")


# --- end to end: the official SDKs, a real hypercorn, two mock providers ------------------------

TIME_LIMIT = 20
E2E_KEY = "routing-e2e-key"
PRIMARY, FALLBACK = "e2e/smart", "e2e/cheap"


@dataclass
class Stack:
    url: str
    sink: ListSink
    failing: MockUpstream


@pytest.fixture
async def stack(nursery: trio.Nursery) -> AsyncIterator[Stack]:
    failing = MockUpstream(Script(status=503), api_key="sk-primary")
    healthy = MockUpstream(script_from_request(Script(tokens=5)), api_key="sk-fallback")
    await nursery.start(failing.serve)
    await nursery.start(healthy.serve)
    config = GatewayConfig(
        upstreams={
            "primary": Upstream("primary", failing.base_url, "sk-primary"),
            "fallback": Upstream("fallback", healthy.base_url, "sk-fallback"),
        },
        models={
            PRIMARY: ModelRoute(PRIMARY, "primary", "vendor/big", fallbacks=(FALLBACK,)),
            FALLBACK: ModelRoute(FALLBACK, "fallback", "vendor/small"),
        },
        keys=(KeyEntry("sdk", hash_key(E2E_KEY)),),
    )
    sink = ListSink()
    url, stop = await start_serving(nursery, Gateway(config, sinks=[sink]))
    yield Stack(url, sink, failing)
    stop.set()


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def test_openai_sdk_sees_one_clean_answer_when_the_primary_fails(stack: Stack):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=E2E_KEY, max_retries=0)

    def chat_stream() -> tuple[str, set[str]]:
        text, models = "", set()
        for chunk in client.chat.completions.create(
            model=PRIMARY, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            models.add(chunk.model)
            for choice in chunk.choices:
                text += choice.delta.content or ""
        return text, models

    def responses_stream() -> str:
        events = client.responses.create(model=PRIMARY, input="hi", stream=True)
        return [event.type for event in events][-1]

    def chat_whole() -> Any:
        return client.chat.completions.with_raw_response.create(
            model=PRIMARY, messages=[{"role": "user", "content": "hi"}]
        )

    try:
        with trio.fail_after(TIME_LIMIT):
            text, models = await in_thread(chat_stream)
            assert text
            assert models == {FALLBACK}
            assert await in_thread(responses_stream) == "response.completed"
            raw = await in_thread(chat_whole)
            assert raw.headers["x-gateway-served-by"] == "e2e/cheap; upstream=fallback"
            assert raw.parse().model == FALLBACK
    finally:
        client.close()
    for count in (1, 2, 3):
        record = await stack.sink.nth(count)
        assert record.attempts == 2
        assert record.failed_attempts == "primary:upstream_status:503"
        assert (record.upstream, record.upstream_model) == ("fallback", "vendor/small")
        assert record.error_type is None
    assert len(stack.failing.requests) == 3


async def test_anthropic_sdk_sees_one_clean_answer_when_the_primary_fails(stack: Stack):
    client = anthropic.Anthropic(base_url=stack.url, api_key=E2E_KEY, max_retries=0)

    def consume() -> tuple[str, str]:
        with client.messages.stream(
            model=PRIMARY, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message().model

    try:
        with trio.fail_after(TIME_LIMIT):
            text, model = await in_thread(consume)
    finally:
        client.close()
    assert text
    assert model == FALLBACK
    record = await stack.sink.nth(1)
    assert (record.attempts, record.failed_attempts) == (2, "primary:upstream_status:503")
