"""Turn a :class:`~asyncvae.loadtest.engine.Recorder` into a :class:`Report`: figures,
a human-readable text, JSON (schema in docs/loadtest.md), thresholds and a plot."""

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
from .engine import Recorder, encode_histogram, mean_stdev, percentile

__all__ = [
    "SCHEMA",
    "Report",
    "Threshold",
    "build_report",
    "check_plot_available",
    "format_text",
    "parse_threshold",
    "write_plot",
]

SCHEMA = "asyncvae.loadtest/1"
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9), ("p99.99", 99.99))
#: A generator is "behind" when more than this share of its sends were late.
BEHIND_FRACTION = 0.01


def summarize(h: HdrHistogram) -> dict[str, float | int]:
    """count, min, mean, stdev, p50 … p99.99, max of a µs histogram, in milliseconds."""
    n = h.get_total_count()
    if not n:
        return {"count": 0, **{k: 0.0 for k in ("min", "mean", "stdev")},
                **{k: 0.0 for k, _ in PERCENTILES}, "max": 0.0}
    mean, stdev = mean_stdev(h)
    out: dict[str, float | int] = {
        "count": n,
        "min": h.get_min_value() / 1000,
        "mean": round(mean / 1000, 3),
        "stdev": round(stdev / 1000, 3),
    }
    for k, p in PERCENTILES:
        out[k] = percentile(h, p) / 1000
    out["max"] = h.get_max_value() / 1000
    return out


@dataclass
class Report:
    """The result of a load test. ``data`` is the JSON document (see docs/loadtest.md);
    the histograms (µs) stay available as ``latency``, ``service``, ``ttfb``, ``lag``.

    Common figures are properties: ``p50_ms``, ``p99_ms``, ``achieved_rate``,
    ``error_rate``, ``passed`` (all thresholds held), ``max_rate`` (``find_max``)."""

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
    def p50_ms(self) -> float:
        return float(self.data["latency_ms"]["p50"])

    @property
    def p99_ms(self) -> float:
        return float(self.data["latency_ms"]["p99"])

    @property
    def achieved_rate(self) -> float:
        """Answers per second (ok + failed) over the measured window."""
        return float(self.data["rate"]["completed"])

    @property
    def error_rate(self) -> float:
        return float(self.data["error_rate"])

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

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
        return format_text(self.data)


