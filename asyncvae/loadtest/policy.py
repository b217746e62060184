"""The load tester's one retry decision: the client's own :class:`RetryPolicy`
(``asyncvae._retry``) built from the run's :class:`asyncvae.Retry`, asked once per
failed attempt through :meth:`RetryPolicy.decide` — the same retry / stop / wait
strategies ``Client`` runs, on the load tester's clock (virtual in the simulator).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .._retry import CallContext, RetryPolicy
from ..config import Retry

__all__ = ["RetryState", "make_policy", "next_retry"]


@dataclass
class RetryState:
    """One request's retry bookkeeping: attempts made, and the policy's per-call context
    (when the first 503 came)."""

    attempts: int = 0
    ctx: CallContext = field(default_factory=CallContext)


def make_policy(retry: Retry | None, clock: object, rng: random.Random) -> RetryPolicy | None:
    """The client's policy for ``retry`` on ``clock`` (an object with ``now()``), or None."""
    if retry is None:
        return None
    return RetryPolicy(retry, clock=clock.now, rng=rng)  # type: ignore[attr-defined]


def next_retry(policy: RetryPolicy | None, error: BaseException, state: RetryState) -> float | None:
    """Seconds to wait before the next attempt after ``error`` ended attempt number
    ``state.attempts``, or ``None`` to give up."""
    if policy is None:
        return None
    return policy.decide(error, state.attempts, state.ctx)
