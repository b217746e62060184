"""The load generator's core: send requests on a schedule (open loop) or from a fixed
number of workers (closed loop), and record what happened.

It knows nothing about HTTP: a *sender* is an ``async () -> Answer`` that raises an
:class:`~asyncvae.AsyncVAEError` for a failed attempt, and a *clock* gives the time
and sleeps. Tests drive it with a simulated endpoint on a virtual-time loop
(:mod:`asyncvae.loadtest.sim`); :mod:`asyncvae.loadtest.runner` plugs in
``transport.exchange``.

Open-loop latency is measured from the time each request was *scheduled* to be sent,
not from when it actually went out (the coordinated-omission correction of wrk2): a
stalled endpoint or a generator that falls behind shows up as latency, not as fewer
samples. How late each send was is recorded too (the ``lag`` histogram).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from hdrh.histogram import HdrHistogram

from ..config import Retry
from ..errors import AsyncVAEError, EndpointError
from ..errors import error_kind as _error_kind

__all__ = [
    "Answer",
    "Clock",
    "InvalidAnswer",
    "LoopClock",
    "MonotonicClock",
    "Recorder",
    "Sender",
    "drive_closed",
    "drive_open",
    "error_kind",
    "new_histogram",
]

#: Histogram range: 1 µs .. 1 hour, 3 significant digits (values in microseconds).
HIST_ARGS = (1, 3_600_000_000, 3)
US = 1_000_000


def new_histogram() -> HdrHistogram:
    """An empty latency histogram (microseconds, 1 µs to 1 h, 3 significant digits)."""
    return HdrHistogram(*HIST_ARGS)


def _counts(h: HdrHistogram) -> np.ndarray:
    return np.ctypeslib.as_array(h.counts)[: h.counts_len]


def percentile(h: HdrHistogram, p: float) -> int:
    """``h.get_value_at_percentile(p)`` (same result) in a few µs instead of ms (numpy)."""
    total = h.get_total_count()
    if not total:
        return 0
    target = h.get_target_count_at_percentile(p)
    cum = np.cumsum(_counts(h))
    idx = int(np.searchsorted(cum, target, side="left"))
    idx = min(idx, h.counts_len - 1)
    v = h.get_value_from_index(idx)
    return int(h.get_highest_equivalent_value(v) if p else h.get_lowest_equivalent_value(v))


def mean_stdev(h: HdrHistogram) -> tuple[float, float]:
    """Mean and standard deviation of ``h`` (as hdrh computes them, but vectorised)."""
    counts = _counts(h)
    idx = np.nonzero(counts)[0]
    if not len(idx):
        return 0.0, 0.0
    median_equiv = getattr(h, "_hdr_median_equiv_value", None)
    if median_equiv is None:  # pragma: no cover - other hdrh versions
        return float(h.get_mean_value()), float(h.get_stddev())
    vals = np.array([median_equiv(h.get_value_from_index(int(i))) for i in idx], dtype=np.float64)
    c = counts[idx].astype(np.float64)
    n = c.sum()
    mean = float((vals * c).sum() / n)
    return mean, float(np.sqrt(((vals - mean) ** 2 * c).sum() / n))


def _us(seconds: float) -> int:
    return min(max(1, round(seconds * US)), HIST_ARGS[1])


def encode_histogram(h: HdrHistogram) -> str:
    """A histogram as an ASCII string (HdrHistogram's compressed base64 format)."""
    raw = h.encode()
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


def decode_histogram(text: str) -> HdrHistogram:
    """The inverse of :func:`encode_histogram` (an empty string is an empty histogram)."""
    h = new_histogram()
    if text:
        h.decode_and_add(text.encode("ascii") if isinstance(text, str) else text)
    return h


class Clock(Protocol):
    """Time source and sleeper of the generator (inject a fake one in tests)."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` (may return a little late, never early by much)."""
        ...


class MonotonicClock:
    """The real clock: ``time.perf_counter`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class LoopClock:
    """The running event loop's clock (virtual time under :class:`~asyncvae.loadtest.sim.VirtualTimeLoop`)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@dataclass(frozen=True)
class Answer:
    """A valid answer to one attempt: HTTP status, seconds from send to first byte, bytes read."""

    status: int = 200
    ttfb: float = 0.0
    bytes_in: int = 0


Sender = Callable[[], Awaitable[Answer]]


class InvalidAnswer(AsyncVAEError):
    """A 2xx answer that is not what the request asked for (wrong shape, not an image)."""


def error_kind(e: BaseException) -> str:
    """The bucket an error is counted in: ``http_503``, ``timeout``, ``connection``,
    ``tls``, ``protocol``, ``invalid_response``, ``unfinished`` or ``exception_<Type>``."""
    if isinstance(e, InvalidAnswer):
        return "invalid_response"
    return _error_kind(e)


def _retryable(e: BaseException, retry: Retry) -> bool:
    if isinstance(e, EndpointError):
        return e.status in retry.statuses
    return bool(getattr(e, "retryable", False))


# --------------------------------------------------------------------------- recording


class Interval:
    """Figures of one timeline interval (by scheduled time)."""

    __slots__ = ("errors", "hist", "ok", "sent")

    def __init__(self) -> None:
        self.hist = new_histogram()
        self.sent = 0
        self.ok = 0
        self.errors = 0


class Recorder:
    """Everything measured in one run (or merged from several workers' runs).

    Histograms (microseconds): ``latency`` (successful requests, from the scheduled
    time; unfinished ones add their age as a lower bound), ``service`` (from the actual
    send, all attempts: what a closed-loop tool would report), ``ttfb`` (first byte,
    from the scheduled time), ``error_latency`` (failed requests), ``lag`` (actual send
    minus scheduled time). Only measured (post-warmup) requests are recorded, except
    ``warmup`` which counts the others.
    """

    def __init__(self, *, interval: float = 1.0, late_threshold: float = 0.005, origin: float = 0.0):
        self.interval = interval
        self.late_threshold = late_threshold
        #: clock time that relative times count from (the run's start)
        self.origin = origin
        self.latency = new_histogram()
        self.service = new_histogram()
        self.ttfb = new_histogram()
        self.error_latency = new_histogram()
        self.lag = new_histogram()
        self.scheduled = 0
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.unfinished = 0
        self.warmup = 0
        self.late = 0
        self.attempts = 0
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        #: relative times (seconds from ``origin``) of measured activity
        self.first_scheduled: float | None = None
        self.first_send: float | None = None
        self.last_send: float | None = None
        self.last_done: float | None = None
        self.timeline: dict[int, Interval] = {}
        #: per worker: sent, late, lag histogram (filled when merging worker runs)
        self.workers: list[dict[str, Any]] = []

    # ---- events
    def _interval(self, due_rel: float) -> Interval:
        i = math.floor(due_rel / self.interval) if due_rel >= 0 else 0
        iv = self.timeline.get(i)
        if iv is None:
            iv = self.timeline[i] = Interval()
        return iv

    def on_schedule(self, due_rel: float, measured: bool) -> None:
        if measured:
            self.scheduled += 1
            if self.first_scheduled is None or due_rel < self.first_scheduled:
                self.first_scheduled = due_rel

    def on_send(self, due_rel: float, sent_rel: float, measured: bool) -> None:
        if not measured:
            self.warmup += 1
            return
        self.sent += 1
        lag = max(0.0, sent_rel - due_rel)
        self.lag.record_value(_us(lag))
        if lag > self.late_threshold:
            self.late += 1
        if self.first_send is None:
            self.first_send = sent_rel
        self.last_send = sent_rel if self.last_send is None else max(self.last_send, sent_rel)
        self._interval(due_rel).sent += 1

    def on_attempt(self, nbytes_out: int, measured: bool) -> None:
        if measured:
            self.attempts += 1
            self.bytes_out += nbytes_out

    def on_status(self, status: int | str, measured: bool) -> None:
        if measured:
            self.statuses[str(status)] += 1

    def on_retry(self, kind: str, measured: bool) -> None:
        if measured:
            self.retries[kind] += 1

    def _done(self, done_rel: float) -> None:
        self.last_done = done_rel if self.last_done is None else max(self.last_done, done_rel)

    def on_ok(self, due_rel: float, sent_rel: float, first_byte_rel: float, done_rel: float,
              nbytes_in: int, measured: bool) -> None:
        if not measured:
            return
        self.ok += 1
        self.bytes_in += nbytes_in
        v = _us(done_rel - due_rel)
        self.latency.record_value(v)
        self.service.record_value(_us(done_rel - sent_rel))
        self.ttfb.record_value(_us(first_byte_rel - due_rel))
        iv = self._interval(due_rel)
        iv.ok += 1
        iv.hist.record_value(v)
        self._done(done_rel)

    def on_error(self, kind: str, due_rel: float, done_rel: float, measured: bool) -> None:
        if not measured:
            return
        self.failed += 1
        self.errors[kind] += 1
        self.error_latency.record_value(_us(done_rel - due_rel))
        self._interval(due_rel).errors += 1
        self._done(done_rel)

    def on_unfinished(self, due_rel: float, now_rel: float, measured: bool) -> None:
        """A request still unanswered when the run stopped waiting: an error of kind
        ``unfinished`` whose age so far enters ``latency`` as a lower bound."""
        if not measured:
            return
        self.unfinished += 1
        self.failed += 1
        self.errors["unfinished"] += 1
        v = _us(now_rel - due_rel)
        self.latency.record_value(v)
        iv = self._interval(due_rel)
        iv.errors += 1
        iv.hist.record_value(v)

    # ---- live view
    def progress(self) -> dict[str, Any]:
        """A cheap snapshot for progress lines."""
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "late": self.late,
            "warmup": self.warmup,
            "p50_us": percentile(self.latency, 50),
            "p99_us": percentile(self.latency, 99),
        }

    # ---- transfer between processes and merging
    def to_partial(self) -> dict[str, Any]:
        """A JSON/pickle-able dump of every figure (histograms HdrHistogram-encoded)."""
        return {
            "interval": self.interval,
            "late_threshold": self.late_threshold,
            "hist": {n: encode_histogram(getattr(self, n)) for n in _HISTS},
            "counts": {n: getattr(self, n) for n in _COUNTS},
            "counters": {n: dict(getattr(self, n)) for n in _COUNTERS},
            "times": {n: getattr(self, n) for n in _TIMES},
            "timeline": {
                str(i): [encode_histogram(iv.hist), iv.sent, iv.ok, iv.errors] for i, iv in self.timeline.items()
            },
            "workers": self.workers,
        }

    @classmethod
    def from_partial(cls, data: dict[str, Any]) -> Recorder:
        """The inverse of :meth:`to_partial`."""
        r = cls(interval=data["interval"], late_threshold=data["late_threshold"])
        for n in _HISTS:
            setattr(r, n, decode_histogram(data["hist"][n]))
        for n in _COUNTS:
            setattr(r, n, data["counts"][n])
        for n in _COUNTERS:
            setattr(r, n, Counter(data["counters"][n]))
        for n in _TIMES:
            setattr(r, n, data["times"][n])
        for i, (h, sent, ok, errors) in data["timeline"].items():
            iv = Interval()
            iv.hist, iv.sent, iv.ok, iv.errors = decode_histogram(h), sent, ok, errors
            r.timeline[int(i)] = iv
        r.workers = list(data.get("workers", []))
        return r

    def worker_summary(self, index: int) -> dict[str, Any]:
        """How well this (one worker's) generator kept to its schedule."""
        return {
            "worker": index,
            "sent": self.sent,
            "late": self.late,
            "lag_p99_ms": percentile(self.lag, 99) / 1000,
            "lag_max_ms": self.lag.get_max_value() / 1000 if self.sent else 0.0,
            "peak_in_flight": self.peak_in_flight,
        }

    @classmethod
    def merge(cls, parts: Iterable[Recorder]) -> Recorder:
        """One recorder holding all of ``parts`` (histograms added exactly)."""
        parts = list(parts)
        if not parts:
            return cls()
        out = cls(interval=parts[0].interval, late_threshold=parts[0].late_threshold)
        for k, p in enumerate(parts):
            for n in _HISTS:
                getattr(out, n).add(getattr(p, n))
            for n in _COUNTS:
                if n == "peak_in_flight":
                    out.peak_in_flight += p.peak_in_flight  # peaks of concurrent workers add up (upper bound)
                else:
                    setattr(out, n, getattr(out, n) + getattr(p, n))
            for n in _COUNTERS:
                getattr(out, n).update(getattr(p, n))
            for n, pick in (("first_scheduled", min), ("first_send", min), ("last_send", max), ("last_done", max)):
                a, b = getattr(out, n), getattr(p, n)
                setattr(out, n, b if a is None else a if b is None else pick(a, b))
            for i, iv in p.timeline.items():
                o = out.timeline.get(i)
                if o is None:
                    o = out.timeline[i] = Interval()
                o.hist.add(iv.hist)
                o.sent += iv.sent
                o.ok += iv.ok
                o.errors += iv.errors
            out.workers.extend(p.workers or [p.worker_summary(k)])
        return out


