"""Prometheus metrics for one gateway, served as ``GET /metrics``. No I/O (but see 6.).

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
   :meth:`GatewayMetrics.chunk_forwarded`), made on the hot path (a
   keepalive each, and one send in eight of each stream, sampled by the
   pipeline): they touch metrics without labels, bound at construction, so
   no label is looked up per call (about 1 µs each).
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
6. **Several worker processes, one gateway.** Under ``[server] workers > 1``
   each worker has its own :class:`GatewayMetrics`, and any of them may
   answer a scrape, so each must report the whole gateway.
   :meth:`GatewayMetrics.share_across_processes` switches one to
   prometheus_client's multiprocess mode, whose files the worker's parent
   keeps in ``PROMETHEUS_MULTIPROC_DIR`` (set before the worker imported
   the library, which makes every value a per-process file of its own).
   The exposition then comes from a ``MultiProcessCollector`` over those
   files: counters and histograms are summed over every worker that ever
   ran (including dead ones, so totals survive a restart), and the two
   live gauges are ``livesum``: the sum over the workers alive now (the
   parent removes a dead worker's live files). Custom collectors cannot
   work across processes, so in this mode the usage store's and the
   rate-limit store's figures are not read at scrape time: each worker
   copies its own into multiprocess metrics of the same names and types
   (:meth:`GatewayMetrics.publish_figures`; a counter goes up by the
   difference since the last copy, ``queued`` is a ``livesum`` gauge). The
   worker that answers a scrape copies its own first; the others copy theirs
   every second, so their store figures may be up to a second old. The
   exposition in this mode reads one small file per worker and metric type
   (the only I/O in this module), and counters carry no ``_created``
   sample. With one process (the default) none of this applies.
"""

from __future__ import annotations

