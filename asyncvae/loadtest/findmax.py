"""``--find-max``: the highest arrival rate an endpoint sustains within a p99 SLO.

The search doubles the rate until a step fails, then bisects. Each step:

* lasts long enough for :attr:`FindMaxSpec.min_samples` answers and
  :attr:`FindMaxSpec.step_slos` SLOs (a 10 % overload must build a visible queue);
* passes when its p99 (from the schedule) is within the SLO, its error rate within
  the limit, at least 90 % of its scheduled requests ended ok, and its *sustained*
  rate (ok answers arriving per second while the schedule ran) is at least
  :attr:`FindMaxSpec.min_sustained` of the step's rate — counts over the scheduled
  window, so a slow endpoint that keeps up passes however long its latency;
* is *client-bound* when it would fail but the generator fell behind its schedule
  (its lag p99 over a tenth of the SLO), ran out of descriptors, or its in-flight
  cap was below rate × SLO: it bounds the search like a failure, but the report
  says "client-bound at N/s" instead of blaming the endpoint;
* with ``confirm``, runs twice whether it passed or failed, and a third time when
  the two disagree (majority), so noise biases the result neither up nor down.

The found rate is run once more for :attr:`FindMaxSpec.final_duration` and only then
reported as confirmed. The generator's worker processes stay up across steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Clock
from .report import Report, Threshold, build_report
from .runner import ProgressCallback, make_emitter
from .spec import FindMaxSpec, LoadSpec

__all__ = ["Step", "find_max", "step_verdict"]

#: Most seconds spent waiting for the endpoint to work off a failed step's queue.
MAX_RECOVERY = 30.0
#: A step is client-bound by lateness when the generator's lag p99 exceeds this share of the SLO.
LAG_SHARE = 0.1


@dataclass
class Step:
    """One run of the search: its rate, verdict (``pass``, ``fail``, ``client``), why,
    role (``""`` search, ``confirm``, ``final``) and report."""

    rate: float
    verdict: str
    why: str
    role: str
    report: Report

    def row(self) -> dict[str, Any]:
        d = self.report.data
        return {
            "rate": self.rate, "verdict": self.verdict, "ok": self.verdict == "pass", "why": self.why,
            "role": self.role, "window_s": d["window_s"], "samples": d["requests"]["ok"],
            "p50_ms": d["latency_ms"]["p50"], "p99_ms": d["latency_ms"]["p99"], "error_rate": d["error_rate"],
            "ok_rate": d["rate"]["ok"], "sustained_rate": d["rate"]["sustained"],
            "late_fraction": d["schedule"]["late_fraction"],
            "pids": sorted(w.get("pid", 0) for w in d["schedule"]["workers"]),
        }


def _client_bound(d: dict[str, Any], rate: float, slo_s: float) -> str:
    """Why the generator, not the endpoint, limited this step ("" when it did not)."""
    r, cap = d["requests"], d["inflight_cap"]
    if r["client_errors"]:
        kinds = ", ".join(k for k in d["errors"] if k.startswith("client_"))
        return f"{r['client_errors']} failures of the generator itself ({kinds})"
    lag_p99 = d["schedule"]["lag_ms"]["p99"] or 0.0
    if d["schedule"]["fell_behind"] and lag_p99 > LAG_SHARE * slo_s * 1000:
        own = d["schedule"]["late"] - d["schedule"].get("late_capped", 0)
        return (f"the generator fell behind its schedule ({own} sends late without waiting for the cap, "
                f"lag p99 {lag_p99:.0f} ms)")
    if cap["reached"] and cap["limit"] is not None and cap["limit"] < rate * slo_s:
        return f"the in-flight cap {cap['limit']} ({cap['reason']}) is below rate × SLO = {rate * slo_s:.0f}"
    return ""


def step_verdict(d: dict[str, Any], rate: float, fm: FindMaxSpec) -> tuple[str, str]:
    """(``pass`` | ``fail`` | ``client``, why) of one step's report ``d`` at ``rate``."""
    r = d["requests"]
    why = []
    p99 = d["latency_ms"]["p99"]
    if not r["ok"]:
        why.append("no successful answer")
    elif p99 is not None and p99 > fm.slo_p99_ms:
        why.append(f"p99 {p99:.1f} ms > {fm.slo_p99_ms:g} ms")
    er = d["error_rate"]
    if er is not None and er > fm.max_error_rate:
        why.append(f"errors {100 * er:.2f}% > {100 * fm.max_error_rate:g}%")
    if r["scheduled"] and r["ok"] < 0.9 * r["scheduled"]:
        why.append(f"only {r['ok']} of {r['scheduled']} scheduled requests ended ok")
    elif r["ok"] and r["ok"] < fm.min_samples:
        why.append(f"only {r['ok']} ok answers (< {fm.min_samples} samples)")
    sus = d["rate"]["sustained"]
    if sus is not None and sus < fm.min_sustained * rate:
        why.append(f"sustained {sus:.1f}/s < {100 * fm.min_sustained:g}% of {rate:.1f}/s")
    client = _client_bound(d, rate, fm.slo_p99_ms / 1000)
    if client and (why or r["client_errors"]):
        return "client", client + ("; " + "; ".join(why) if why else "")
    return ("fail", "; ".join(why)) if why else ("pass", "")