_HISTS = ("latency", "service", "ttfb", "error_latency", "lag")
_COUNTS = ("scheduled", "sent", "ok", "failed", "unfinished", "warmup", "late", "attempts",
           "bytes_in", "bytes_out", "peak_in_flight")
_COUNTERS = ("statuses", "errors", "retries")
_TIMES = ("first_scheduled", "first_send", "last_send", "last_done")


# --------------------------------------------------------------------------- driving


class _Driver:
    def __init__(self, send: Sender, rec: Recorder, clock: Clock, retry: Retry | None,
                 nbytes_out: int, rng: random.Random):
        self.send = send
        self.rec = rec
        self.clock = clock
        self.retry = retry
        self.nbytes_out = nbytes_out
        self.rng = rng
        self.origin = rec.origin

    async def one(self, due: float, measured: bool) -> None:
        """Send one request (with retries), record it; ``in_flight`` was already counted."""
        rec, clock, o = self.rec, self.clock, self.origin
        due_rel = due - o
        sent = clock.now()
        rec.on_send(due_rel, sent - o, measured)
        attempt = 0
        try:
            while True:
                attempt += 1
                t_att = clock.now()
                rec.on_attempt(self.nbytes_out, measured)
                try:
                    ans = await self.send()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    kind = error_kind(e)
                    status = getattr(e, "status", None) if isinstance(e, EndpointError) else None
                    if status is not None:
                        rec.on_status(status, measured)
                    r = self.retry
                    if r is not None and attempt < r.attempts and _retryable(e, r):
                        rec.on_retry(kind, measured)
                        await clock.sleep(r.wait_for(attempt, getattr(e, "retry_after", None), self.rng))
                        continue
                    rec.on_error(kind, due_rel, clock.now() - o, measured)
                    return
                rec.on_status(ans.status, measured)
                now = clock.now()
                rec.on_ok(due_rel, sent - o, t_att + ans.ttfb - o, now - o, ans.bytes_in, measured)
                return
        except asyncio.CancelledError:
            rec.on_unfinished(due_rel, clock.now() - o, measured)
            raise
        finally:
            rec.in_flight -= 1


