"""Prometheus metrics of the agent, exposed at GET /metrics.

A private registry (not prometheus_client's global one) so tests and several
agents in one process never share counters. Per-version label children are
looked up once and kept by `VersionMetrics`, because `.labels()` costs more than
the increment itself on the request path.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double the exposition for no use on a device.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

__all__ = ["CONTENT_TYPE", "Metrics", "VersionMetrics"]

# Fixed buckets: the same everywhere, so histograms from devices add up.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class VersionMetrics:
    __slots__ = ("batch_requests", "batch_rows", "errors", "latency", "requests")

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.requests = metrics.requests.labels(model, version)
        self.errors = metrics.errors.labels(model, version)
        self.latency = metrics.latency.labels(model, version)
        self.batch_requests = metrics.batch_requests.labels(model, version)
        self.batch_rows = metrics.batch_rows.labels(model, version)

    def on_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "outpost_inference_requests", "Inference requests answered", ["model", "version"], registry=r
        )
        self.errors = Counter(
            "outpost_inference_errors", "Inference requests that failed", ["model", "version"], registry=r
        )
        self.latency = Histogram(
            "outpost_inference_duration_seconds",
            "Time from a complete request to its response being ready",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "outpost_batch_requests",
            "Requests per onnxruntime call",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "outpost_batch_rows",
            "Rows per onnxruntime call",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.http_responses = Counter(
            "outpost_http_responses", "HTTP responses by status code", ["code"], registry=r
        )
        self.connections = Gauge("outpost_open_connections", "Open client connections", registry=r)
        self.models_ready = Gauge(
            "outpost_model_versions_ready", "Model versions loaded and ready", registry=r
        )
        self._codes = {code: self.http_responses.labels(str(code)) for code in (200, 400, 404, 413, 503)}

    def version(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, model, version)

    def response(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.http_responses.labels(str(code))
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
