"""Turn a :class:`~asyncvae.loadtest.recorder.Recorder` into a :class:`Report`: figures,
JSON (schema in docs/loadtest.md), thresholds, and the HdrHistogram files. The text
is :mod:`asyncvae.loadtest.text`, the plot :mod:`asyncvae.loadtest.plot`.

Rates count requests over the *scheduled* window (the time the measured schedule
ran), never a window stretched to the last answer: an endpoint that answers every
request of a 10 s schedule at 100/s is at 100/s, however long its latency.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from ..errors import InputError
from .hist import PERCENTILES, percentile, summarize, write_hgrm, write_hlog
from .recorder import Recorder, window_seconds

__all__ = ["SCHEMA", "Report", "Threshold", "build_report", "histogram_of", "parse_threshold", "recorder_of"]

SCHEMA = "asyncvae.loadtest/2"
#: A generator is "behind" when more than this share of its sends were late for its own reasons.
BEHIND_FRACTION = 0.01
#: Error kinds that are the generator's own failures, not the endpoint's.
CLIENT_KINDS = ("client_fd_limit", "client_ports")


@dataclass
class Report:
    """The result of a load test. ``data`` is the JSON document (see docs/loadtest.md);
    the histograms (µs) stay available as ``latency``, ``service``, ``ttfb``, ``lag``.

    Figures, each under one name across text, JSON and API: ``p50_ms``, ``p99_ms``
    (``None``: no data), ``target_rate``, ``sent_rate``, ``answered_rate``,
    ``ok_rate`` (per second of the scheduled window), ``sustained_rate`` (ok answers
    arriving per second while the schedule ran), ``error_rate``, ``passed`` (every
    threshold held), ``interrupted``, ``max_rate`` (find-max)."""

    data: dict[str, Any]
    recorder: Recorder | None = field(default=None, repr=False)

    @property
    def latency(self) -> HdrHistogram | None:
        return self.recorder.latency if self.recorder else None

    @property
    def service(self) -> HdrHistogram | None:
        return self.recorder.service if self.recorder else None

    @property
    def ttfb(self) -> HdrHistogram | None:
        return self.recorder.ttfb if self.recorder else None

    @property
    def lag(self) -> HdrHistogram | None:
        return self.recorder.lag if self.recorder else None

    @property
    def p50_ms(self) -> float | None:
        """Median latency from the schedule (``None`` when nothing was measured)."""
        return self.data["latency_ms"]["p50"]

    @property
    def p99_ms(self) -> float | None:
        """99th percentile latency from the schedule (``None`` when nothing was measured)."""
        return self.data["latency_ms"]["p99"]

    @property
    def target_rate(self) -> float | None:
        return self.data["rate"]["target"]

    @property
    def sent_rate(self) -> float:
        return float(self.data["rate"]["sent"])

    @property
    def answered_rate(self) -> float:
        """Requests answered (ok or an HTTP error) per second of the scheduled window."""
        return float(self.data["rate"]["answered"])

    @property
    def ok_rate(self) -> float:
        """Ok answers per second of the scheduled window."""
        return float(self.data["rate"]["ok"])

    @property
    def sustained_rate(self) -> float | None:
        """Ok answers that arrived per second while the schedule ran (from the first one)."""
        return self.data["rate"]["sustained"]

    @property
    def error_rate(self) -> float | None:
        """failed / (ok + failed); ``None`` when no request ended."""
        return self.data["error_rate"]

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

    @property
    def interrupted(self) -> bool:
        return bool(self.data.get("interrupted"))

    @property
    def max_rate(self) -> float | None:
        fm = self.data.get("find_max")
        return fm["max_rate"] if fm else None

    def to_json(self, indent: int | None = 2) -> str:
        """The JSON document (no secrets: the token is never part of it)."""
        return json.dumps(self.data, indent=indent)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def text(self) -> str:
        """The human-readable report."""
        from .text import format_text

        return format_text(self.data)

    def write_hgrm(self, path: str | Path) -> list[Path]:
        """The latency percentile distributions as ``.hgrm`` files: ``path`` (from the
        schedule, corrected) and ``<stem>.service.hgrm`` (from the send, uncorrected),
        for HdrHistogram's plotter. Returns the paths written."""
        from .hist import decode_histogram

        p = Path(path)
        out = [p, p.with_name(p.stem + ".service" + (p.suffix or ".hgrm"))]
        hists = self.data["histograms"]
        for target, name in zip(out, ("latency", "service"), strict=True):
            with open(target, "w") as f:
                write_hgrm(decode_histogram(hists[name]), f)
        return out

    def write_hlog(self, path: str | Path) -> None:
        """The timeline as an HdrHistogram interval log (``.hlog``): tags ``latency``
        (from the schedule) and ``service`` (from the send), one line per interval."""
        rec = self.data["recorder"]
        width = float(self.data["timeline_interval_s"])
        rows = []
        for i, v in sorted(((int(i), v) for i, v in rec["timeline"].items())):
            max_ms = v[9] or 0.0
            rows.append(("latency", i * width, width, max_ms, v[5]))
            rows.append(("service", i * width, width, v[10] or 0.0, v[6]))
        write_hlog(path, rows, start_epoch=self.data.get("schedule_start_epoch") or 0.0,
                   comment=f"asyncvae loadtest {self.data['request']}; values in microseconds")


