"""What a run measured: :class:`Recorder` (one generator's figures, or several merged
exactly), fed by the drivers in :mod:`asyncvae.loadtest.engine`.

Words, the same in the recorder, the JSON and the text: a request is *scheduled*,
*sent* (maybe *late*, maybe *capped*: held back by the in-flight cap), then
*answered* (an HTTP answer arrived: *ok*, or an HTTP/protocol/invalid-answer error)
or not (connection error, *timeout*, *unfinished* when the run stopped waiting).
*failed* = every request that did not end ok.

Memory is flat over long runs: each timeline interval keeps its two histograms
(latency from the schedule, service from the send) only while requests scheduled in
it are still out; then it is *closed* into a row of counts, a few percentiles and
the two histograms in compressed form (a few hundred bytes).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from hdrh.histogram import HdrHistogram

from .hist import (
    LIVE_ARGS,
    add_encoded,
    decode_histogram,
    encode_histogram,
    new_histogram,
    percentile,
    record,
    record_seconds,
    reset_histogram,
    to_us,
)

__all__ = ["ClosedInterval", "Recorder"]

_STATUS = {code: str(code) for code in range(100, 600)}
#: Values waiting in a list before they are recorded in bulk.
FLUSH_EVERY = 2048
#: Error kinds whose requests got no answer and so enter ``latency`` as a lower bound.
CENSORED_KINDS = frozenset({"timeout", "unfinished"})


class _OpenInterval:
    """A timeline interval (by scheduled time) still collecting answers: its latencies
    (seconds, from the schedule) and service times wait in lists until it closes."""

    __slots__ = ("answered", "capped", "errors", "latency", "ok", "pending", "sent", "service")

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.service: list[float] = []
        self.sent = self.answered = self.ok = self.errors = self.capped = self.pending = 0


class ClosedInterval:
    """A finished timeline interval: counts, percentiles (ms, ``None`` when no answer)
    and its two histograms compressed (``latency`` from the schedule, ``service``
    from the send)."""

    __slots__ = ("answered", "capped", "errors", "latency", "max_ms", "ok", "p50_ms", "p99_ms", "sent",
                 "service", "service_p50_ms", "service_p99_ms")

    def __init__(self, sent: int, answered: int, ok: int, errors: int, capped: int, latency: str, service: str,
                 figures: tuple[float | None, ...] | None = None):
        self.sent, self.answered, self.ok, self.errors, self.capped = sent, answered, ok, errors, capped
        self.latency, self.service = latency, service
        if figures is None:
            figures = _interval_figures(decode_histogram(latency), decode_histogram(service))
        self.p50_ms, self.p99_ms, self.max_ms, self.service_p50_ms, self.service_p99_ms = figures

    def row(self, t: float) -> dict[str, Any]:
        """The interval as a JSON timeline row."""
        return {"t": t, "sent": self.sent, "answered": self.answered, "ok": self.ok, "errors": self.errors,
                "capped": self.capped, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
                "service_p50_ms": self.service_p50_ms, "service_p99_ms": self.service_p99_ms}

    def to_list(self) -> list[Any]:
        return [self.sent, self.answered, self.ok, self.errors, self.capped, self.latency, self.service,
                self.p50_ms, self.p99_ms, self.max_ms, self.service_p50_ms, self.service_p99_ms]

    @classmethod
    def from_list(cls, v: list[Any]) -> ClosedInterval:
        return cls(*v[:7], figures=tuple(v[7:12]) if len(v) >= 12 else None)


def _interval_figures(lat: HdrHistogram, svc: HdrHistogram) -> tuple[float | None, ...]:
    has, shas = lat.get_total_count() > 0, svc.get_total_count() > 0
    return (
        percentile(lat, 50) / 1000 if has else None,
        percentile(lat, 99) / 1000 if has else None,
        lat.get_max_value() / 1000 if has else None,
        percentile(svc, 50) / 1000 if shas else None,
        percentile(svc, 99) / 1000 if shas else None,
    )


class MixFigures:
    """Figures of one kind of request of a mix."""

    __slots__ = ("failed", "latency", "ok", "sent")

    def __init__(self) -> None:
        self.sent = self.ok = self.failed = 0
        self.latency = new_histogram()


class Recorder:
    """Everything measured in one run (or merged from several generators' runs).

    Histograms (µs): ``latency`` (ok answers from the scheduled time, plus the age of
    every request that got no answer — timeouts and unfinished ones — as a lower
    bound, counted in ``censored``), ``service`` (ok answers from the actual send:
    what a closed-loop tool reports), ``ttfb`` (first byte, from the scheduled
    time), ``error_latency`` (failed requests, from the schedule), ``lag`` (actual
    send minus scheduled time). Only measured (post-warm-up) requests are recorded,
    except ``warmup``, which counts the others.

    Times are seconds relative to ``origin`` (the clock time the schedule starts at;
    ``origin_epoch`` is the same instant as Unix time). ``window_start`` /
    ``window_end`` bound the measured schedule; ``ok_by_window_end`` is how many ok
    answers had arrived when it ended (``first_ok``: the first one's time).
    """

    def __init__(self, *, interval: float = 1.0, late_threshold: float = 0.005, origin: float = 0.0,
                 labels: Iterable[str] = ()):
        self.interval = interval
        self.late_threshold = late_threshold
        self.origin = origin
        self.origin_epoch: float | None = None
        self.latency = new_histogram()
        self.service = new_histogram()
        self.ttfb = new_histogram()
        self.error_latency = new_histogram()
        self.lag = new_histogram()
        self.live = HdrHistogram(*LIVE_ARGS)
        for n in _COUNTS:
            setattr(self, n, 0)
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.in_flight = 0
        for n in _TIMES:
            setattr(self, n, None)
        self.ok_by_window_end: int | None = None
        self.interrupted = False
        self.inflight_cap: int | None = None
        self.inflight_cap_reason = ""
        self.timeline: dict[int, ClosedInterval] = {}
        self._open: dict[int, _OpenInterval] = {}
        #: two histograms an interval is recorded into when it closes (then reset and reused)
        self._scratch = (new_histogram(), new_histogram())
        #: values (seconds) waiting to be recorded, per histogram (see :meth:`flush`)
        self._lat: list[float] = []
        self._svc: list[float] = []
        self._ttfb: list[float] = []
        self._lag: list[float] = []
        self._live: list[float] = []
        self._pending = (("latency", self._lat), ("service", self._svc), ("ttfb", self._ttfb),
                         ("lag", self._lag), ("live", self._live))
        self._horizon = -1
        labels = tuple(labels)
        self.mix: dict[str, MixFigures] = {k: MixFigures() for k in labels} if len(labels) > 1 else {}
        #: per generator process: how it kept to its schedule (filled by :meth:`merge`)
        self.workers: list[dict[str, Any]] = []

    # typed views of the counters set in __init__ (for readers and type checkers)
    scheduled: int
    sent: int
    answered: int
    ok: int
    failed: int
    unfinished: int
    censored: int
    warmup: int
    late: int
    late_capped: int
    capped: int
    attempts: int
    bytes_in: int
    bytes_out: int
    peak_in_flight: int
    window_start: float | None
    window_end: float | None
    first_send: float | None
    last_send: float | None
    first_ok: float | None
    last_done: float | None

    # ---- intervals
    def _iv(self, due_rel: float) -> tuple[int, _OpenInterval]:
        i = int(due_rel // self.interval) if due_rel > 0 else 0
        iv = self._open.get(i)
        if iv is None:
            iv = self._open[i] = _OpenInterval()
        return i, iv

    def _close(self, i: int) -> None:
        iv = self._open.pop(i)
        lat, svc = reset_histogram(self._scratch[0]), reset_histogram(self._scratch[1])
        record_seconds(lat, iv.latency)
        record_seconds(svc, iv.service)
        self.timeline[i] = ClosedInterval(
            iv.sent, iv.answered, iv.ok, iv.errors, iv.capped,
            encode_histogram(lat), encode_histogram(svc), _interval_figures(lat, svc),
        )

    def flush(self) -> None:
        """Record the values waiting in lists into the run's histograms."""
        for name, pending in self._pending:
            if pending:
                record_seconds(getattr(self, name), pending)
                pending.clear()

    def _close_ready(self) -> None:
        for i in [i for i, iv in self._open.items() if i < self._horizon and iv.pending == 0]:
            self._close(i)

    def _resolve(self, i: int, iv: _OpenInterval) -> None:
        iv.pending -= 1
        if iv.pending <= 0 and i < self._horizon:
            self._close(i)

    def finish(self) -> None:
        """Close every interval and flush (the run is over)."""
        for i in sorted(self._open):
            self._close(i)
        self.flush()

    def open_intervals(self) -> int:
        """Intervals still holding full histograms (for memory checks)."""
        return len(self._open)

    # ---- events (measured=False: warm-up, only counted)
    def on_schedule(self, due_rel: float, measured: bool) -> None:
        if measured:
            self.scheduled += 1
        i = int(due_rel // self.interval) if due_rel > 0 else 0
        if i > self._horizon:
            self._horizon = i
            if self._open:
                self._close_ready()

    def on_send(self, due_rel: float, sent_rel: float, measured: bool, capped: bool, label: str = "") -> None:
        if not measured:
            self.warmup += 1
            return
        self.sent += 1
        lag = sent_rel - due_rel
        self._lag.append(lag)
        if lag > self.late_threshold:
            self.late += 1
            if capped:
                self.late_capped += 1
        if self.first_send is None:
            self.first_send = sent_rel
        self.last_send = sent_rel
        _, iv = self._iv(due_rel)
        iv.sent += 1
        iv.pending += 1
        if capped:
            self.capped += 1
            iv.capped += 1
        if self.mix:
            self.mix[label].sent += 1

    def on_attempt(self, status: int | None, body_sent: bool, nbytes_out: int, measured: bool) -> None:
        """One attempt ended: ``status`` when an HTTP answer came; ``body_sent`` when the
        request body went out (an answer came, or the wait for one timed out)."""
        if measured:
            self.attempts += 1
            if status is not None:
                key = _STATUS.get(status) or str(status)
                self.statuses[key] = self.statuses.get(key, 0) + 1
            if body_sent:
                self.bytes_out += nbytes_out

    def on_retry(self, kind: str, measured: bool) -> None:
        if measured:
            self.retries[kind] += 1

    def _done(self, done_rel: float) -> None:
        if self.last_done is None or done_rel > self.last_done:
            self.last_done = done_rel

    def on_ok(self, due_rel: float, sent_rel: float, first_byte_rel: float, done_rel: float,
              nbytes_in: int, measured: bool, label: str = "", status: int = 200, nbytes_out: int = 0) -> None:
        """A request ended ok; its last attempt (``status``, ``nbytes_out`` sent) is
        counted here too (no :meth:`on_attempt` for it)."""
        if not measured:
            return
        self.attempts += 1
        key = _STATUS.get(status) or str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.bytes_out += nbytes_out
        self.ok += 1
        self.answered += 1
        self.bytes_in += nbytes_in
        v = done_rel - due_rel
        s = done_rel - sent_rel
        lat = self._lat
        lat.append(v)
        self._svc.append(s)
        self._ttfb.append(first_byte_rel - due_rel)
        self._live.append(v)
        if len(lat) >= FLUSH_EVERY:
            self.flush()
        if self.first_ok is None or done_rel < self.first_ok:
            self.first_ok = done_rel
        if self.last_done is None or done_rel > self.last_done:
            self.last_done = done_rel
        i, iv = self._iv(due_rel)
        iv.ok += 1
        iv.answered += 1
        iv.latency.append(v)
        iv.service.append(s)
        if self.mix:
            m = self.mix[label]
            m.ok += 1
            record(m.latency, to_us(v))
        self._resolve(i, iv)

    def on_error(self, kind: str, due_rel: float, done_rel: float, measured: bool, answered: bool,
                 label: str = "") -> None:
        """A request failed for good (``answered``: an HTTP answer came). A timeout's age
        enters ``latency`` as a lower bound."""
        if not measured:
            return
        self.failed += 1
        self.errors[kind] += 1
        v = to_us(done_rel - due_rel)
        record(self.error_latency, v)
        self._done(done_rel)
        i, iv = self._iv(due_rel)
        iv.errors += 1
        if answered:
            self.answered += 1
            iv.answered += 1
        if kind in CENSORED_KINDS:
            self.censored += 1
            self._lat.append(done_rel - due_rel)
            iv.latency.append(done_rel - due_rel)
        if self.mix:
            self.mix[label].failed += 1
        self._resolve(i, iv)

    def on_unfinished(self, due_rel: float, now_rel: float, measured: bool, label: str = "") -> None:
        """A request still unanswered when the run stopped waiting: a failure of kind
        ``unfinished`` whose age so far enters ``latency`` as a lower bound."""
        if not measured:
            return
        self.unfinished += 1
        self.failed += 1
        self.censored += 1
        self.errors["unfinished"] += 1
        self._lat.append(now_rel - due_rel)
        i, iv = self._iv(due_rel)
        iv.errors += 1
        iv.latency.append(now_rel - due_rel)
        if self.mix:
            self.mix[label].failed += 1
        self._resolve(i, iv)

    def on_window_end(self) -> None:
        """The measured schedule just ended: remember how many ok answers had arrived."""
        if self.ok_by_window_end is None:
            self.ok_by_window_end = self.ok

    # ---- live view
    def progress(self) -> dict[str, Any]:
        """A cheap snapshot for progress lines: cumulative counters and the compressed
        histogram of the ok answers since the last snapshot (then reset)."""
        self.flush()
        live = encode_histogram(self.live) if self.live.get_total_count() else ""
        reset_histogram(self.live)
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed, "in_flight": self.in_flight,
            "late": self.late, "capped": self.capped, "warmup": self.warmup, "live": live,
        }

    # ---- transfer between processes, and merging
    def to_partial(self) -> dict[str, Any]:
        """A JSON/pickle-able dump of every figure (histograms HdrHistogram-encoded)."""
        self.finish()
        return {
            "interval": self.interval,
            "late_threshold": self.late_threshold,
            "origin_epoch": self.origin_epoch,
            "hist": {n: encode_histogram(getattr(self, n)) for n in _HISTS},
            "counts": {n: getattr(self, n) for n in _COUNTS},
            "counters": {n: dict(getattr(self, n)) for n in _COUNTERS},
            "times": {n: getattr(self, n) for n in (*_TIMES, "ok_by_window_end")},
            "interrupted": self.interrupted,
            "inflight_cap": self.inflight_cap,
            "inflight_cap_reason": self.inflight_cap_reason,
            "timeline": {str(i): row.to_list() for i, row in sorted(self.timeline.items())},
            "mix": {k: [m.sent, m.ok, m.failed, encode_histogram(m.latency)] for k, m in self.mix.items()},
            "workers": self.workers,
        }

    @classmethod
    def from_partial(cls, data: dict[str, Any]) -> Recorder:
        """The inverse of :meth:`to_partial`."""
        r = cls(interval=data["interval"], late_threshold=data["late_threshold"])
        r.origin_epoch = data.get("origin_epoch")
        for n in _HISTS:
            setattr(r, n, decode_histogram(data["hist"][n]))
        for n in _COUNTS:
            setattr(r, n, data["counts"].get(n, 0))
        for n in _COUNTERS:
            setattr(r, n, Counter(data["counters"][n]))
        for n in (*_TIMES, "ok_by_window_end"):
            setattr(r, n, data["times"].get(n))
        r.interrupted = bool(data.get("interrupted"))
        r.inflight_cap = data.get("inflight_cap")
        r.inflight_cap_reason = data.get("inflight_cap_reason", "")
        r.timeline = {int(i): ClosedInterval.from_list(v) for i, v in data["timeline"].items()}
        for k, (sent, ok, failed, h) in data.get("mix", {}).items():
            m = r.mix[k] = MixFigures()
            m.sent, m.ok, m.failed, m.latency = sent, ok, failed, decode_histogram(h)
        r.workers = list(data.get("workers", []))
        return r

    def worker_summary(self, index: int) -> dict[str, Any]:
        """How well this (one process's) generator kept to its schedule."""
        self.flush()
        return {
            "worker": index,
            "pid": os.getpid(),
            "sent": self.sent,
            "late": self.late,
            "late_capped": self.late_capped,
            "capped": self.capped,
            "lag_p99_ms": percentile(self.lag, 99) / 1000,
            "lag_max_ms": self.lag.get_max_value() / 1000 if self.sent else 0.0,
            "peak_in_flight": self.peak_in_flight,
            "inflight_cap": self.inflight_cap,
        }

    def shifted(self, seconds: float) -> Recorder:
        """This recorder with its times moved ``seconds`` later (intervals by whole
        intervals): to line up runs whose schedules started apart."""
        k = round(seconds / self.interval)
        if not k:
            return self
        self.timeline = {i + k: row for i, row in self.timeline.items()}
        for n in (*_TIMES,):
            v = getattr(self, n)
            if v is not None:
                setattr(self, n, v + k * self.interval)
        return self

    @classmethod
    def merge(cls, parts: Iterable[Recorder]) -> Recorder:
        """One recorder holding all of ``parts`` (histograms added exactly; in-flight
        peaks and caps add up: the parts ran at the same time)."""
        parts = list(parts)
        if not parts:
            return cls()
        out = cls(interval=parts[0].interval, late_threshold=parts[0].late_threshold)
        for k, p in enumerate(parts):
            p.finish()
            _merge_into(out, p)
            out.workers.extend(p.workers or [p.worker_summary(k)])
        out.timeline = dict(_merge_timelines([p.timeline for p in parts]))
        return out


def _pick(a: float | None, b: float | None, f: Any) -> float | None:
    return b if a is None else a if b is None else f(a, b)


def _merge_into(out: Recorder, p: Recorder) -> None:
    for n in _HISTS:
        getattr(out, n).add(getattr(p, n))
    for n in _COUNTS:
        setattr(out, n, getattr(out, n) + getattr(p, n))
    for n in _COUNTERS:
        getattr(out, n).update(getattr(p, n))
    for n, f in (("window_start", min), ("window_end", max), ("first_send", min), ("last_send", max),
                 ("first_ok", min), ("last_done", max)):
        setattr(out, n, _pick(getattr(out, n), getattr(p, n), f))
    out.origin_epoch = _pick(out.origin_epoch, p.origin_epoch, min)
    mine = p.ok_by_window_end if p.ok_by_window_end is not None else p.ok
    out.ok_by_window_end = (out.ok_by_window_end or 0) + mine
    out.interrupted = out.interrupted or p.interrupted
    if p.inflight_cap is not None:
        out.inflight_cap = (out.inflight_cap or 0) + p.inflight_cap
        out.inflight_cap_reason = out.inflight_cap_reason or p.inflight_cap_reason
    for key, m in p.mix.items():
        o = out.mix.setdefault(key, MixFigures())
        o.sent += m.sent
        o.ok += m.ok
        o.failed += m.failed
        o.latency.add(m.latency)


def _merge_timelines(timelines: list[dict[int, ClosedInterval]]) -> Iterator[tuple[int, ClosedInterval]]:
    for i in sorted(set().union(*timelines)):
        rows = [t[i] for t in timelines if i in t]
        if len(rows) == 1:
            yield i, rows[0]
            continue
        lat, svc = new_histogram(), new_histogram()
        for r in rows:
            add_encoded(lat, r.latency)
            add_encoded(svc, r.service)
        yield i, ClosedInterval(
            sum(r.sent for r in rows), sum(r.answered for r in rows), sum(r.ok for r in rows),
            sum(r.errors for r in rows), sum(r.capped for r in rows),
            encode_histogram(lat), encode_histogram(svc), _interval_figures(lat, svc),
        )


_HISTS = ("latency", "service", "ttfb", "error_latency", "lag")
_COUNTS = ("scheduled", "sent", "answered", "ok", "failed", "unfinished", "censored", "warmup", "late",
           "late_capped", "capped", "attempts", "bytes_in", "bytes_out", "peak_in_flight")
_COUNTERS = ("statuses", "errors", "retries")
_TIMES = ("window_start", "window_end", "first_send", "last_send", "first_ok", "last_done")


def window_seconds(rec: Recorder) -> float:
    """Length of the measured window (``0.0`` when nothing was measured)."""
    if rec.window_start is None or rec.window_end is None:
        return 0.0
    return max(0.0, rec.window_end - rec.window_start)