async def _drain(tasks: set[asyncio.Task[None]], timeout: float | None) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def drive_open(
    arrivals: Iterable[tuple[float, bool]],
    send: Sender,
    rec: Recorder,
    *,
    clock: Clock,
    retry: Retry | None = None,
    nbytes_out: int = 0,
    max_inflight: int = 10_000,
    drain_timeout: float | None = None,
    rng: random.Random | None = None,
) -> None:
    """Open loop: send one request at each scheduled time of ``arrivals`` (``(offset
    seconds, measured)`` pairs), whatever is still in flight, and wait for the answers.

    Latency counts from the scheduled time. A send that can't go out on time (the
    loop was busy, or ``max_inflight`` requests are out) goes as soon as it can and is
    recorded as late. Answers still missing ``drain_timeout`` s after the last send
    are cancelled and counted as ``unfinished``.
    """
    start = clock.now()
    rec.origin = start
    drv = _Driver(send, rec, clock, retry, nbytes_out, rng or random.Random(0))
    tasks: set[asyncio.Task[None]] = set()
    room = asyncio.Event()

    def finished(t: asyncio.Task[None]) -> None:
        tasks.discard(t)
        room.set()

    try:
        for offset, measured in arrivals:
            due = start + offset
            rec.on_schedule(offset, measured)
            delay = due - clock.now()
            if delay > 0:
                await clock.sleep(delay)
            while rec.in_flight >= max_inflight:
                room.clear()
                await room.wait()
            rec.in_flight += 1
            rec.peak_in_flight = max(rec.peak_in_flight, rec.in_flight)
            t = asyncio.ensure_future(drv.one(due, measured))
            tasks.add(t)
            t.add_done_callback(finished)
        await _drain(tasks, drain_timeout)
    finally:
        if tasks:
            await _drain(tasks, 0)


