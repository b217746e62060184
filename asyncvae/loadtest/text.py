"""The human-readable report of a load test's JSON document, one section per function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .hist import PERCENTILES

__all__ = ["fmt_ms", "format_text"]


def fmt_ms(v: float | None) -> str:
    """A duration given in ms, with its unit (``20.3ms``, ``1.25s``); ``-`` for no data."""
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
        return f"{name:<10} no data{note}"
    parts = "  ".join(f"{k} {fmt_ms(s[k])}" for k, _ in PERCENTILES)
    return f"{name:<10} {parts}  max {fmt_ms(s['max'])}{note}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _header(d: dict[str, Any]) -> list[str]:
    spec, rate = d["spec"], d["rate"]
    if d["mode"] == "closed":
        load = f"closed loop, {spec['concurrency']} concurrent"
    elif d["mode"] == "find-max":
        load = "find-max (figures of the final confirmation run)"
    elif d["mode"] == "merged":
        load = f"merged from {len(spec.get('merged_from') or [])} runs"
    else:
        load = f"open loop, target {rate['target']:.1f}/s" if rate["target"] else "open loop"
    window = "window" if d["mode"] == "closed" else "scheduled window"
    lines = [f"asyncvae loadtest: {load}, {d['window_s']:.1f}s {window}, {d['workers']} worker(s) → {spec['url']}"]
    if d.get("interrupted"):
        lines.append("INTERRUPTED the run was stopped early (Ctrl-C); every figure covers what ran until then")
    lines.append(f"request    {d['request']}")
    return lines


def _counts(d: dict[str, Any]) -> list[str]:
    r, rate = d["requests"], d["rate"]
    ended = r["ok"] + r["failed"]
    lines = [
        f"requests   {r['sent']} sent, {r['answered']} answered, {r['ok']} ok, {r['failed']} failed "
        f"({_pct(d['error_rate'])} of {ended}), {r['unfinished']} unfinished; {r['warmup']} warm-up left out; "
        f"peak in flight {r['peak_in_flight']}"
    ]
    tgt = f"target {rate['target']:.1f}/s, " if rate["target"] else ""
    per = "per second of the window" if d["mode"] == "closed" else "per second of the schedule"
    sus = f"; sustained {rate['sustained']:.1f}/s (ok answers arriving while it ran)" if rate["sustained"] else ""
    lines.append(f"rate       {tgt}sent {rate['sent']:.1f}/s, answered {rate['answered']:.1f}/s, "
                 f"ok {rate['ok']:.1f}/s ({per}){sus}")
    b = d["bytes"]
    lines.append(f"bytes      out {_bytes(b['out_per_s'])}/s, in {_bytes(b['in_per_s'])}/s "
                 f"(total out {_bytes(b['out'])}, in {_bytes(b['in'])})")
    return lines


def _latencies(d: dict[str, Any]) -> list[str]:
    lb = d["requests"]["lower_bounds"]
    bounds = f"; {lb} without an answer counted as lower bounds" if lb else ""
    corr = f" (from the scheduled send time{bounds})" if d["mode"] != "closed" else f" (from the send{bounds})"
    lines = [_lat_line("latency", d["latency_ms"], corr)]
    if d["mode"] != "closed":
        lines.append(_lat_line("service", d["service_ms"], " (ok answers, from the actual send)"))
    lines.append(_lat_line("ttfb", d["ttfb_ms"]))
    if d["error_latency_ms"]["count"]:
        lines.append(_lat_line("failed", d["error_latency_ms"]))
    return lines


def _schedule(d: dict[str, Any]) -> list[str]:
    s, r = d["schedule"], d["requests"]
    lines = []
    if d["mode"] != "closed" and r["sent"]:
        lag = s["lag_ms"]
        lines.append(f"schedule   {s['late']} of {r['sent']} sends late (> {s['late_threshold_ms']:g} ms); "
                     f"lag p50 {fmt_ms(lag['p50'])}, p99 {fmt_ms(lag['p99'])}, max {fmt_ms(lag['max'])}")
    for key, name in (("statuses", "statuses"), ("errors", "errors"), ("retries", "retries")):
        if d[key]:
            lines.append(f"{name:<10} " + ", ".join(f"{k}: {v}" for k, v in d[key].items()))
    return lines


def _mix(d: dict[str, Any]) -> list[str]:
    if not d.get("mix"):
        return []
    lines = ["mix"]
    for m in d["mix"]:
        lines.append(f"  {m['label']:<28} sent {m['sent']:>7}  ok {m['ok']:>7}  failed {m['failed']:>5}  "
                     f"p50 {fmt_ms(m['p50_ms']):>7}  p99 {fmt_ms(m['p99_ms']):>7}")
    return lines


def _find_max(d: dict[str, Any]) -> list[str]:
    fm = d.get("find_max")
    if not fm:
        return []
    if fm["max_rate"]:
        found = f"{fm['max_rate']:.1f}/s" + (" (confirmed by a final run)" if fm.get("confirmed") else
                                             " (NOT confirmed: the final run failed)")
    else:
        found = "none (even the first step failed)"
    lines = [f"find-max   highest rate meeting p99 < {fm['slo_p99_ms']:g} ms and errors < "
             f"{100 * fm['max_error_rate']:g}%: {found}"]
    if fm.get("client_bound_at"):
        lines.append(f"           client-bound at {fm['client_bound_at']:.1f}/s: the generator could not keep "
                     "that schedule, so the endpoint's limit may be higher (add --workers or machines)")
    for st in fm["steps"]:
        lines.append(
            f"  step {st['rate']:8.1f}/s  p99 {fmt_ms(st['p99_ms']):>7}  errors {_pct(st['error_rate']):>7}  "
            f"ok {st['ok_rate']:.1f}/s  sustained {st['sustained_rate'] or 0:.1f}/s  {st['verdict'].upper()}"
            + (f" [{st['role']}]" if st.get("role") else "")
            + (f" ({st['why']})" if st.get("why") else "")
        )
    return lines


def _warnings(d: dict[str, Any]) -> list[str]:
    s, r, cap = d["schedule"], d["requests"], d["inflight_cap"]
    lines = []
    if r["client_errors"]:
        lines.append(f"WARNING    {r['client_errors']} failure(s) were the load generator's own "
                     f"({', '.join(k for k in d['errors'] if k.startswith('client_'))}), not the endpoint's")
    if cap["reached"]:
        lines.append(f"NOTE       the in-flight cap of {cap['limit']} ({cap['reason']}) was reached: {cap['reached']} "
                     "sends waited for a free slot (the open loop turned closed); their latency still counts "
                     "from the schedule")
    if s["fell_behind"]:
        behind = [w for w in s["workers"] if w["behind"]]
        own = s["late"] - s.get("late_capped", 0)
        lines.append(
            f"WARNING    the load generator fell behind its schedule ({len(behind)} of {len(s['workers'])} "
            f"worker(s)): {own} sends went out more than {s['late_threshold_ms']:g} ms late without waiting "
            f"for the in-flight cap (max lag {fmt_ms(s['lag_ms']['max'])}). Latency still counts from the "
            "schedule, but the client may be the bottleneck: add --workers or a faster machine"
        )
    for note in (d.get("merge") or {}).get("notes", []):
        lines.append(f"WARNING    {note}")
    q = d["queueing"]
    if q["growing"] and d["mode"] == "open":
        lines.append(
            f"NOTE       latency grows during the run (p50 {fmt_ms(q['first_p50_ms'])} early → "
            f"{fmt_ms(q['last_p50_ms'])} late): requests queue up; the endpoint is over capacity at this rate"
        )
    return lines


def _thresholds(d: dict[str, Any]) -> list[str]:
    lines = []
    for t in d["thresholds"]:
        seen = "no data" if t["observed"] is None else f"observed {t['observed']:.4g}{t['unit']}"
        lines.append(f"threshold  {'PASS' if t['ok'] else 'FAIL'} {t['expr']} ({seen})")
    return lines


SECTIONS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _header, _counts, _latencies, _schedule, _mix, _find_max, _warnings, _thresholds,
)


def format_text(d: dict[str, Any]) -> str:
    """The human report of a JSON document ``d`` (as made by :func:`~asyncvae.loadtest.report.build_report`)."""
    return "\n".join(line for section in SECTIONS for line in section(d))
