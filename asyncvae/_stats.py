"""Counters and a latency histogram for a :class:`~asyncvae.Client` (``client.stats``).

Recording is on the hot path of every item, so it is cheap: counters are plain ints,
latencies are appended to an array and folded into the HdrHistogram in bulk (numpy
groups them by histogram bucket first), and listeners are only called when there are
any. A listener that raises is logged and keeps its place; it never reaches the engine.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

Listener = Callable[[str, "Stats"], None]

log = logging.getLogger("asyncvae")

#: Latencies are recorded in microseconds, from 1 µs to one hour, 3 significant digits.
_HIST_ARGS = (1, 3_600_000_000, 3)
#: 3 significant digits: values share a histogram slot below 2**11 distinct mantissas.
_SUB_BUCKET_BITS = 11
#: Latencies waiting to be folded into the histogram.
_FOLD_AT = 4096


class Stats:
    """Live figures of one client. Read attributes directly or call :meth:`snapshot`.

    Attributes:
        submitted / completed / failed: items accepted, finished well, finished with an error.
        requests: HTTP attempts sent (a coalesced batch is one request; retries count).
        batches / coalesced: coalesced requests sent, and the items they carried.
        retries: ``Counter`` of retry causes, in :func:`asyncvae.errors.error_kind`'s
            words (``http_503``, ``timeout``, ``protocol`` …).
        errors: ``Counter`` of final failure kinds of items (same words).
        bytes_out / bytes_in: request and response body bytes.
        queued / in_flight / inflight_bytes: items waiting for a request slot, items in
            flight, response bytes reserved in the byte budget; ``peak_*`` their maxima.
        latency: an ``HdrHistogram`` of item latencies (submit → result) in microseconds.
        listener_errors: exceptions raised by listeners (logged, then ignored).
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
        self.listener_errors = 0
        self._pending = array("q")
        self._hist = HdrHistogram(*_HIST_ARGS)
        self._listeners: list[Listener] = []

    # ---- listeners (progress bars)
    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event, stats)`` on ``"completed"``, ``"failed"`` and ``"retry"`` events.

        Listeners run on the client's event loop and must be quick (update a bar). One
        that raises is logged (``logging.getLogger("asyncvae")``) and left in place; the
        request it was told about is not affected."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _emit(self, event: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, self)
            except Exception:
                self.listener_errors += 1
                if self.listener_errors <= 3:
                    log.exception("asyncvae: a Stats listener raised on %r (ignored)", event)

    # ---- recording (engine internals)
    def _item_done(self, seconds: float) -> None:
        self.completed += 1
        p = self._pending
        p.append(int(seconds * 1e6))
        if len(p) >= _FOLD_AT:
            self._fold()
        if self._listeners:
            self._emit("completed")

    def _item_failed(self, kind: str) -> None:
        self.failed += 1
        self.errors[kind] += 1
        if self._listeners:
            self._emit("failed")

    def _retry(self, cause: str, wait: float) -> None:
        self.retries[cause] += 1
        if len(self.retry_waits) < 10_000:
            self.retry_waits.append(wait)
        if self._listeners:
            self._emit("retry")

    def _in_flight(self, delta: int) -> None:
        v = self.in_flight = self.in_flight + delta
        if v > self.peak_in_flight:
            self.peak_in_flight = v

    def _queued(self, delta: int) -> None:
        v = self.queued = self.queued + delta
        if v > self.peak_queued:
            self.peak_queued = v

    def _bytes(self, used: int) -> None:
        self.inflight_bytes = used
        if used > self.peak_inflight_bytes:
            self.peak_inflight_bytes = used

    def _fold(self) -> None:
        """Move pending latencies into the histogram, grouped by histogram slot."""
        if not self._pending:
            return
        v = np.clip(np.frombuffer(self._pending, dtype=np.int64), _HIST_ARGS[0], _HIST_ARGS[1])
        self._pending = array("q")
        exp = np.frexp(v.astype(np.float64))[1]  # bit length
        shift = np.maximum(exp - _SUB_BUCKET_BITS, 0)
        lowest = (v >> shift) << shift
        values, counts = np.unique(lowest, return_counts=True)
        record = self._hist.record_value
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            record(value, count)

    # ---- reading
    @property
    def latency(self) -> HdrHistogram:
        """Item latencies (µs) as an ``HdrHistogram``."""
        self._fold()
        return self._hist

    def percentile_ms(self, q: float) -> float:
        """Item latency at percentile ``q`` (0–100), in milliseconds (0 with no data)."""
        h = self.latency
        if h.get_total_count() == 0:
            return 0.0
        return h.get_value_at_percentile(q) / 1000.0

    def snapshot(self) -> dict[str, Any]:
        """All figures as a JSON-ready dict."""
        h = self.latency
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
                "max": h.get_max_value() / 1000.0 if h.get_total_count() else 0.0,
            },
        }

    def __repr__(self) -> str:
        return (
            f"Stats(completed={self.completed}, failed={self.failed}, requests={self.requests}, "
            f"retries={sum(self.retries.values())}, in_flight={self.in_flight}, queued={self.queued})"
        )