async def drive_closed(
    concurrency: int,
    send: Sender,
    rec: Recorder,
    *,
    clock: Clock,
    duration: float | None,
    requests: int | None,
    warmup: float | int = 0.0,
    retry: Retry | None = None,
    nbytes_out: int = 0,
    rng: random.Random | None = None,
) -> None:
    """Closed loop: ``concurrency`` workers each send the next request when their last
    one finished (latency from the actual send; there is no schedule to be late for).

    Runs ``warmup`` (seconds, or requests when an int) first, then ``duration``
    seconds and/or ``requests`` measured requests.
    """
    start = clock.now()
    rec.origin = start
    drv = _Driver(send, rec, clock, retry, nbytes_out, rng or random.Random(0))
    warm_n = warmup if isinstance(warmup, int) else 0
    warm_s = float(warmup) if not isinstance(warmup, int) else 0.0
    stop_at = start + warm_s + duration if duration is not None else None
    issued = 0
    measured_issued = 0
    warm_until: float | None = None  # end of a count-based warmup, for the time limit

    async def worker() -> None:
        nonlocal issued, measured_issued, warm_until, stop_at
        while True:
            now = clock.now()
            if stop_at is not None and now >= stop_at:
                return
            measured = issued >= warm_n and now - start >= warm_s
            if measured and requests is not None and measured_issued >= requests:
                return
            issued += 1
            if measured:
                if warm_until is None:
                    warm_until = now
                    if warm_n and duration is not None:
                        stop_at = now + duration
                measured_issued += 1
            rec.on_schedule(now - start, measured)
            rec.in_flight += 1
            rec.peak_in_flight = max(rec.peak_in_flight, rec.in_flight)
            await drv.one(now, measured)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
