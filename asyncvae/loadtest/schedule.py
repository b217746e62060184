"""Open-loop arrival schedules: when each request is due, as pure functions.

A schedule is a list of :class:`~asyncvae.loadtest.spec.Stage` s (a rate held or ramped
linearly over a duration). Arrival *n* is due at the time *t* where the cumulative
rate Λ(t) = ∫ rate reaches ``n + phase`` ("uniform", evenly spaced like wrk2), or at
Λ(t) = a running sum of Exp(1) draws ("poisson"). ``phase`` interleaves the
generators of several workers: worker *k* of *N* uses ``phase = k / N``, so their
union is the one-process schedule.

A warm-up replays the start of the schedule (its first ``warmup`` seconds) before
the measured schedule starts from its beginning: a ramp from 0 warms up from 0, not
at its end rate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import InputError
from .spec import Stage

__all__ = [
    "Schedule",
    "arrival_times",
    "cut_stages",
    "expected_count",
    "measured_window",
    "prefix_stages",
    "seconds_for_count",
]


def _tau(lam: float, r0: float, r1: float, duration: float | None) -> float | None:
    """Seconds into a stage at which its cumulative arrivals reach ``lam`` (None: never)."""
    if lam <= 0:
        return 0.0
    a = 0.0 if duration is None else (r1 - r0) / (2 * duration)
    disc = r0 * r0 + 4 * a * lam
    if disc < 0:
        return None
    den = r0 + math.sqrt(disc)
    if den <= 0:
        return None
    return 2 * lam / den


def arrival_times(
    stages: Iterable[Stage],
    *,
    phase: float = 0.0,
    arrival: str = "uniform",
    rng: random.Random | None = None,
    limit_time: float | None = None,
    limit_count: int | None = None,
) -> Iterator[float]:
    """Scheduled send times (seconds from the start, non-decreasing) of ``stages``.

    Stops at the end of the last stage, at ``limit_time`` seconds, or after
    ``limit_count`` arrivals, whichever comes first.
    """
    if arrival not in ("uniform", "poisson"):
        raise ValueError(f"arrival={arrival!r}")
    rng = rng or random.Random(0)
    target = phase if arrival == "uniform" else rng.expovariate(1.0)
    count = 0
    t0 = 0.0
    cum = 0.0  # cumulative arrivals (Λ) at the start of the stage
    if limit_count is not None and limit_count <= 0:
        return
    for st in stages:
        total = math.inf if st.duration is None else (st.start_rate + st.end_rate) / 2 * st.duration
        flat = st.start_rate == st.end_rate
        while target < cum + total:
            if flat:  # a held rate: no square root
                tau: float | None = (target - cum) / st.start_rate if st.start_rate else None
            else:
                tau = _tau(target - cum, st.start_rate, st.end_rate, st.duration)
            if tau is None:
                break
            t = t0 + tau
            if st.duration is not None:
                t = min(t, t0 + st.duration)
            if limit_time is not None and t >= limit_time:
                return
            yield t
            count += 1
            if limit_count is not None and count >= limit_count:
                return
            target += 1.0 if arrival == "uniform" else rng.expovariate(1.0)
        if st.duration is None:
            return
        cum += total
        t0 += st.duration


def expected_count(stages: Iterable[Stage]) -> float:
    """Expected number of arrivals of finite ``stages``."""
    return sum((s.start_rate + s.end_rate) / 2 * (s.duration or 0.0) for s in stages)


def cut_stages(stages: Iterable[Stage], seconds: float | None) -> tuple[Stage, ...]:
    """The first ``seconds`` of ``stages`` (all of them when ``None``); an endless
    stage becomes ``seconds`` long."""
    out: list[Stage] = []
    left = math.inf if seconds is None else seconds
    for st in stages:
        if left <= 0:
            break
        if st.duration is None:
            out.append(Stage(st.start_rate, st.end_rate, None if math.isinf(left) else left))
            break
        if st.duration <= left:
            out.append(st)
            left -= st.duration
        else:
            out.append(st.cut(left))
            left = 0
    return tuple(out)


def prefix_stages(stages: tuple[Stage, ...], seconds: float) -> tuple[Stage, ...]:
    """The first ``seconds`` of ``stages``, holding the last rate where they end sooner
    (the warm-up: a replay of the start of the schedule)."""
    if seconds <= 0 or not stages:
        return ()
    out = cut_stages(stages, seconds)
    have = sum(s.duration or 0.0 for s in out)
    if out and out[-1].duration is not None and have < seconds - 1e-12:
        r = stages[-1].end_rate
        out = (*out, Stage(r, r, seconds - have))
    return out


def seconds_for_count(stages: tuple[Stage, ...], count: float) -> float | None:
    """When the cumulative arrivals of ``stages`` reach ``count`` (``None``: never)."""
    t0, cum = 0.0, 0.0
    for st in stages:
        total = math.inf if st.duration is None else (st.start_rate + st.end_rate) / 2 * st.duration
        if count <= cum + total:
            tau = _tau(count - cum, st.start_rate, st.end_rate, st.duration)
            return None if tau is None else t0 + tau
        if st.duration is None:
            return None
        cum += total
        t0 += st.duration
    return None


def warmup_seconds(stages: tuple[Stage, ...], warmup_requests: int) -> float:
    """The length of the schedule's start that holds ``warmup_requests`` arrivals (the
    whole generator's, before the split across workers)."""
    if warmup_requests <= 0:
        return 0.0
    t = seconds_for_count(stages, warmup_requests)
    if t is None:  # the stages end sooner: hold their last rate
        last = stages[-1]
        have = expected_count(stages)
        if last.end_rate <= 0:
            raise InputError(
                f"a warm-up of {warmup_requests} requests can't be sent: the schedule holds only {have:.0f} "
                "and ends at 0/s; give the warm-up in seconds (e.g. --warmup 5s)"
            )
        t = sum(s.duration or 0.0 for s in stages) + (warmup_requests - have) / last.end_rate
    return t