class _Search:
    """State of one find-max search."""

    def __init__(self, spec: LoadSpec, gen: Any, *, progress: ProgressCallback | None, clock: Clock,
                 description: str, started: str, stop: asyncio.Event | None):
        fm = spec.find_max
        assert fm is not None
        self.fm = fm
        self.spec = spec
        self.gen = gen
        self.progress = progress
        self.clock = clock
        self.description = description
        self.started = started
        self.stop = stop
        slo_s = fm.slo_p99_ms / 1000
        self.drain = spec.drain_timeout if spec.drain_timeout is not None else max(4 * slo_s, 1.0)
        self.steps: list[Step] = []
        self.lo: float | None = None
        self.hi: float | None = None
        self.best: Step | None = None
        self.client_bound_at: float | None = None

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def step_spec(self, rate: float, length: float) -> LoadSpec:
        return self.spec.replace(find_max=None, rate=rate, stages=(), concurrency=None, duration=length,
                                 requests=None, warmup=self.fm.step_warmup, warmup_requests=0,
                                 drain_timeout=self.drain, start_at=None)

    async def run_step(self, rate: float, role: str = "", length: float | None = None) -> Step:
        spec = self.step_spec(rate, length or self.fm.step_length(rate))
        phase = f"find-max step {len(self.steps) + 1} @ {rate:.1f}/s" + (f" ({role})" if role else "")
        rec = await self.gen.run(spec, stop=self.stop, emit=make_emitter(self.progress, spec, phase))
        rep = build_report(rec, spec=spec.redacted(), mode="open", request=self.description, target_rate=rate,
                           started_at=self.started, workers=self.gen.workers)
        verdict, why = step_verdict(rep.data, rate, self.fm)
        step = Step(rate, verdict, why, role, rep)
        self.steps.append(step)
        await self.recover(rec.unfinished, rep)
        return step

    async def recover(self, unfinished: int, rep: Report) -> None:
        """Give the endpoint time to work off what a failed step left queued."""
        if self.stopped:
            return
        if unfinished:
            per_s = max(rep.data["rate"]["sustained"] or rep.data["rate"]["ok"], 1.0)
            await self.clock.sleep(min(MAX_RECOVERY, unfinished / per_s))
        await self.clock.sleep(0.2)

    async def judge(self, rate: float) -> Step:
        """The verdict at ``rate``: one run, or (``confirm``) two that agree, else the
        majority of three (``fail`` when all three differ)."""
        runs: list[Step] = []
        for n in range(3 if self.fm.confirm else 1):
            if n and (self.stopped or len(self.steps) >= self.fm.max_steps):
                break
            runs.append(await self.run_step(rate, "confirm" if n else ""))
            if self.stopped or (n == 1 and runs[0].verdict == runs[1].verdict):
                break
        for verdict in ("pass", "client", "fail"):
            same = [s for s in runs if s.verdict == verdict]
            if 2 * len(same) > len(runs) or (len(runs) == 1 and same):
                return same[-1]
        return next((s for s in reversed(runs) if s.verdict == "fail"), runs[-1])

    def next_rate(self, rate: float) -> float | None:
        fm = self.fm
        if self.hi is None:
            return None if rate >= fm.max_rate else min(rate * 2, fm.max_rate)
        if self.lo is None:
            return self.hi / 2 if self.hi / 2 >= 0.01 else None
        if (self.hi - self.lo) / self.lo <= fm.precision:
            return None
        return (self.lo + self.hi) / 2

    async def search(self) -> None:
        rate = self.fm.start_rate
        while len(self.steps) < self.fm.max_steps and not self.stopped:
            step = await self.judge(rate)
            if self.stopped:
                break
            if step.verdict == "pass":
                self.lo, self.best = rate, step
            else:  # a client-bound rate bounds the search like a failing one, and is reported
                self.hi = rate
                if step.verdict == "client":
                    self.client_bound_at = min(rate, self.client_bound_at or rate)
            nxt = self.next_rate(rate)
            if nxt is None:
                break
            rate = nxt

    async def confirm(self) -> Step | None:
        """Run the found rate once more (longer); step down by ``precision`` when it fails."""
        fm = self.fm
        length = fm.final_duration or 3 * fm.step_length(self.lo or fm.start_rate)
        for _ in range(3):
            if self.lo is None or self.stopped:
                return None
            step = await self.run_step(self.lo, "final", length)
            if step.verdict == "pass":
                return step
            if self.stopped:
                return None
            if step.verdict == "client":
                self.client_bound_at = min(self.lo, self.client_bound_at or self.lo)
            self.hi, self.lo = self.lo, self.lo * (1 - fm.precision)
        return None

    def result(self, final: Step | None, thresholds: Sequence[Threshold]) -> Report:
        chosen = final or self.best or (self.steps[-1] if self.steps else None)
        assert chosen is not None and chosen.report.recorder is not None
        rec = chosen.report.recorder
        rec.interrupted = rec.interrupted or self.stopped
        fm = self.fm
        fm_data = {
            "slo_p99_ms": fm.slo_p99_ms,
            "max_error_rate": fm.max_error_rate,
            "max_rate": final.rate if final else (self.best.rate if self.best else None),
            "confirmed": final is not None,
            "client_bound_at": self.client_bound_at,
            "bracket": [self.lo, self.hi],
            "precision": fm.precision,
            "steps": [s.row() for s in self.steps],
        }
        return build_report(
            rec, spec=self.spec.redacted(), mode="find-max", request=self.description, target_rate=chosen.rate,
            started_at=self.started, workers=self.gen.workers, thresholds=list(thresholds), find_max=fm_data,
        )


async def find_max(spec: LoadSpec, gen: Any, *, thresholds: Sequence[Threshold], progress: ProgressCallback | None,
                   clock: Clock, description: str, started: str, stop: asyncio.Event | None) -> Report:
    """Run the search of ``spec.find_max`` on the generator ``gen`` (see the module doc)."""
    s = _Search(spec, gen, progress=progress, clock=clock, description=description, started=started, stop=stop)
    await s.search()
    final = await s.confirm()
    return s.result(final, thresholds)
