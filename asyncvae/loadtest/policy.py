"""The load tester's one retry decision, over the client's policy object
(:class:`asyncvae.Retry`).

It follows ``Client``'s retry loop rule for rule: retry only what a retry can cure
(``Retry.statuses``, retryable transport/protocol errors), up to ``attempts``, except
that 503 answers ("replica starting") keep being retried for
``unavailable_patience`` seconds; wait what ``Retry-After`` asks (capped), else the
backoff with jitter.

SWITCH POINT: once the client's retry policy is a single object with a
``decide(error, state) -> wait | None`` method, :func:`next_retry` becomes a call to
it and :class:`RetryState` its state; nothing else in the load tester retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import Retry
from ..errors import EndpointError, ProtocolError, TransportError

__all__ = ["RetryState", "next_retry", "retryable"]


@dataclass
class RetryState:
    """One request's retry bookkeeping: attempts made, when the first 503 came."""

    attempts: int = 0
    first_503: float | None = None


def retryable(policy: Retry, error: BaseException) -> bool:
    """Whether a new attempt could cure ``error`` (the client's ``_retryable``)."""
    if isinstance(error, EndpointError):
        return error.status in policy.statuses
    return isinstance(error, (TransportError, ProtocolError)) and error.retryable


def next_retry(policy: Retry | None, error: BaseException, state: RetryState, now: float,
               rng: random.Random) -> float | None:
    """Seconds to wait before the next attempt after ``error`` ended attempt number
    ``state.attempts``, or ``None`` to give up (no policy, not retryable, attempts
    spent and no 503 patience left)."""
    if policy is None or not retryable(policy, error):
        return None
    patient = False
    if isinstance(error, EndpointError) and error.status == 503 and policy.unavailable_patience > 0:
        if state.first_503 is None:
            state.first_503 = now
        patient = now - state.first_503 < policy.unavailable_patience
    if not patient and state.attempts >= policy.attempts:
        return None
    retry_after = error.retry_after if isinstance(error, EndpointError) else None
    return policy.wait_for(state.attempts, retry_after, rng)