def measured_window(stages: tuple[Stage, ...], limit_time: float | None,
                    limit_count: int | None) -> tuple[float, float]:
    """(seconds, expected arrivals) of the measured schedule: ``stages`` cut at
    ``limit_time``, ending after ``limit_count`` arrivals where that comes first
    (``count / rate`` for a held rate: the last arrival's own slot included)."""
    cut = cut_stages(stages, limit_time)
    total_time = sum(s.duration or math.inf for s in cut) if cut else 0.0
    if limit_count is not None:
        t = seconds_for_count(cut, limit_count)
        if t is not None and t <= total_time:
            return t, float(limit_count)
    return total_time, expected_count(cut)


@dataclass
class Schedule:
    """The open-loop arrivals of one generator process.

    Iterating yields ``(offset seconds, measured)``: first the warm-up (a replay of
    the first ``warmup`` seconds of ``stages``), then the measured schedule, offset by
    ``warmup``, ending at ``limit_time`` measured seconds or after ``limit_count``
    measured arrivals. ``rate_factor`` is the whole generator's rate over this
    process's (its number of workers): it closes a count-limited window one global
    arrival gap after the last one. After iteration ``window`` is the measured window
    ``(start, end)`` in offsets.
    """

    stages: tuple[Stage, ...]
    warmup: float = 0.0
    limit_time: float | None = None
    limit_count: int | None = None
    arrival: str = "uniform"
    phase: float = 0.0
    seed: int = 0
    rate_factor: float = 1.0
    window: tuple[float, float] | None = field(default=None, init=False)

    def planned_end(self) -> float | None:
        """The measured window's end when time, not a count, ends it."""
        cut = cut_stages(self.stages, self.limit_time)
        if not cut or cut[-1].duration is None:
            return None
        return self.warmup + sum(s.duration or 0.0 for s in cut)

    def __iter__(self) -> Iterator[tuple[float, bool]]:
        rng = random.Random(self.seed * 1_000_003 + int(self.phase * 1_000_003))
        if self.warmup > 0:
            for t in arrival_times(prefix_stages(self.stages, self.warmup), phase=self.phase,
                                   arrival=self.arrival, rng=rng, limit_time=self.warmup):
                yield t, False
        w = self.warmup
        time_end = self.planned_end()
        last: float | None = None
        count = 0
        for t in arrival_times(self.stages, phase=self.phase, arrival=self.arrival, rng=rng,
                               limit_time=self.limit_time, limit_count=self.limit_count):
            last = t
            count += 1
            yield w + t, True
        end = time_end
        if self.limit_count is not None and count >= self.limit_count and last is not None:
            end = w + last + 1.0 / max(self._rate_at(last) * self.rate_factor, 1e-9)
            if time_end is not None:
                end = min(end, time_end)
        if end is None:  # pragma: no cover - an endless stage always has a count limit
            end = w + (last or 0.0)
        self.window = (w, end)

    def _rate_at(self, t: float) -> float:
        t0 = 0.0
        for st in self.stages:
            if st.duration is None or t < t0 + st.duration:
                return st.rate_at(t - t0)
            t0 += st.duration
        return self.stages[-1].end_rate
