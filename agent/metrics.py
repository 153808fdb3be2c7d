"""Prometheus metrics of the agent, exposed at GET /metrics.

The request path only adds to plain Python numbers kept per model version; a
collector turns them into metric families when /metrics is scraped, and
prometheus_client writes the exposition format. Per request this costs a few
additions instead of eight lock round-trips through prometheus_client's
counters. Every update and every scrape happens on the event loop thread, so
the numbers need no lock.

Histogram buckets are fixed, the same on every device, so fleets can add them up.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

# prometheus_client (and the wsgiref, http.server and friends it imports) costs
# about 4 MB of RSS; it is imported on the first scrape, not at start-up, so a
# device nobody scrapes does not pay for it.

__all__ = ["Metrics", "VersionMetrics"]

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class VersionMetrics:
    """Counters of one loaded model version."""

    __slots__ = ("batch_requests", "batch_rows", "errors", "labels", "latency", "requests")

    def __init__(self, model: str, version: str) -> None:
        self.labels = [model, version]
        self.requests = 0
        self.errors = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch_requests = _Histogram(BATCH_BUCKETS)
        self.batch_rows = _Histogram(BATCH_BUCKETS)

    def answered(self, seconds: float) -> None:
        self.requests += 1
        self.latency.observe(seconds)

    def failed(self) -> None:
        self.errors += 1

    def on_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)


class _AgentCollector:
    """A prometheus_client collector (duck-typed: it only needs `collect`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self._m
        versions = list(m.versions.values())
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "outpost_inference_requests", "Inference requests answered", labels=labels
        )
        errors = CounterMetricFamily(
            "outpost_inference_errors", "Inference requests that failed", labels=labels
        )
        latency = HistogramMetricFamily(
            "outpost_inference_duration_seconds",
            "Time from a complete request to its response being ready",
            labels=labels,
        )
        batch_requests = HistogramMetricFamily(
            "outpost_batch_requests", "Requests per onnxruntime call", labels=labels
        )
        batch_rows = HistogramMetricFamily("outpost_batch_rows", "Rows per onnxruntime call", labels=labels)
        for vm in versions:
            requests.add_metric(vm.labels, vm.requests)
            errors.add_metric(vm.labels, vm.errors)
            for family, hist in (
                (latency, vm.latency),
                (batch_requests, vm.batch_requests),
                (batch_rows, vm.batch_rows),
            ):
                family.add_metric(vm.labels, hist.buckets(), hist.sum)
        yield from (requests, errors, latency, batch_requests, batch_rows)
        responses = CounterMetricFamily(
            "outpost_http_responses", "HTTP responses by status code", labels=["code"]
        )
        for code, count in sorted(m.responses.items()):
            responses.add_metric([str(code)], count)
        yield responses
        yield GaugeMetricFamily("outpost_open_connections", "Open client connections", value=m.connections())
        yield GaugeMetricFamily(
            "outpost_model_versions_ready", "Model versions loaded and ready", value=m.models_ready
        )
        for extra in m.collectors:
            yield from extra()
        if m.update_state is not None:
            transitions = CounterMetricFamily(
                "outpost_update_transitions",
                "Update life-cycle transitions, by the event that caused them",
                labels=["event"],
            )
            for event, count in sorted(m.update_events.items()):
                transitions.add_metric([event], count)
            yield transitions
            state = GaugeMetricFamily(
                "outpost_update_state",
                "The update life cycle's state (1 for the current one)",
                labels=["state"],
            )
            state.add_metric([m.update_state], 1)
            yield state


class Metrics:
    def __init__(self, connections: Callable[[], int] = lambda: 0) -> None:
        self.versions: dict[tuple[str, str], VersionMetrics] = {}
        self.responses: dict[int, int] = {}
        self.models_ready = 0
        self.connections = connections
        # Set by the updater when a hub is configured.
        self.update_state: str | None = None
        self.update_events: dict[str, int] = {}
        # More metric families, from parts that are optional (inference over MQTT); each is called
        # at a scrape, after prometheus_client was imported.
        self.collectors: list[Callable[[], Iterable[Metric]]] = []
        self._registry: CollectorRegistry | None = None

    def version(self, model: str, version: str) -> VersionMetrics:
        """The counters of a version; the same object again if it is loaded again."""
        key = (model, version)
        vm = self.versions.get(key)
        if vm is None:
            vm = self.versions[key] = VersionMetrics(model, version)
        return vm

    def response(self, code: int) -> None:
        responses = self.responses
        responses[code] = responses.get(code, 0) + 1

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            # A private registry (not prometheus_client's global one) so that
            # several agents in one process (tests) never share numbers.
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_AgentCollector(self))
        return generate_latest(self._registry), CONTENT_TYPE_LATEST
