"""Gateway metrics on a per-app Prometheus registry, with bounded labels only."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Labelled:
    """A labelled metric whose children are remembered: `labels()` without the lock and tuple work per call."""

    __slots__ = ("metric", "_children")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class EventHistogram(Collector):
    """A histogram cheap enough for every request and every streamed event: a bucket index and two additions.

    The event loop is the only writer and the only reader (scrapes run on it too), so it needs no lock; a series'
    labels are looked up once per tuple of values, not per observation.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = list(labels)
        self.bounds = buckets
        self._series: dict[tuple[str, ...], EventSeries] = {}

    def labels(self, *values: str) -> EventSeries:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = EventSeries(self.bounds)
        return series

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        bounds = (*(repr(float(b)) for b in self.bounds), "+Inf")
        for values, series in self._series.items():
            running, buckets = 0, []
            for bound, count in zip(bounds, series.counts, strict=True):
                running += count
                buckets.append((bound, running))
            family.add_metric(list(values), buckets, series.total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)


class EventCounter(Collector):
    """A counter for every request's path, without prometheus_client's lock per increment (see EventHistogram)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        # Named as exposed, without "_total": the family adds it.
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.label_names = list(labels)
        self._series: dict[tuple[str, ...], CounterSeries] = {}

    def labels(self, *values: str) -> CounterSeries:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = CounterSeries()
        return series

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, series in self._series.items():
            family.add_metric(list(values), series.value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.label_names)


class CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class EventSeries:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # One count per bucket (not cumulative) and one past the last bound; +Inf is their sum.
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less or equal": the first bound not below the value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The process's own CPU seconds, memory and open files (process_*), read from /proc at each scrape: what the
        # gateway costs the machine it shares with the engines.
        ProcessCollector(registry=r)
        # What every request or streamed event records: collectors of our own, without a lock per observation.
        self.requests = self._loop_counter(
            "gateway_requests_total",
            "Requests answered, by model, key id, route template and status class.",
            ("model", "key", "route", "status_class"),
        )
        self.rate_limited = Labelled(
            Counter(
                "gateway_rate_limited_total",
                "Requests refused by a key's limit, by limit.",
                ["model", "key", "limit"],
                registry=r,
            )
        )
        self.retries = Labelled(
            Counter(
                "gateway_retries_total",
                "Requests retried on another endpoint before the first byte.",
                ["model"],
                registry=r,
            )
        )
        self.ejections = Labelled(
            Counter(
                "gateway_endpoint_ejections_total",
                "Endpoints ejected after consecutive failures.",
                ["model"],
                registry=r,
            )
        )
        self.itl = self._loop_histogram(
            "gateway_inter_token_latency_seconds",
            "Gaps between consecutive content events of a stream, as sent to the client.",
            ("model",),
            ITL_BUCKETS,
        )
        self.errors = Labelled(
            Counter(
                "gateway_errors_total",
                "Requests that failed, by model and reason.",
                ["model", "reason"],
                registry=r,
            )
        )
        self.duration = self._loop_histogram(
            "gateway_request_duration_seconds",
            "End-to-end request duration (to the last byte of a stream).",
            ("model", "route"),
            LATENCY_BUCKETS,
        )
        self.ttft = self._loop_histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request arrival to the first generated content sent to the client.",
            ("model",),
            TTFT_BUCKETS,
        )
        self.overhead = self._loop_histogram(
            "gateway_overhead_seconds",
            "Time spent in the gateway before the upstream request is sent.",
            ("model",),
            OVERHEAD_BUCKETS,
        )
        self.prompt_tokens = self._loop_counter(
            "gateway_prompt_tokens_total", "Prompt tokens, from the engine's usage.", ("model",)
        )
        self.completion_tokens = self._loop_counter(
            "gateway_completion_tokens_total", "Completion tokens, from the engine's usage.", ("model",)
        )
        self.queue_wait = self._loop_histogram(
            "gateway_queue_wait_seconds",
            "Time a request waited in the gateway's queue for an engine, by model and class.",
            ("model", "class"),
            LATENCY_BUCKETS,
        )
        self.served_tokens = self._loop_counter(
            "gateway_served_tokens_total",
            "Prompt plus completion tokens served, by model and key: what the fair share counts.",
            ("model", "key"),
        )
        self.health_check_errors = Counter(
            "gateway_health_check_errors_total",
            "Health checks that failed for a reason other than the engine's answer (the loop goes on).",
            registry=r,
        )
        self.keys_reload_errors = Counter(
            "gateway_keys_reload_errors_total",
            "Versions of the keys file refused (broken, unreadable, deleted); the last good keys stay in force.",
            registry=r,
        )

    def _loop_histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> EventHistogram:
        histogram = EventHistogram(name, documentation, labels, buckets)
        self.registry.register(histogram)
        return histogram

    def _loop_counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> EventCounter:
        counter = EventCounter(name, documentation, labels)
        self.registry.register(counter)
        return counter

    def watch_http(self, stats: Any) -> None:
        """The HTTP server's connections and its own refusals (http_protocol.ConnectionStats), read at scrape time."""
        self.registry.register(_HttpCollector(stats))

    def watch_pools(self, pools: Callable[[], Iterable[Any]], queues: Callable[[], Iterable[Any]]) -> None:
        """Endpoint and queue gauges read from the pools and schedulers at scrape time: never counted twice."""
        self.registry.register(_PoolCollector(pools, queues))


class _PoolCollector(Collector):
    def __init__(self, pools: Callable[[], Iterable[Any]], queues: Callable[[], Iterable[Any]]) -> None:
        self.pools = pools
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inflight = GaugeMetricFamily(
            "gateway_inflight_requests",
            "Requests holding an endpoint, by model and endpoint.",
            labels=["model", "endpoint"],
        )
        up = GaugeMetricFamily(
            "gateway_endpoint_up", "1 when the engine endpoint passes its health check.", labels=["model", "endpoint"]
        )
        for pool in self.pools():
            for ep in pool.endpoints:
                inflight.add_metric([pool.model, ep.url], ep.outstanding)
                up.add_metric([pool.model, ep.url], 1 if ep.healthy else 0)
        yield inflight
        yield up
        depth = GaugeMetricFamily(
            "gateway_queue_depth",
            "Requests waiting in the gateway for an engine, by model and class.",
            labels=["model", "class"],
        )
        for scheduler in self.queues():
            for klass, waiting in scheduler.depth().items():
                depth.add_metric([scheduler.pool.model, klass], waiting)
        yield depth

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Described without reading the pools, so registering it does not collect.
        return iter(())


class _HttpCollector(Collector):
    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_http_connections",
            "Client connections the HTTP server holds (under max_connections).",
            value=self.stats.admitted,
        )
        refused = CounterMetricFamily(
            "gateway_http_refused",
            "Requests the HTTP server answered itself before the app (431, 408, 503 past the cap), by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