def _queueing(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    pts = [iv for iv in timeline if iv["ok"]]
    if len(pts) < 3:
        return {"growing": False, "first_p50_ms": None, "last_p50_ms": None}
    k = max(1, len(pts) // 3)
    first = statistics.median(iv["p50_ms"] for iv in pts[:k])
    last = statistics.median(iv["p50_ms"] for iv in pts[-k:])
    return {
        "growing": bool(last > 1.5 * first + 5.0),
        "first_p50_ms": first,
        "last_p50_ms": last,
    }


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
    start = rec.first_scheduled if rec.first_scheduled is not None else 0.0
    end = rec.last_done if rec.last_done is not None else start
    window = max(end - start, 1e-9)
    done = rec.ok + rec.failed - rec.unfinished  # answered (well or not)
    if rec.sent > 1 and rec.first_send is not None and rec.last_send is not None and rec.last_send > rec.first_send:
        sent_rate = (rec.sent - 1) / (rec.last_send - rec.first_send)
    else:
        sent_rate = rec.sent / window if done else 0.0
    timeline = []
    for i in sorted(rec.timeline):
        iv = rec.timeline[i]
        h = iv.hist
        has = h.get_total_count() > 0
        timeline.append({
            "t": round(i * rec.interval, 6),
            "sent": iv.sent,
            "ok": iv.ok,
            "errors": iv.errors,
            "p50_ms": percentile(h, 50) / 1000 if has else None,
            "p99_ms": percentile(h, 99) / 1000 if has else None,
            "max_ms": h.get_max_value() / 1000 if has else None,
        })
    late_fraction = rec.late / rec.sent if rec.sent else 0.0
    worker_rows = []
    for w in rec.workers or [rec.worker_summary(0)]:
        row = dict(w)
        row["behind"] = bool(row["sent"] and row["late"] / row["sent"] > BEHIND_FRACTION) if mode != "closed" else False
        worker_rows.append(row)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at,
        "mode": mode,
        "spec": spec,
        "request": request,
        "workers": workers,
        "duration_s": round(window, 6) if done else 0.0,
        "requests": {
            "scheduled": rec.scheduled,
            "sent": rec.sent,
            "ok": rec.ok,
            "failed": rec.failed,
            "unfinished": rec.unfinished,
            "warmup": rec.warmup,
            "attempts": rec.attempts,
            "peak_in_flight": rec.peak_in_flight,
        },
        "rate": {
            "target": target_rate,
            "sent": round(sent_rate, 3),
            "completed": round(done / window, 3) if done else 0.0,
            "ok": round(rec.ok / window, 3) if done else 0.0,
        },
        "error_rate": rec.failed / (rec.ok + rec.failed) if rec.ok + rec.failed else 0.0,
        "bytes": {
            "out": rec.bytes_out,
            "in": rec.bytes_in,
            "out_per_s": round(rec.bytes_out / window, 1) if done else 0.0,
            "in_per_s": round(rec.bytes_in / window, 1) if done else 0.0,
        },
        "latency_ms": summarize(rec.latency),
        "service_ms": summarize(rec.service),
        "ttfb_ms": summarize(rec.ttfb),
        "error_latency_ms": summarize(rec.error_latency),
        "schedule": {
            "late_threshold_ms": rec.late_threshold * 1000,
            "late": rec.late,
            "late_fraction": late_fraction,
            "lag_ms": {
                "p50": percentile(rec.lag, 50) / 1000,
                "p99": percentile(rec.lag, 99) / 1000,
                "max": rec.lag.get_max_value() / 1000 if rec.sent else 0.0,
            },
            "fell_behind": any(r["behind"] for r in worker_rows),
            "workers": worker_rows,
        },
        "statuses": dict(sorted(rec.statuses.items())),
        "errors": dict(sorted(rec.errors.items())),
        "retries": dict(sorted(rec.retries.items())),
        "timeline_interval_s": rec.interval,
        "timeline": timeline,
        "queueing": _queueing(timeline),
        "find_max": find_max,
        "thresholds": [],
        "passed": True,
        "histograms": {n: encode_histogram(getattr(rec, n)) for n in ("latency", "service", "ttfb", "lag")},
    }
    results = [t.check(data) for t in thresholds or []]
    data["thresholds"] = results
    data["passed"] = all(r["ok"] for r in results)
    return Report(data, rec)


# --------------------------------------------------------------------------- thresholds

_LAT_METRICS = {"min", "mean", "max", *(k for k, _ in PERCENTILES)}
_THRESH = re.compile(r"^\s*([a-z_][a-z0-9_.]*)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s|%|/s)?\s*$", re.I)


@dataclass(frozen=True)
class Threshold:
    """A pass/fail condition on the report, e.g. ``p99<250ms``, ``errors<1%``,
    ``rate>95`` (see :func:`parse_threshold`)."""

    expr: str
    metric: str
    op: str
    value: float
    unit: str

    def observe(self, data: dict[str, Any]) -> float:
        """The report's value of this threshold's metric, in the threshold's units."""
        m = self.metric
        base, _, pct = m.partition("_")
        if m in _LAT_METRICS or (base in ("ttfb", "service") and pct in _LAT_METRICS):
            table = "latency_ms" if m in _LAT_METRICS else f"{base}_ms"
            key = m if m in _LAT_METRICS else pct
            ms = float(data[table][key])
            return {"us": ms * 1000, "µs": ms * 1000, "s": ms / 1000}.get(self.unit, ms)
        if m in ("errors", "error_rate"):
            done = data["requests"]["ok"] + data["requests"]["failed"]
            if self.unit == "%":
                return data["error_rate"] * 100
            return data["error_rate"] if m == "error_rate" else float(data["requests"]["failed"]) if done else 0.0
        if m == "rate":
            ok = float(data["rate"]["ok"])
            if self.unit == "%":
                target = data["rate"]["target"]
                if not target:
                    raise InputError(f"threshold {self.expr!r}: a % rate needs a target rate (open loop)")
                return 100 * ok / target
            return ok
        if m == "late":
            return data["schedule"]["late_fraction"] * 100 if self.unit == "%" else float(data["schedule"]["late"])
        if m == "max_rate":
            fm = data.get("find_max") or {}
            return float(fm.get("max_rate") or 0.0)
        raise InputError(f"unknown threshold metric {m!r}")

    def check(self, data: dict[str, Any]) -> dict[str, Any]:
        """``{"expr", "metric", "observed", "ok"}`` for ``data``."""
        v = self.observe(data)
        ok = {"<": v < self.value, "<=": v <= self.value, ">": v > self.value, ">=": v >= self.value}[self.op]
        if isinstance(v, float) and math.isnan(v):
            ok = False
        return {"expr": self.expr, "metric": self.metric, "observed": v, "unit": self.unit, "ok": bool(ok)}


def parse_threshold(text: str) -> Threshold:
    """Parse ``METRIC OP VALUE[UNIT]``.

    Metrics: latency ``p50 p90 p99 p99.9 p99.99 max min mean`` (units ms by default,
    or us/s), the same prefixed ``ttfb_`` / ``service_``; ``errors`` (``%`` of answers,
    or a count), ``error_rate`` (a fraction); ``rate`` (ok answers per second, or ``%``
    of the target rate); ``late`` (``%`` of sends, or a count); ``max_rate``
    (``--find-max``). Operators ``< <= > >=``.
    """
    m = _THRESH.match(str(text))
    if not m:
        raise InputError(f"bad threshold {text!r}; use e.g. 'p99<250ms', 'errors<1%', 'rate>95'")
    metric, op, value, unit = m.group(1).lower(), m.group(2), float(m.group(3)), (m.group(4) or "")
    base, _, pct = metric.partition("_")
    is_lat = metric in _LAT_METRICS or (base in ("ttfb", "service") and pct in _LAT_METRICS)
    known = is_lat or metric in ("errors", "error_rate", "rate", "late", "max_rate")
    if not known:
        raise InputError(
            f"unknown threshold metric {metric!r}; use p50/p90/p99/p99.9/p99.99/max/mean, "
            "ttfb_p99, service_p99, errors, error_rate, rate, late or max_rate"
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


# --------------------------------------------------------------------------- text


def _ms(v: float | None) -> str:
    """A duration given in ms, with its unit (``20.3ms``, ``1.25s``)."""
    if v is None:
        return "-"
    if v >= 10_000:
        return f"{v / 1000:.1f}s"
    if v >= 1000:
        return f"{v / 1000:.2f}s"
    if v >= 100:
        return f"{v:.0f}ms"
    return f"{v:.1f}ms" if v >= 10 else f"{v:.2f}ms"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _lat_line(name: str, s: dict[str, Any], note: str = "") -> str:
    if not s["count"]:
        return f"{name:<10} -"
    parts = "  ".join(f"{k} {_ms(s[k])}" for k, _ in PERCENTILES)
    return f"{name:<10} {parts}  max {_ms(s['max'])}{note}"


def format_text(d: dict[str, Any]) -> str:
    """The human report of a JSON document ``d`` (as made by :func:`build_report`)."""
    spec = d["spec"]
    r = d["requests"]
    rate = d["rate"]
    lines = []
    if d["mode"] == "closed":
        load = f"closed loop, {spec['concurrency']} concurrent"
    elif d["mode"] == "find-max":
        load = "find-max (report of the best passing step)"
    else:
        load = f"open loop, target {rate['target']:.1f}/s" if rate["target"] else "open loop"
    lines.append(f"asyncvae loadtest: {load}, {d['duration_s']:.1f}s measured, "
                 f"{d['workers']} worker(s) → {spec['url']}")
    lines.append(f"request    {d['request']}")
    done = r["ok"] + r["failed"]
    lines.append(
        f"requests   {r['sent']} sent, {r['ok']} ok, {r['failed']} failed "
        f"({100 * d['error_rate']:.2f}% of {done}), {r['unfinished']} unfinished; "
        f"{r['warmup']} warm-up left out; peak in flight {r['peak_in_flight']}"
    )
    tgt = f"target {rate['target']:.1f}/s, " if rate["target"] else ""
    lines.append(f"rate       {tgt}sent {rate['sent']:.1f}/s, answered {rate['completed']:.1f}/s, ok {rate['ok']:.1f}/s")
    b = d["bytes"]
    lines.append(f"bytes      out {_bytes(b['out_per_s'])}/s, in {_bytes(b['in_per_s'])}/s "
                 f"(total out {_bytes(b['out'])}, in {_bytes(b['in'])})")
    corr = " (from the scheduled send time)" if d["mode"] != "closed" else " (from the send)"
    lines.append(_lat_line("latency", d["latency_ms"], corr))
    if d["mode"] != "closed":
        lines.append(_lat_line("service", d["service_ms"], " (from the actual send)"))
    lines.append(_lat_line("ttfb", d["ttfb_ms"]))
    if d["error_latency_ms"]["count"]:
        lines.append(_lat_line("failed", d["error_latency_ms"]))
    s = d["schedule"]
    if d["mode"] != "closed":
        lines.append(
            f"schedule   {s['late']} of {r['sent']} sends late (> {s['late_threshold_ms']:g} ms); "
            f"lag p50 {_ms(s['lag_ms']['p50'])}, p99 {_ms(s['lag_ms']['p99'])}, max {_ms(s['lag_ms']['max'])}"
        )
    if d["statuses"]:
        lines.append("statuses   " + ", ".join(f"{k}: {v}" for k, v in d["statuses"].items()))
    if d["errors"]:
        lines.append("errors     " + ", ".join(f"{k}: {v}" for k, v in d["errors"].items()))
    if d["retries"]:
        lines.append("retries    " + ", ".join(f"{k}: {v}" for k, v in d["retries"].items()))
    fm = d.get("find_max")
    if fm:
        lines.append(
            f"find-max   highest rate meeting p99 < {fm['slo_p99_ms']:g} ms and errors < "
            f"{100 * fm['max_error_rate']:g}%: "
            + (f"{fm['max_rate']:.1f}/s" if fm["max_rate"] else "none (even the first step failed)")
        )
        for st in fm["steps"]:
            lines.append(
                f"  step {st['rate']:8.1f}/s  p99 {_ms(st['p99_ms'])}  errors {100 * st['error_rate']:.2f}%  "
                f"answered {st['achieved']:.1f}/s  {'PASS' if st['ok'] else 'FAIL'}"
                + (" (rerun to confirm)" if st.get("attempt", 1) > 1 else "")
                + (f" ({st['why']})" if st.get("why") else "")
            )
    if s["fell_behind"]:
        behind = [w for w in s["workers"] if w["behind"]]
        lines.append(
            f"WARNING    the load generator fell behind its schedule ({len(behind)} of {len(s['workers'])} "
            f"worker(s)): {s['late']} sends ({100 * s['late_fraction']:.1f}%) went out more than "
            f"{s['late_threshold_ms']:g} ms late (max {_ms(s['lag_ms']['max'])}). Latency still counts "
            "from the schedule, but the client may be the bottleneck: add --workers or a faster machine"
        )
    q = d["queueing"]
    if q["growing"] and d["mode"] == "open":
        lines.append(
            f"NOTE       latency grows during the run (p50 {_ms(q['first_p50_ms'])} early → "
            f"{_ms(q['last_p50_ms'])} late): requests queue up; the endpoint is over capacity at this rate"
        )
    for t in d["thresholds"]:
        unit = t["unit"] if t["unit"] not in ("",) else ""
        lines.append(f"threshold  {'PASS' if t['ok'] else 'FAIL'} {t['expr']} (observed {t['observed']:.4g}{unit})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def check_plot_available() -> None:
    """Raise :class:`InputError` when matplotlib is missing (``--plot`` needs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed: pip install 'asyncvae[plot]'") from None


def write_plot(report: Report, path: str | Path) -> None:
    """A PNG with latency over time (p50/p99/max by scheduled time) and the latency
    percentile distribution (needs matplotlib)."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = report.data
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    tl = [iv for iv in d["timeline"] if iv["p50_ms"] is not None]
    t = [iv["t"] for iv in tl]
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        a1.plot(t, [iv[key] for iv in tl], label=label)
    a1.set_xlabel("scheduled time (s)")
    a1.set_ylabel("latency (ms)")
    a1.set_title("latency over time")
    a1.legend()
    a1.grid(alpha=0.3)
    h = report.latency
    if h is not None and h.get_total_count():
        xs, ys = [], []
        for p in (0, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999):
            xs.append(1 / (1 - p / 100) if p < 100 else 1e6)
            ys.append(percentile(h, p) / 1000)
        a2.plot(xs, ys, marker=".")
        a2.set_xscale("log")
        a2.set_xticks([1, 10, 100, 1000, 10000, 100000])
        a2.set_xticklabels(["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    a2.set_xlabel("percentile")
    a2.set_ylabel("latency (ms)")
    a2.set_title("latency by percentile (coordinated-omission corrected)")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
