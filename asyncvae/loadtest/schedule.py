"""Open-loop arrival schedules: when each request is due, as pure functions.

A schedule is a list of :class:`~asyncvae.loadtest.spec.Stage` s (a rate held or ramped
linearly over a duration). Arrival *n* is due at the time *t* where the cumulative
rate Λ(t) = ∫ rate reaches ``n + phase`` ("uniform", evenly spaced like wrk2), or at
Λ(t) = a running sum of Exp(1) draws ("poisson"). ``phase`` interleaves the
generators of several workers: worker *k* of *N* uses ``phase = k / N``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator

from .spec import Stage

__all__ = ["arrival_times", "expected_count", "with_warmup"]


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
    for st in stages:
        total = math.inf if st.duration is None else (st.start_rate + st.end_rate) / 2 * st.duration
        while target < cum + total:
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


def with_warmup(stages: tuple[Stage, ...], warmup_s: float) -> tuple[Stage, ...]:
    """``stages`` preceded by ``warmup_s`` seconds at the first stage's starting rate."""
    if warmup_s <= 0 or not stages:
        return stages
    r = stages[0].start_rate or stages[0].end_rate
    return (Stage(r, r, warmup_s), *stages)
