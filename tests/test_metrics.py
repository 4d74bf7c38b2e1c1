"""``GatewayMetrics``: what ``/metrics`` shows for known records and events.

Every check parses the exposition with the official Prometheus parser
(``prometheus_client.parser``) and compares exact values: figures are
chosen as binary-exact floats (0.25, 0.125, ...), so sums compare with
``==``. The ``*_created`` timestamps are left out of the comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import httpx
import prometheus_client
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import BodyStep, FakeBody, sse
from trio_gateway._accounting.metrics import (
    ADDED_LATENCY_BUCKETS,
    LATENCY_BUCKETS,
    GatewayMetrics,
    StoreHealth,
)
from trio_gateway._accounting.usage_store import UsageStore
from trio_gateway._core.config import Timeouts
from trio_gateway._core.kinds import FailureType, Kind
from trio_gateway._core.record import RequestRecord, Usage
from trio_gateway._proxy.pipeline import (
    KEEPALIVE_COMMENT,
    LATENCY_SAMPLE,
    StreamObserver,
    stream_events,
)
from trio_gateway._proxy.upstream import ExchangeControl
from trio_gateway._rewrite.base import PassThroughPolicy, StreamRewriter

Labels = frozenset[tuple[str, str]]

FAMILIES = {
    "trio_gateway_requests": "counter",
    "trio_gateway_active_streams": "gauge",
    "trio_gateway_upstream_open_exchanges": "gauge",
    "trio_gateway_time_to_headers_seconds": "histogram",
    "trio_gateway_time_to_first_token_seconds": "histogram",
    "trio_gateway_request_duration_seconds": "histogram",
    "trio_gateway_input_tokens": "counter",
    "trio_gateway_output_tokens": "counter",
    "trio_gateway_client_cancellations": "counter",
    "trio_gateway_request_failures": "counter",
    "trio_gateway_keepalives": "counter",
    "trio_gateway_added_latency_seconds": "histogram",
    "trio_gateway_rate_limit_store_unavailable": "counter",
    "trio_gateway_deployment_attempts": "counter",
    "trio_gateway_deployment_failures": "counter",
    "trio_gateway_deployment_cooldowns": "counter",
}
# Sample name -> the store attribute it shows.
STORE_SAMPLES = {
    "trio_gateway_usage_records_queued": "queued",
    "trio_gateway_usage_records_written_total": "written",
    "trio_gateway_usage_records_spilled_total": "spilled",
    "trio_gateway_usage_records_dropped_total": "dropped",
    "trio_gateway_usage_write_errors_total": "write_errors",
    "trio_gateway_usage_records_imported_total": "imported",
    "trio_gateway_usage_records_duplicates_total": "duplicates",
    "trio_gateway_usage_records_rejected_total": "rejected",
}
STORE_FAMILIES = {
    name.removesuffix("_total"): "gauge" if name.endswith("_queued") else "counter"
    for name in STORE_SAMPLES
}


def scrape(metrics: GatewayMetrics) -> dict[str, dict[Labels, float]]:
    """Sample name -> labels -> value, from the rendered body, ``*_created`` left out."""
    body, content_type = metrics.render()
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def families(metrics: GatewayMetrics) -> dict[str, str]:
    body, _ = metrics.render()
    return {
        family.name: family.type
        for family in text_string_to_metric_families(body.decode())
        if not family.name.endswith("_created")
    }


def labels(**values: str) -> Labels:
    return frozenset(values.items())


def record(
    kind: Kind,
    model: str,
    status: int | None,
    *,
    started: float = 0.0,
    headers: float | None = None,
    first_token: float | None = None,
    end: float | None = None,
    usage: Usage | None = None,
    cancelled: bool = False,
    error: FailureType | None = None,
) -> RequestRecord:
    return RequestRecord(
        request_id="r",
        kind=kind,
        key_name="team-a",
        public_model=model,
        upstream="up",
        upstream_model="vendor/" + model,
        streamed=first_token is not None,
        started_at=started,
        started_wall=1_700_000_000.0,
        status=status,
        usage=usage or Usage(),
        headers_at=headers,
        first_token_at=first_token,
        ended_at=end,
        cancelled=cancelled,
        error_type=error,
    )


# A known traffic mix: two clean chats, a Messages stream the client left, a
# Responses request whose upstream timed out, and an embeddings request the
# client left before any response started.
CHAT, MESSAGES, RESPONSES, EMBEDDINGS = Kind.CHAT, Kind.MESSAGES, Kind.RESPONSES, Kind.EMBEDDINGS
LEFT, TIMEOUT = FailureType.CLIENT_DISCONNECT, FailureType.UPSTREAM_TIMEOUT
RECORDS = [
    record(CHAT, "m1", 200, started=10.0, headers=10.25, first_token=10.5, end=12.0,
           usage=Usage(input_tokens=100, output_tokens=20, cached_tokens=64)),
    record(CHAT, "m1", 200, headers=0.5, end=1.0, usage=Usage(input_tokens=7, output_tokens=3)),
    record(MESSAGES, "m2", 200, headers=0.125, first_token=0.25, end=0.75,
           usage=Usage(input_tokens=50), cancelled=True, error=LEFT),
    record(RESPONSES, "m1", 502, end=120.0, error=TIMEOUT),
    record(EMBEDDINGS, "m2", None, end=0.0625, cancelled=True, error=LEFT),
]  # fmt: skip


def expected_histogram(
    name: str, by_labels: dict[Labels, list[float]], buckets: tuple[float, ...]
) -> dict[str, dict[Labels, float]]:
    out: dict[str, dict[Labels, float]] = {
        name + "_bucket": {},
        name + "_count": {},
        name + "_sum": {},
    }
    for key, values in by_labels.items():
        for bound in [*buckets, float("inf")]:
            le = "+Inf" if bound == float("inf") else str(bound)
            count = sum(1 for value in values if value <= bound)
            out[name + "_bucket"][key | {("le", le)}] = count
        out[name + "_count"][key] = len(values)
        out[name + "_sum"][key] = sum(values)
    return out


def test_counters_and_histograms_match_the_observed_records_exactly() -> None:
    metrics = GatewayMetrics()
    for item in RECORDS:
        metrics.observe(item)
    got = scrape(metrics)

    chat, messages = labels(kind="chat", model="m1"), labels(kind="messages", model="m2")
    responses, embeddings = (
        labels(kind="responses", model="m1"),
        labels(kind="embeddings", model="m2"),
    )
    assert got["trio_gateway_requests_total"] == {
        labels(kind="chat", model="m1", status="200"): 2,
        labels(kind="messages", model="m2", status="200"): 1,
        labels(kind="responses", model="m1", status="502"): 1,
        labels(kind="embeddings", model="m2", status="none"): 1,
    }
    assert got["trio_gateway_input_tokens_total"] == {chat: 107, messages: 50}
    assert got["trio_gateway_output_tokens_total"] == {chat: 23}
    assert got["trio_gateway_client_cancellations_total"] == {messages: 1, embeddings: 1}
    assert got["trio_gateway_request_failures_total"] == {
        labels(kind="messages", model="m2", type="client_disconnect"): 1,
        labels(kind="responses", model="m1", type="upstream_timeout"): 1,
        labels(kind="embeddings", model="m2", type="client_disconnect"): 1,
    }
    histograms = {
        "trio_gateway_time_to_headers_seconds": {chat: [0.25, 0.5], messages: [0.125]},
        "trio_gateway_time_to_first_token_seconds": {chat: [0.5], messages: [0.25]},
        "trio_gateway_request_duration_seconds": {
            chat: [2.0, 1.0],
            messages: [0.75],
            responses: [120.0],
            embeddings: [0.0625],
        },
    }
    for name, by_labels in histograms.items():
        for sample, values in expected_histogram(name, by_labels, LATENCY_BUCKETS).items():
            assert got[sample] == values, sample
    # Nothing came through the hot path.
    assert got["trio_gateway_keepalives_total"] == {labels(): 0}
    assert got["trio_gateway_added_latency_seconds_count"] == {labels(): 0}


def test_every_metric_is_exposed_with_its_type_and_nothing_else() -> None:
    metrics = GatewayMetrics()
    metrics.observe(RECORDS[2])  # labelled families show up once they have a child
    assert families(metrics) == FAMILIES
    metrics.watch_store(FakeStore())
    assert families(metrics) == FAMILIES | STORE_FAMILIES


def test_missing_or_negative_token_counts_add_nothing() -> None:
    metrics = GatewayMetrics()
    metrics.observe(record(CHAT, "m1", 200, end=1.0, usage=Usage(input_tokens=-5)))
    metrics.observe(record(CHAT, "m1", 200, end=1.0, usage=Usage(output_tokens=0)))
    got = scrape(metrics)
    assert "trio_gateway_input_tokens_total" not in got
    assert "trio_gateway_output_tokens_total" not in got
    assert got["trio_gateway_requests_total"] == {labels(kind="chat", model="m1", status="200"): 2}


def test_label_values_outside_the_known_sets_are_counted_as_other() -> None:
    metrics = GatewayMetrics(models=["m1"])
    metrics.observe(record(CHAT, "m1", 200, end=1.0))
    metrics.observe(record(CHAT, "client-made-this-up", 200, end=1.0))
    # Values no typed caller can make, as an untyped one might.
    smuggled, not_a_failure = cast(Kind, "chat"), cast(FailureType, "not_a_failure_type")
    metrics.observe(record(smuggled, "m1", 999, end=1.0, error=not_a_failure))
    got = scrape(metrics)
    assert got["trio_gateway_requests_total"] == {
        labels(kind="chat", model="m1", status="200"): 1,
        labels(kind="chat", model="other", status="200"): 1,
        labels(kind="other", model="m1", status="other"): 1,
    }
    assert got["trio_gateway_request_failures_total"] == {
        labels(kind="other", model="m1", type="other"): 1
    }


def test_gauges_move_with_started_and_ended() -> None:
    metrics = GatewayMetrics()

    def gauges() -> tuple[float, float]:
        got = scrape(metrics)
        return (
            got["trio_gateway_active_streams"][labels()],
            got["trio_gateway_upstream_open_exchanges"][labels()],
        )

    assert gauges() == (0, 0)
    metrics.exchange_started()
    metrics.exchange_started()
    metrics.stream_started()
    assert gauges() == (1, 2)
    metrics.stream_ended()
    metrics.exchange_ended()
    assert gauges() == (0, 1)
    metrics.exchange_ended()
    assert gauges() == (0, 0)


async def test_gauge_context_managers_end_on_every_way_out() -> None:
    with trio.fail_after(10):  # real clock: an absolute bound (conftest.py rule 3)
        metrics = GatewayMetrics()
        with metrics.open_exchange(), metrics.active_stream():
            got = scrape(metrics)
            assert got["trio_gateway_active_streams"][labels()] == 1
            assert got["trio_gateway_upstream_open_exchanges"][labels()] == 1
        with trio.CancelScope() as scope, metrics.open_exchange(), metrics.active_stream():
            scope.cancel(reason="as a client disconnect would")
            await trio.sleep_forever()
        assert scope.cancelled_caught
        got = scrape(metrics)
        assert got["trio_gateway_active_streams"][labels()] == 0
        assert got["trio_gateway_upstream_open_exchanges"][labels()] == 0


def test_added_latency_histogram_counts_every_call() -> None:
    metrics = GatewayMetrics()
    # Binary-exact values, so the sum compares exactly.
    observed = [2.0**-15, 2.0**-12, 2.0**-12, 2.0**-8, 2.0]
    for value in observed[:3]:
        metrics.chunk_forwarded(value)
    for value in observed[3:]:
        metrics.observe_added_latency(value)
    metrics.keepalive_sent()
    metrics.keepalive_sent()
    got = scrape(metrics)
    name = "trio_gateway_added_latency_seconds"
    expected = expected_histogram(name, {labels(): observed}, ADDED_LATENCY_BUCKETS)
    for sample, values in expected.items():
        assert got[sample] == values, sample
    assert got[name + "_bucket"][labels(le="0.0001")] == 1  # the formula, checked once by hand
    assert got["trio_gateway_keepalives_total"] == {labels(): 2}


class _Body:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.parts.append(data)

    async def end(self, data: bytes) -> None:
        self.parts.append(data)


async def test_the_pipeline_reports_keepalives_and_forwarded_chunks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = GatewayMetrics()
    observer: StreamObserver = metrics  # the pipeline's protocol, checked by mypy
    # Two events 40 s apart with keepalive at 15 s: two keepalives in the gap.
    # Then 18 more, a second apart: 20 sends in all, as none arrived together.
    steps: list[BodyStep] = [*sse("one"), 40.0, *sse("two")]
    for number in range(18):
        steps += [1.0, *sse(f"more {number}")]
    steps += sse("[DONE]")
    response = httpx.Response(200, stream=FakeBody(steps))
    body = _Body()
    rewriter = StreamRewriter(PassThroughPolicy("m1", free=False))
    timeouts = Timeouts(keepalive=15, idle=100)
    result = await stream_events(response, rewriter, body, timeouts, ExchangeControl(), observer)
    assert result.failure is None
    assert body.parts.count(KEEPALIVE_COMMENT) == 2
    got = scrape(metrics)
    assert got["trio_gateway_keepalives_total"] == {labels(): 2}
    assert len(body.parts) == 20 + 2 + 1  # the sends of events, the keepalives, the ending
    # One send in eight reports its latency: the 1st, the 9th and the 17th. Each
    # event was handed over the moment it arrived: the mock clock did not move.
    assert LATENCY_SAMPLE == 8
    assert got["trio_gateway_added_latency_seconds_count"] == {labels(): 3}
    assert got["trio_gateway_added_latency_seconds_sum"] == {labels(): 0.0}


@dataclass
class FakeStore:
    queued: int = 0
    written: int = 0
    spilled: int = 0
    dropped: int = 0
    write_errors: int = 0
    imported: int = 0
    duplicates: int = 0
    rejected: int = 0


def store_health(metrics: GatewayMetrics) -> dict[str, float]:
    """Store attribute -> the value ``/metrics`` shows for it."""
    got = scrape(metrics)
    return {attribute: got[name][labels()] for name, attribute in STORE_SAMPLES.items()}


def test_store_health_is_read_at_scrape_time() -> None:
    metrics = GatewayMetrics()
    assert not set(STORE_FAMILIES) & set(families(metrics))  # no store, no figures
    store = FakeStore(3, 40, 1, 0, 2, 5, 6, 7)
    metrics.watch_store(store)
    assert store_health(metrics) == {
        "queued": 3, "written": 40, "spilled": 1, "dropped": 0,
        "write_errors": 2, "imported": 5, "duplicates": 6, "rejected": 7,
    }  # fmt: skip
    store.queued, store.written, store.dropped, store.rejected = 0, 44, 9, 8
    assert store_health(metrics) == {
        "queued": 0, "written": 44, "spilled": 1, "dropped": 9,
        "write_errors": 2, "imported": 5, "duplicates": 6, "rejected": 8,
    }  # fmt: skip
    metrics.watch_store(None)
    assert not set(STORE_FAMILIES) & set(families(metrics))


async def test_the_usage_store_is_a_store_health() -> None:
    store: StoreHealth = UsageStore(":memory:")  # the protocol, checked by mypy
    metrics = GatewayMetrics()
    metrics.watch_store(store)
    assert store_health(metrics) == dict.fromkeys(STORE_SAMPLES.values(), 0)


def test_two_gateways_keep_separate_metrics() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.observe(RECORDS[0])
    first.keepalive_sent()
    first.stream_started()
    second.watch_store(FakeStore(written=9))
    one, two = scrape(first), scrape(second)
    assert one["trio_gateway_requests_total"] == {labels(kind="chat", model="m1", status="200"): 1}
    assert "trio_gateway_requests_total" not in two
    assert two["trio_gateway_keepalives_total"] == {labels(): 0}
    assert two["trio_gateway_active_streams"] == {labels(): 0}
    assert "trio_gateway_usage_records_written_total" not in one
    assert two["trio_gateway_usage_records_written_total"] == {labels(): 9}
    # Nothing went to the library's global registry.
    global_body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    assert b"trio_gateway_" not in global_body


def test_an_unavailable_rate_limit_store_is_counted_at_scrape_time() -> None:
    class SharedLimiter:
        unavailable = 0

    metrics = GatewayMetrics()
    assert scrape(metrics)["trio_gateway_rate_limit_store_unavailable_total"] == {labels(): 0}
    limiter = SharedLimiter()
    metrics.watch_limiter(limiter)
    limiter.unavailable = 3
    assert scrape(metrics)["trio_gateway_rate_limit_store_unavailable_total"] == {labels(): 3}
