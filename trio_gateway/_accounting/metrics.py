"""Prometheus metrics for one gateway, served as ``GET /metrics``. No I/O.

Theory of operation
===================

1. **One registry per gateway.** :class:`GatewayMetrics` registers its
   metrics in its own :class:`prometheus_client.CollectorRegistry`, never the
   library's global one, so several gateways in one process (the test suite)
   neither clash nor share figures. :meth:`GatewayMetrics.render` produces
   the text exposition from that registry alone.
2. **Finished records feed most figures.** :meth:`GatewayMetrics.observe`
   takes one finished :class:`~trio_gateway._core.record.RequestRecord` and
   updates everything a record can tell: requests by kind/model/status, the
   three latency histograms, tokens, cancellations and failures. It is called
   once per request, so its label look-ups cost nothing that matters.
3. **Live figures come from the exchange as it goes.** Active streams and
   open upstream exchanges are gauges moved by ``*_started``/``*_ended`` (or
   the ``with`` forms, which also end on cancellation). Keepalives and the
   gateway's own added latency come through the
   :class:`~trio_gateway._proxy.pipeline.StreamObserver` calls
   (:meth:`GatewayMetrics.keepalive_sent`,
   :meth:`GatewayMetrics.chunk_forwarded`), made per send on the hot path:
   they touch metrics without labels, bound at construction, so no label
   is looked up per call (about 1 µs each).
4. **The usage store's health is read at scrape time.** A collector reads
   the store's counters (:class:`StoreHealth`) when ``/metrics`` is rendered,
   so the figures are never stale and the store never calls into metrics.
5. **Label values are bounded.** ``kind`` is the label of a
   :class:`~trio_gateway._core.kinds.Kind`, ``type`` the value of a
   :class:`~trio_gateway._core.kinds.FailureType` and ``status`` an HTTP
   status. ``model`` is the public model name, the only label that starts
   as client data; a record exists only after that name was found in the
   configuration, so unknown values cannot occur. Even so, a value outside
   the known sets (from an untyped caller, say) is counted under
   ``"other"`` (for ``model``, when the configured names are given), so no
   client can grow the number of series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from trio_gateway._core.kinds import FailureType, Kind
from trio_gateway._core.record import RequestRecord

__all__ = [
    "ADDED_LATENCY_BUCKETS",
    "LATENCY_BUCKETS",
    "OTHER",
    "GatewayMetrics",
    "StoreHealth",
]

PREFIX = "trio_gateway_"
OTHER = "other"  # the label value for anything outside the known sets
NO_STATUS = "none"  # the status label of a request that never got a response start

# Seconds, for LLM traffic: from a cached embedding (a few ms) to a long
# reasoning answer (minutes); anything longer falls in +Inf.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# Seconds the gateway holds a chunk: normally microseconds; the upper buckets
# show a slow client holding the writer back (backpressure).
ADDED_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

# Label values by member; anything else (None included) is OTHER.
_KIND_LABELS: dict[object, str] = {kind: kind.label for kind in Kind}
_FAILURE_LABELS: dict[object, str] = {failure: failure.value for failure in FailureType}


class StoreHealth(Protocol):
    """What the usage store reports about itself; read at every scrape.

    :class:`~trio_gateway._accounting.usage_store.UsageStore` satisfies it; plain
    attributes do too. All but ``queued`` count records since start.
    """

    @property
    def queued(self) -> int:
        """Records waiting to be written, now (goes up and down)."""

    @property
    def written(self) -> int:
        """Records written to the database."""

    @property
    def spilled(self) -> int:
        """Records appended to the spill file instead (database slow or failing)."""

    @property
    def dropped(self) -> int:
        """Records that could be neither written nor spilled (logged instead)."""

    @property
    def write_errors(self) -> int:
        """Failed database writes."""

    @property
    def imported(self) -> int:
        """Spilled records imported into the database at a later start."""

    @property
    def duplicates(self) -> int:
        """Records that were already in the database (stored once)."""

    @property
    def rejected(self) -> int:
        """Spilled lines that could not be imported (kept aside for a person)."""


# (attribute, metric name, help): the usage store's figures. "queued" is a
# gauge; the rest only grow, so they are counters.
_STORE_GAUGE = ("queued", "usage_records_queued", "Usage records waiting to be written now.")
_STORE_COUNTERS = (
    ("written", "usage_records_written", "Usage records written to the database."),
    ("spilled", "usage_records_spilled", "Usage records appended to the spill file instead."),
    ("dropped", "usage_records_dropped", "Usage records neither written nor spilled (logged)."),
    ("write_errors", "usage_write_errors", "Failed writes to the usage database."),
    ("imported", "usage_records_imported", "Spilled usage records imported at a later start."),
    ("duplicates", "usage_records_duplicates", "Usage records already in the database."),
    ("rejected", "usage_records_rejected", "Spilled lines that could not be imported."),
)


class _StoreCollector:
    """Reads a :class:`StoreHealth` when the registry is collected; nothing if none is set."""

    def __init__(self) -> None:
        self.store: StoreHealth | None = None

    def describe(self) -> Iterable[Metric]:
        # The names, for the registry's clash check; no store is read here.
        return self._families(lambda _: 0)

    def collect(self) -> Iterable[Metric]:
        store = self.store
        if store is None:
            return []
        return self._families(lambda attribute: int(getattr(store, attribute)))

    @staticmethod
    def _families(read: Callable[[str], int]) -> list[Metric]:
        attribute, name, doc = _STORE_GAUGE
        families: list[Metric] = [GaugeMetricFamily(PREFIX + name, doc, value=read(attribute))]
        families.extend(
            CounterMetricFamily(PREFIX + name, doc, value=read(attribute))
            for attribute, name, doc in _STORE_COUNTERS
        )
        return families


class _LimiterCollector:
    """Reads a shared rate-limit store's ``unavailable`` count when the registry is collected.

    A limiter without the attribute (the in-memory one never fails) reads 0.
    """

    _NAME = PREFIX + "rate_limit_store_unavailable"
    _DOC = "Rate-limit store calls that failed or ran out of time (fail_open admits them)."

    def __init__(self) -> None:
        self.limiter: object = None

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._NAME, self._DOC, value=0)]

    def collect(self) -> Iterable[Metric]:
        value = int(getattr(self.limiter, "unavailable", 0))
        return [CounterMetricFamily(self._NAME, self._DOC, value=value)]


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of their own.

    ``models``, when given, is the set of configured public model names;
    a record naming any other model is counted under ``"other"``. Without
    it the public model name is used as is (the caller has validated it).
    No method does I/O or is a checkpoint.
    """

    def __init__(self, models: Collection[str] | None = None) -> None:
        self._models = frozenset(models) if models is not None else None
        self.registry = CollectorRegistry()
        r = self.registry
        by_model = ("kind", "model")
        self._requests = Counter(
            PREFIX + "requests",
            "Finished requests, by API kind, public model and HTTP status "
            '("none": the client left before a response started).',
            ("kind", "model", "status"),
            registry=r,
        )
        self._active_streams = Gauge(
            PREFIX + "active_streams", "Event streams now being sent to clients.", registry=r
        )
        self._open_exchanges = Gauge(
            PREFIX + "upstream_open_exchanges",
            "Upstream exchanges now open (request sent, answer not finished).",
            registry=r,
        )
        self._time_to_headers = Histogram(
            PREFIX + "time_to_headers_seconds",
            "Seconds from routing a request to the upstream's response headers.",
            by_model,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self._time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from routing a request to its first content token going to the client.",
            by_model,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self._duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Seconds from routing a request to its end, however it ended.",
            by_model,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self._input_tokens = Counter(
            PREFIX + "input_tokens",
            "Input (prompt) tokens the upstream reported.",
            by_model,
            registry=r,
        )
        self._output_tokens = Counter(
            PREFIX + "output_tokens",
            "Output (completion) tokens the upstream reported.",
            by_model,
            registry=r,
        )
        self._cancellations = Counter(
            PREFIX + "client_cancellations",
            "Requests whose client disconnected before the end.",
            by_model,
            registry=r,
        )
        self._failures = Counter(
            PREFIX + "request_failures",
            "Requests that did not complete, by failure type (upstream_*, idle_timeout, "
            "rewrite_error and shutdown on the gateway's side; client_* on the client's).",
            ("kind", "model", "type"),
            registry=r,
        )
        self._keepalives = Counter(
            PREFIX + "keepalives", "Keepalive comments sent to streaming clients.", registry=r
        )
        self._added_latency = Histogram(
            PREFIX + "added_latency_seconds",
            "Seconds from an upstream chunk's arrival to its rewritten bytes being handed "
            "to the server for the client: the gateway's own delay, per send.",
            registry=r,
            buckets=ADDED_LATENCY_BUCKETS,
        )
        # Each metric's children by label values: bounded, as the labels are.
        self._children: dict[tuple[object, ...], Any] = {}
        self._store = _StoreCollector()
        r.register(self._store)
        self._limiter = _LimiterCollector()
        r.register(self._limiter)

    # -- the usage store -------------------------------------------------------------

    def watch_store(self, store: StoreHealth | None) -> None:
        """Report ``store``'s health from the next scrape on (None: stop reporting it)."""
        self._store.store = store

    def watch_limiter(self, limiter: object) -> None:
        """Report how often ``limiter``'s shared store was unavailable, from the next scrape on."""
        self._limiter.limiter = limiter

    # -- live gauges -------------------------------------------------------------------

    def stream_started(self) -> None:
        """An event stream to a client began (after its response start was sent)."""
        self._active_streams.inc()

    def stream_ended(self) -> None:
        """An event stream to a client ended, however it ended."""
        self._active_streams.dec()

    def exchange_started(self) -> None:
        """An upstream exchange opened (just before the request goes upstream)."""
        self._open_exchanges.inc()

    def exchange_ended(self) -> None:
        """An upstream exchange finished and its response is closed, however it ended."""
        self._open_exchanges.dec()

    @contextlib.contextmanager
    def active_stream(self) -> Iterator[None]:
        """The body is one active stream: started on entry, ended on every way out."""
        self.stream_started()
        try:
            yield
        finally:
            self.stream_ended()

    @contextlib.contextmanager
    def open_exchange(self) -> Iterator[None]:
        """The body is one open upstream exchange: started on entry, ended on every way out."""
        self.exchange_started()
        try:
            yield
        finally:
            self.exchange_ended()

    # -- the hot path (StreamObserver) ------------------------------------------------

    def keepalive_sent(self) -> None:
        """A keepalive comment went to a client."""
        self._keepalives.inc()

    def chunk_forwarded(self, latency: float) -> None:
        """Bytes were handed to the server ``latency`` seconds after their first chunk arrived."""
        self._added_latency.observe(latency)

    def observe_added_latency(self, seconds: float) -> None:
        """The same as :meth:`chunk_forwarded`."""
        self._added_latency.observe(seconds)

    # -- finished records ------------------------------------------------------------

    def refused(self, kind: Kind | None, status: int) -> None:
        """Count a request answered before routing (bad key, unknown model, ...).

        Such a request has no record; it is counted with the model label
        ``"none"``, so a flood of refusals is visible. ``kind`` is None for a
        path that is not one of the API routes (counted as ``"other"``).
        """
        kind_label = _KIND_LABELS.get(kind, OTHER)
        self._requests.labels(kind_label, "none", _status_label(status)).inc()

    def observe(self, record: RequestRecord) -> None:
        """Count one finished record. Call it once per request, however it ended.

        Updates the request counter; each latency histogram the record has
        a figure for; the token counters by the reported counts (a missing
        or negative count adds nothing); the cancellation counter if the
        client left; and the failure counter if ``error_type`` is set.
        """
        kind = _KIND_LABELS.get(record.kind, OTHER)
        model = record.public_model
        if self._models is not None and model not in self._models:
            model = OTHER
        status = _status_label(record.status)
        child = self._child
        child(self._requests, kind, model, status).inc()
        if (seconds := record.time_to_headers) is not None:
            child(self._time_to_headers, kind, model).observe(seconds)
        if (seconds := record.time_to_first_token) is not None:
            child(self._time_to_first_token, kind, model).observe(seconds)
        if (seconds := record.duration) is not None:
            child(self._duration, kind, model).observe(seconds)
        usage = record.usage
        if usage.input_tokens is not None and usage.input_tokens > 0:
            child(self._input_tokens, kind, model).inc(usage.input_tokens)
        if usage.output_tokens is not None and usage.output_tokens > 0:
            child(self._output_tokens, kind, model).inc(usage.output_tokens)
        if record.cancelled:
            child(self._cancellations, kind, model).inc()
        if record.error_type is not None:
            failure = _FAILURE_LABELS.get(record.error_type, OTHER)
            child(self._failures, kind, model, failure).inc()

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set (a lookup costs more
        than the update); a series still appears only once it is first updated."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    # -- exposition --------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The exposition body of every metric, and its content type.

        The Prometheus text format (``prometheus_client.CONTENT_TYPE_LATEST``);
        the usage store's figures are read now.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _status_label(status: int | None) -> str:
    if status is None:
        return NO_STATUS
    if 100 <= status <= 599:
        return str(status)
    return OTHER
