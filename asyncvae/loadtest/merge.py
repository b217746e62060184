"""``asyncvae loadtest merge A.json B.json ...``: one report from runs on several
machines. Histograms are added exactly (HdrHistogram), counts summed, timelines lined
up by each run's schedule start (Unix time; start them together with ``--start-at``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from .recorder import Recorder
from .report import Report, Threshold, build_report, recorder_of

__all__ = ["load_report", "merge_reports"]


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``--json`` report (raises :class:`InputError` saying what is wrong)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such report (write one with --json FILE)") from None
    except ValueError as e:
        raise InputError(f"{p}: not a JSON report: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: not a load test report")
    return data


def _same(docs: Sequence[dict[str, Any]], get: Any) -> Any:
    vals = {json.dumps(get(d), sort_keys=True) for d in docs}
    return get(docs[0]) if len(vals) == 1 else None


def merge_reports(docs: Sequence[dict[str, Any]], *, names: Sequence[str] = (),
                  thresholds: Sequence[Threshold] = ()) -> Report:
    """One report of the runs ``docs`` (JSON documents), as if one generator had sent
    all their requests. Refuses find-max reports and runs with different intervals."""
    if len(docs) < 2:
        raise InputError("merge needs two or more --json reports")
    if any(d.get("mode") == "find-max" for d in docs):
        raise InputError("find-max reports can't be merged (their figures are of one step); merge fixed-rate runs")
    recs = [recorder_of(d) for d in docs]
    if len({r.interval for r in recs}) != 1:
        raise InputError("these runs used different --interval values; run them with the same one")
    notes = []
    epochs = [r.origin_epoch for r in recs]
    spread = 0.0
    if all(e is not None for e in epochs):
        base = min(e for e in epochs if e is not None)
        spread = max(e for e in epochs if e is not None) - base
        recs = [r.shifted(e - base) for r, e in zip(recs, epochs, strict=True) if e is not None]
    if spread > recs[0].interval:
        notes.append(f"the runs' schedules started {spread:.1f} s apart, so their rates add up only where they "
                     "overlapped; start them together with --start-at")
    merged = Recorder.merge(recs)
    merged.workers = [dict(w, run=k) for k, r in enumerate(recs) for w in r.workers]
    targets = [d["rate"]["target"] for d in docs]
    spec = dict(docs[0]["spec"])
    spec["merged_from"] = list(names) or [f"run {k + 1}" for k in range(len(docs))]
    url = _same(docs, lambda d: d["spec"]["url"])
    if url is None:
        spec["url"] = "several endpoints"
        notes.append("the runs targeted different endpoints")
    request = _same(docs, lambda d: d["request"]) or "several requests"
    report = build_report(
        merged, spec=spec, mode="merged", request=request,
        target_rate=sum(targets) if all(t is not None for t in targets) else None,
        started_at=min(d["started_at"] for d in docs), workers=sum(int(d["workers"]) for d in docs),
        thresholds=list(thresholds),
    )
    report.data["merge"] = {"runs": len(docs), "start_spread_s": round(spread, 3), "notes": notes}
    return report
