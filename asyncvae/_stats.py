"""Counters and a latency histogram for a :class:`~asyncvae.Client` (``client.stats``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from hdrh.histogram import HdrHistogram

Listener = Callable[[str, "Stats"], None]

#: Latencies are recorded in microseconds, from 1 µs to one hour, 3 significant digits.
_HIST_ARGS = (1, 3_600_000_000, 3)


class Stats:
    """Live figures of one client. Read attributes directly or call :meth:`snapshot`.

    Attributes:
        submitted / completed / failed: items accepted, finished well, finished with an error.
        requests: HTTP attempts sent (a coalesced batch is one request; retries count).
        batches / coalesced: coalesced requests sent, and the items they carried.
        retries: ``Counter`` of retry causes (``http_503``, ``timeout``, ``protocol`` …).
        errors: ``Counter`` of final failure kinds of items.
        bytes_out / bytes_in: request and response body bytes.
        queued / in_flight / inflight_bytes: current values; ``peak_*`` their maxima.
        latency: an ``HdrHistogram`` of item latencies (submit → result) in microseconds.
    """

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.requests = 0
        self.batches = 0
        self.coalesced = 0
        self.retries: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes_out = 0
        self.bytes_in = 0
        self.queued = 0
        self.in_flight = 0
        self.inflight_bytes = 0
        self.peak_queued = 0
        self.peak_in_flight = 0
        self.peak_inflight_bytes = 0
        self.retry_waits: list[float] = []
        self.latency = HdrHistogram(*_HIST_ARGS)
        self._listeners: list[Listener] = []

    # ---- listeners (progress bars)
    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event, stats)`` on ``"completed"``, ``"failed"`` and ``"retry"`` events.

        Listeners run on the client's event loop and must be quick (update a bar)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _emit(self, event: str) -> None:
        for fn in list(self._listeners):
            fn(event, self)

    # ---- recording (client internals)
    def _item_done(self, seconds: float) -> None:
        self.completed += 1
        self.latency.record_value(max(1, int(seconds * 1e6)))
        self._emit("completed")

    def _item_failed(self, kind: str) -> None:
        self.failed += 1
        self.errors[kind] += 1
        self._emit("failed")

    def _retry(self, cause: str, wait: float) -> None:
        self.retries[cause] += 1
        if len(self.retry_waits) < 10_000:
            self.retry_waits.append(wait)
        self._emit("retry")

    def _set(self, name: str, value: int) -> None:
        setattr(self, name, value)
        peak = "peak_" + name
        if value > getattr(self, peak):
            setattr(self, peak, value)

    # ---- reading
    def percentile_ms(self, q: float) -> float:
        """Item latency at percentile ``q`` (0–100), in milliseconds (0 with no data)."""
        if self.latency.get_total_count() == 0:
            return 0.0
        return self.latency.get_value_at_percentile(q) / 1000.0

    def snapshot(self) -> dict[str, Any]:
        """All figures as a JSON-ready dict."""
        return {
            "submitted": self.submitted,
            "completed": self.completed,
            "failed": self.failed,
            "requests": self.requests,
            "batches": self.batches,
            "coalesced": self.coalesced,
            "retries": dict(self.retries),
            "errors": dict(self.errors),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "inflight_bytes": self.inflight_bytes,
            "peak_queued": self.peak_queued,
            "peak_in_flight": self.peak_in_flight,
            "peak_inflight_bytes": self.peak_inflight_bytes,
            "latency_ms": {
                "p50": self.percentile_ms(50),
                "p90": self.percentile_ms(90),
                "p99": self.percentile_ms(99),
                "max": self.latency.get_max_value() / 1000.0 if self.latency.get_total_count() else 0.0,
            },
        }

    def __repr__(self) -> str:
        return (
            f"Stats(completed={self.completed}, failed={self.failed}, requests={self.requests}, "
            f"retries={sum(self.retries.values())}, in_flight={self.in_flight}, queued={self.queued})"
        )