# --------------------------------------------------------------------------- building


def _queueing(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    pts = [iv for iv in timeline if iv["p50_ms"] is not None and iv["ok"]]
    if len(pts) < 3:
        return {"growing": False, "first_p50_ms": None, "last_p50_ms": None}
    k = max(1, len(pts) // 3)
    first = statistics.median(iv["p50_ms"] for iv in pts[:k])
    last = statistics.median(iv["p50_ms"] for iv in pts[-k:])
    return {"growing": bool(last > 1.5 * first + 5.0), "first_p50_ms": first, "last_p50_ms": last}


def _per_s(n: float, seconds: float) -> float:
    return round(n / seconds, 3) if seconds > 0 else 0.0


def _sustained(rec: Recorder) -> float | None:
    """Ok answers per second from the first one to the end of the scheduled window."""
    if rec.first_ok is None or rec.window_end is None or rec.ok_by_window_end is None:
        return None
    span = rec.window_end - rec.first_ok
    if span <= 0 or rec.ok_by_window_end < 2:
        return None
    return round(rec.ok_by_window_end / span, 3)


def _requests(rec: Recorder) -> dict[str, Any]:
    return {
        "scheduled": rec.scheduled, "sent": rec.sent, "answered": rec.answered, "ok": rec.ok,
        "failed": rec.failed, "unfinished": rec.unfinished, "lower_bounds": rec.censored,
        "client_errors": sum(rec.errors.get(k, 0) for k in CLIENT_KINDS), "warmup": rec.warmup,
        "attempts": rec.attempts, "capped": rec.capped, "peak_in_flight": rec.peak_in_flight,
    }


def _rates(rec: Recorder, window: float, target: float | None) -> dict[str, Any]:
    return {
        "target": target,
        "sent": _per_s(rec.sent, window),
        "answered": _per_s(rec.answered, window),
        "ok": _per_s(rec.ok, window),
        "sustained": _sustained(rec),
    }


def _schedule(rec: Recorder, mode: str) -> dict[str, Any]:
    rows = []
    for w in rec.workers or [rec.worker_summary(0)]:
        row = dict(w)
        own = row.get("late", 0) - row.get("late_capped", 0)
        row["behind"] = bool(mode != "closed" and row["sent"] and own / row["sent"] > BEHIND_FRACTION)
        rows.append(row)
    return {
        "late_threshold_ms": rec.late_threshold * 1000,
        "late": rec.late,
        "late_capped": rec.late_capped,
        "late_fraction": rec.late / rec.sent if rec.sent else 0.0,
        "lag_ms": {
            "p50": percentile(rec.lag, 50) / 1000 if rec.sent else None,
            "p99": percentile(rec.lag, 99) / 1000 if rec.sent else None,
            "max": rec.lag.get_max_value() / 1000 if rec.sent else None,
        },
        "fell_behind": any(r["behind"] for r in rows),
        "workers": rows,
    }


def _mix(rec: Recorder, spec: dict[str, Any]) -> list[dict[str, Any]] | None:
    if not rec.mix:
        return None
    weights = {m.get("label"): m.get("weight") for m in spec.get("mix") or []}
    out = []
    for label, m in rec.mix.items():
        s = summarize(m.latency)
        out.append({"label": label, "weight": weights.get(label), "sent": m.sent, "ok": m.ok, "failed": m.failed,
                    "p50_ms": s["p50"], "p99_ms": s["p99"], "max_ms": s["max"]})
    return out


def build_report(
    rec: Recorder,
    *,
    spec: dict[str, Any],
    mode: str,
    request: str,
    target_rate: float | None,
    started_at: str,
    workers: int,
    thresholds: list[Threshold] | None = None,
    find_max: dict[str, Any] | None = None,
) -> Report:
    """Compute every figure of ``rec`` and check ``thresholds``."""
    rec.finish()
    window = window_seconds(rec)
    ended = rec.ok + rec.failed
    timeline = [row.row(round(i * rec.interval, 6)) for i, row in sorted(rec.timeline.items())]
    partial = rec.to_partial()
    hists = partial.pop("hist")
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at,
        "mode": mode,
        "interrupted": rec.interrupted,
        "spec": spec,
        "request": request,
        "workers": workers,
        "window_s": round(window, 6),
        "schedule_start_epoch": rec.origin_epoch,
        "requests": _requests(rec),
        "rate": _rates(rec, window, target_rate),
        "error_rate": rec.failed / ended if ended else None,
        "bytes": {"out": rec.bytes_out, "in": rec.bytes_in,
                  "out_per_s": _per_s(rec.bytes_out, window), "in_per_s": _per_s(rec.bytes_in, window)},
        "latency_ms": summarize(rec.latency),
        "service_ms": summarize(rec.service),
        "ttfb_ms": summarize(rec.ttfb),
        "error_latency_ms": summarize(rec.error_latency),
        "inflight_cap": {"limit": rec.inflight_cap, "reason": rec.inflight_cap_reason, "reached": rec.capped},
        "schedule": _schedule(rec, mode),
        "statuses": dict(sorted(rec.statuses.items())),
        "errors": dict(sorted(rec.errors.items())),
        "retries": dict(sorted(rec.retries.items())),
        "timeline_interval_s": rec.interval,
        "timeline": timeline,
        "queueing": _queueing(timeline),
        "mix": _mix(rec, spec),
        "find_max": find_max,
        "thresholds": [],
        "passed": True,
        "histograms": hists,
        "recorder": partial,
    }
    results = [t.check(data) for t in thresholds or []]
    data["thresholds"] = results
    data["passed"] = all(r["ok"] for r in results)
    return Report(data, rec)


def recorder_of(data: dict[str, Any]) -> Recorder:
    """The :class:`Recorder` a JSON document was built from (for ``merge``)."""
    if data.get("schema") != SCHEMA or "recorder" not in data:
        raise InputError(f"not an {SCHEMA} report (schema {data.get('schema')!r}); re-run with this version")
    partial = dict(data["recorder"])
    partial["hist"] = data["histograms"]
    return Recorder.from_partial(partial)


# --------------------------------------------------------------------------- thresholds

_LAT_METRICS = {"min", "mean", "max", *(k for k, _ in PERCENTILES)}
_THRESH = re.compile(r"^\s*([a-z_][a-z0-9_.]*)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s|%|/s)?\s*$", re.I)
_KNOWN = ("errors", "error_rate", "rate", "sustained", "late", "max_rate")


def _latency_metric(m: str) -> tuple[str, str] | None:
    """(summary key, figure) of a latency metric (``p99``, ``ttfb_p99``, …), else None."""
    if m in _LAT_METRICS:
        return "latency_ms", m
    base, _, pct = m.partition("_")
    if base in ("ttfb", "service") and pct in _LAT_METRICS:
        return f"{base}_ms", pct
    return None


@dataclass(frozen=True)
class Threshold:
    """A pass/fail condition on the report, e.g. ``p99<250ms``, ``errors<1%``,
    ``rate>95`` (see :func:`parse_threshold`). A latency threshold with no data
    fails: a dead endpoint is never "fast"."""

    expr: str
    metric: str
    op: str
    value: float
    unit: str

    def observe(self, data: dict[str, Any]) -> float | None:
        """The report's value of this threshold's metric in its units (``None``: no data)."""
        m = self.metric
        lat = _latency_metric(m)
        if lat is not None:
            ms = data[lat[0]][lat[1]]
            if ms is None:
                return None
            return {"us": ms * 1000, "µs": ms * 1000, "s": ms / 1000}.get(self.unit, float(ms))
        if m in ("errors", "error_rate"):
            er = data["error_rate"]
            if self.unit == "%":
                return None if er is None else er * 100
            if m == "error_rate":
                return er
            return float(data["requests"]["failed"]) if er is not None else None
        if m in ("rate", "sustained"):
            v = data["rate"]["ok" if m == "rate" else "sustained"]
            if v is None or self.unit != "%":
                return v
            target = data["rate"]["target"]
            if not target:
                raise InputError(f"threshold {self.expr!r}: a % rate needs a target rate (open loop)")
            return 100 * v / target
        if m == "late":
            return data["schedule"]["late_fraction"] * 100 if self.unit == "%" else float(data["schedule"]["late"])
        if m == "max_rate":
            return (data.get("find_max") or {}).get("max_rate")
        raise InputError(f"unknown threshold metric {m!r}")

    def check(self, data: dict[str, Any]) -> dict[str, Any]:
        """``{"expr", "metric", "observed", "unit", "ok"}`` for ``data`` (``observed``
        ``None`` and ``ok`` false when there is no data)."""
        v = self.observe(data)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return {"expr": self.expr, "metric": self.metric, "observed": None, "unit": self.unit, "ok": False,
                    "note": "no data"}
        ok = {"<": v < self.value, "<=": v <= self.value, ">": v > self.value, ">=": v >= self.value}[self.op]
        return {"expr": self.expr, "metric": self.metric, "observed": v, "unit": self.unit, "ok": bool(ok)}


def parse_threshold(text: str) -> Threshold:
    """Parse ``METRIC OP VALUE[UNIT]``.

    Metrics: latency ``p50 p90 p99 p99.9 p99.99 max min mean`` (units ms by default,
    or us/s), the same prefixed ``ttfb_`` / ``service_``; ``errors`` (``%`` of ended
    requests, or a count), ``error_rate`` (a fraction); ``rate`` (ok answers per
    second of the scheduled window, or ``%`` of the target rate); ``sustained`` (ok
    answers arriving per second while the schedule ran, or ``%``); ``late`` (``%`` of
    sends, or a count); ``max_rate`` (``--find-max``). Operators ``< <= > >=``.
    """
    m = _THRESH.match(str(text))
    if not m:
        raise InputError(f"bad threshold {text!r}; use e.g. 'p99<250ms', 'errors<1%', 'rate>95'")
    metric, op, value, unit = m.group(1).lower(), m.group(2), float(m.group(3)), (m.group(4) or "")
    is_lat = _latency_metric(metric) is not None
    if not is_lat and metric not in _KNOWN:
        raise InputError(
            f"unknown threshold metric {metric!r}; use p50/p90/p99/p99.9/p99.99/max/mean, "
            "ttfb_p99, service_p99, errors, error_rate, rate, sustained, late or max_rate"
        )
    if is_lat:
        if unit in ("%", "/s"):
            raise InputError(f"threshold {text!r}: a latency takes ms, s or us")
        unit = unit or "ms"
    elif unit in ("us", "µs", "ms", "s"):
        raise InputError(f"threshold {text!r}: {metric} is not a time")
    if unit == "/s":
        unit = ""
    return Threshold(str(text), metric, op, value, unit)


def histogram_of(data: dict[str, Any], name: str) -> HdrHistogram:
    """One of the report's histograms (``latency``, ``service``, ``ttfb``, ``lag``, ``error_latency``)."""
    from .hist import decode_histogram

    return decode_histogram(data["histograms"][name])