import contextlib
import os
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
from prometheus_client.multiprocess import MultiProcessCollector

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
        """Failed database writes, imports and reconnects."""

    @property
    def imported(self) -> int:
        """Spilled records imported by this process (at start and by the import passes)."""

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
    No method is a checkpoint; none does I/O, except :meth:`render` in
    multiprocess mode, which reads the workers' small files.
    """

    def __init__(
        self,
        models: Collection[str] | None = None,
        deployments: Collection[tuple[str, str]] | None = None,
    ) -> None:
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
        # multiprocess_mode applies only in multiprocess mode (see 6. above).
        self._active_streams = Gauge(
            PREFIX + "active_streams",
            "Event streams now being sent to clients.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._open_exchanges = Gauge(
            PREFIX + "upstream_open_exchanges",
            "Upstream exchanges now open (request sent, answer not finished).",
            registry=r,
            multiprocess_mode="livesum",
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
        self._init_deployments(r, deployments)
        self._shared: _SharedFigures | None = None  # multiprocess mode only

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
        """Bytes were handed to the server ``latency`` seconds after their first chunk arrived.

        The pipeline reports one send in eight of each stream (``LATENCY_SAMPLE``).
        """
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

    # -- routing: per deployment (docs/routing.md) --------------------------------------
    #
    # Labels: ``model`` (the public model whose deployment it is, a fallback's
    # too) and ``upstream`` (the upstream's configured name). Both come from
    # the configuration; with ``deployments`` given, a pair outside it is
    # counted under ("other", "other"), so the series stay bounded.

    def _init_deployments(
        self, r: CollectorRegistry, deployments: Collection[tuple[str, str]] | None
    ) -> None:
        self._deployments = frozenset(deployments) if deployments is not None else None
        labels = ("model", "upstream")
        self._deployment_attempts = Counter(
            PREFIX + "deployment_attempts",
            "Upstream attempts, by public model and upstream (a retry is one more).",
            labels,
            registry=r,
        )
        self._deployment_failures = Counter(
            PREFIX + "deployment_failures",
            "Attempts that failed before the answer was committed, in a way a retry is for "
            "(connect error, reset, first-byte timeout, 429/500/502/503/504/529).",
            labels,
            registry=r,
        )
        self._deployment_cooldowns = Counter(
            PREFIX + "deployment_cooldowns",
            "Cooldowns started: a deployment left out of choice after repeated failures.",
            labels,
            registry=r,
        )

    def _deployment_labels(self, model: str, upstream: str) -> tuple[str, str]:
        known = self._deployments
        if known is not None and (model, upstream) not in known:
            return OTHER, OTHER
        return model, upstream

    def deployment_attempt(self, model: str, upstream: str) -> None:
        """An attempt went to ``model``'s deployment on ``upstream``."""
        self._child(self._deployment_attempts, *self._deployment_labels(model, upstream)).inc()

    def deployment_failure(self, model: str, upstream: str) -> None:
        """That attempt failed before its answer was committed (a retryable failure)."""
        self._child(self._deployment_failures, *self._deployment_labels(model, upstream)).inc()

    def deployment_cooldown(self, model: str, upstream: str) -> None:
        """That failure started the deployment's cooldown."""
        self._child(self._deployment_cooldowns, *self._deployment_labels(model, upstream)).inc()

    # -- exposition --------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The exposition body of every metric, and its content type.

        The Prometheus text format (``prometheus_client.CONTENT_TYPE_LATEST``);
        the usage store's figures are read now. In multiprocess mode, the
        figures of every worker, summed (see 6. in the module docstring).
        """
        shared = self._shared
        if shared is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        shared.publish(self._store.store, self._limiter.limiter)
        return generate_latest(shared.exposition), CONTENT_TYPE_LATEST

    # -- several worker processes ------------------------------------------------------

    def share_across_processes(self, path: str) -> None:
        """Report the whole gateway from now on: the sum over every worker's files in ``path``.

        ``path`` must be ``PROMETHEUS_MULTIPROC_DIR``, set before this process
        imported prometheus_client (else its values are not in files at all:
        RuntimeError). See 6. in the module docstring. Call it once, before
        serving.
        """
        if os.environ.get(_MULTIPROC_VARIABLE) != path:
            raise RuntimeError(f"{_MULTIPROC_VARIABLE} must be {path!r} from the process's start")
        self._shared = _SharedFigures(path)
        self._shared.publish(self._store.store, self._limiter.limiter)

    def publish_figures(self) -> None:
        """Copy the usage store's and the limiter's figures into this worker's files.

        Multiprocess mode only (else it does nothing). A worker calls it every
        second and once more after its store has written everything, so the
        other workers' scrapes see its figures.
        """
        if self._shared is not None:
            self._shared.publish(self._store.store, self._limiter.limiter)


_MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class _SharedFigures:
    """The store's and the limiter's figures as multiprocess metrics, and the exposition.

    The collectors above read objects in this process, which another
    worker's scrape cannot reach. Here the same figures are written as
    metrics whose values live in this process's files, under the same names
    and types: counters go up by what their source gained since the last
    copy; ``queued`` is set, as a ``livesum`` gauge. The store's metrics are
    made on the first copy with a store, so without one they never appear.
    """

    def __init__(self, path: str) -> None:
        self.exposition = CollectorRegistry()
        # prometheus_client leaves its multiprocess module untyped.
        MultiProcessCollector(self.exposition, path=path)  # type: ignore[no-untyped-call]
        self._unavailable = Counter(_LimiterCollector._NAME, _LimiterCollector._DOC, registry=None)
        self._queued: Gauge | None = None
        self._counters: dict[str, Counter] = {}
        self._copied: dict[str, int] = {}

    def publish(self, store: StoreHealth | None, limiter: object) -> None:
        """Copy the figures now. Not a checkpoint."""
        self._add("unavailable", self._unavailable, int(getattr(limiter, "unavailable", 0)))
        if store is None:
            return
        if self._queued is None:
            _, name, doc = _STORE_GAUGE
            self._queued = Gauge(PREFIX + name, doc, registry=None, multiprocess_mode="livesum")
            for attribute, name, doc in _STORE_COUNTERS:
                self._counters[attribute] = Counter(PREFIX + name, doc, registry=None)
        self._queued.set(int(store.queued))
        for attribute, counter in self._counters.items():
            self._add(attribute, counter, int(getattr(store, attribute)))

    def _add(self, attribute: str, counter: Counter, value: int) -> None:
        gained = value - self._copied.get(attribute, 0)
        if gained > 0:
            counter.inc(gained)
            self._copied[attribute] = value


def _status_label(status: int | None) -> str:
    if status is None:
        return NO_STATUS
    if 100 <= status <= 599:
        return str(status)
    return OTHER
