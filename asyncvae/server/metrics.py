"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so
that several servers in one process (tests, notebooks) never share or clash.

=========================================  =========  =============================================
metric                                     type       labels / meaning
=========================================  =========  =============================================
``asyncvae_requests_total``                counter    ``op`` (decode, encode, other), ``status``
``asyncvae_request_duration_seconds``      histogram  ``op``: arrival → answer handed to the socket
``asyncvae_batch_size``                    histogram  requests per forward pass
``asyncvae_batch_items``                   histogram  items (leading dims summed) per forward pass
``asyncvae_model_compute_seconds``         histogram  ``fn`` (decode, decode_video, encode, ...)
``asyncvae_queue_depth``                   gauge      requests admitted, not yet computing
``asyncvae_in_flight``                     gauge      decode/encode requests being handled
``asyncvae_in_service``                    gauge      requests in a running batch
``asyncvae_model_ready``                   gauge      1 once the model is loaded (0 while draining)
=========================================  =========  =============================================
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """The server's metrics; gauges read their value from ``gauges`` at scrape time."""

    def __init__(self, gauges: dict[str, Callable[[], float]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "asyncvae_requests", "HTTP requests answered, by operation and status",
            ["op", "status"], registry=r,
        )
        self.latency = Histogram(
            "asyncvae_request_duration_seconds",
            "Time from a request's arrival to its answer, by operation",
            ["op"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "asyncvae_batch_size", "Requests computed in one forward pass",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_items = Histogram(
            "asyncvae_batch_items", "Items (leading dimensions summed) in one forward pass",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "asyncvae_model_compute_seconds",
            "Time a batch spent in the model's forward pass, by model method",
            ["fn"], buckets=LATENCY_BUCKETS, registry=r,
        )
        docs = {
            "queue_depth": "Requests admitted and not yet computing (including those sending their body)",
            "in_flight": "Decode/encode requests being handled",
            "in_service": "Requests in a running batch",
            "model_ready": "1 once the model is loaded and the server is not draining",
        }
        for name, doc in docs.items():
            Gauge(f"asyncvae_{name}", doc, registry=r).set_function(gauges[name])

    def observe_request(self, op: str, status: int, seconds: float | None) -> None:
        """Count one answer (and its latency for decode/encode)."""
        self.requests.labels(op, str(status)).inc()
        if seconds is not None:
            self.latency.labels(op).observe(seconds)

    def observe_batch(self, fn: str, requests: int, items: int, seconds: float) -> None:
        """Record one batch that ran through the model."""
        self.batch_size.observe(requests)
        self.batch_items.observe(items)
        self.compute.labels(fn).observe(seconds)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
