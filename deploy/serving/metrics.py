"""Prometheus metrics of the server: queue time, batch sizes, latency, rejections.

Each app owns its registry (no module-level metric objects), so tests and several apps in one
process do not collide. Quantiles (p50/p99) come from the histograms with `histogram_quantile`.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deploy.serving.batcher import BatchReport

SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_seconds = Histogram("moeworks_queue_seconds", "time a request waited in the batch queue",
                                       buckets=SECONDS, registry=r)
        self.batch_rows = Histogram("moeworks_batch_rows", "rows per forward pass", buckets=ROWS, registry=r)
        self.batch_seconds = Histogram("moeworks_batch_compute_seconds", "seconds per forward pass",
                                       buckets=SECONDS, registry=r)
        self.latency = Histogram("moeworks_request_latency_seconds", "request latency, receipt to answer",
                                 buckets=SECONDS, registry=r)
        self.requests = Counter("moeworks_requests", "requests answered, by outcome", ["outcome"], registry=r)
        # Every answer of every route by HTTP status, 4xx, 5xx and unhandled errors included.
        self.responses = Counter("moeworks_http_responses", "HTTP answers by route and status", ["route", "status"],
                                 registry=r)
        self.rejected = Counter("moeworks_requests_rejected", "requests refused, by reason", ["reason"], registry=r)
        self.batch_limit = Gauge("moeworks_batch_limit", "current adaptive batch size limit", registry=r)

    def observe_batch(self, report: BatchReport) -> None:
        self.batch_rows.observe(report.rows)
        self.batch_seconds.observe(report.compute_seconds)
        self.batch_limit.set(report.limit)
        for seconds in report.queue_seconds:
            self.queue_seconds.observe(seconds)

    def expired(self, count: int) -> None:
        self.rejected.labels(reason="deadline").inc(count)

    def exposition(self) -> bytes:
        """The text format; under gunicorn with PROMETHEUS_MULTIPROC_DIR set, all workers' metrics."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
