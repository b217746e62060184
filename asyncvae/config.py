"""Configuration as small immutable value objects: :class:`Limits`, :class:`Timeout`, :class:`Retry`.

Each is a frozen dataclass with documented defaults; derive variants with
:meth:`replace` (``Retry().replace(attempts=10)``). They are checked when made, so
a bad value fails at construction with a message, not deep inside a request.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import RETRYABLE_STATUSES, InputError

__all__ = ["Limits", "Retry", "Timeout"]

T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30


def _positive(obj: Any, *names: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None and allow_none:
            continue
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v >= 0 if allow_zero else v > 0)
        if not ok:
            raise InputError(
                f"{type(obj).__name__}.{n}={v!r} must be a {'non-negative' if allow_zero else 'positive'} number"
                + (" or None" if allow_none else "")
            )


class _Value:
    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (the object itself is immutable)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class Limits(_Value):
    """How much a :class:`~asyncvae.Client` may have going at once.

    Attributes:
        max_concurrency: items in flight at once, over all endpoints and callers
            (default 64): FIFO request slots; a coalesced batch of k items holds k.
            Each endpoint replica serves one request at a time and queues the rest, so
            a few per replica keep every queue non-empty.
        max_queued: items a ``decode_many``/``encode_many`` reads ahead of sending
            (default 256), so a slow input never leaves a slot idle.
        max_inflight_bytes: answer bytes being received and converted, reserved before
            each request is sent from the size the request implies (default 1 GiB);
            a ``*_many`` starts no new item unless the results its consumer has not
            taken, its answers on the way and one more answer fit in it, and reads
            ahead at most 1/16 of it in request bodies.
            One answer larger than the whole budget is let through alone.
        max_response_bytes: the largest response accepted (default 4 GiB); a server
            declaring more gets a :class:`~asyncvae.ProtocolError` before any allocation.
        max_connections_per_host: TCP connections per endpoint host; 0 means
            ``max_concurrency`` (default 0).
        keepalive_timeout: seconds an idle pooled connection is kept (default 30).
        max_reorder: how many items a ``*_many`` may hold taken but not yet handed over
            (how far it runs ahead of a slow item); 0 means ``max_concurrency + max_queued``.
        max_batch: request coalescing — up to this many items with the same shape,
            dtype and options (tensor outputs only) are sent as one batched request and
            split back (default 1: off).
        max_batch_wait: seconds a partial batch waits for more items (default 0.005).
    """

    max_concurrency: int = 64
    max_queued: int = 256
    max_inflight_bytes: int = 1 * GiB
    max_response_bytes: int = 4 * GiB
    max_connections_per_host: int = 0
    keepalive_timeout: float = 30.0
    max_reorder: int = 0
    max_batch: int = 1
    max_batch_wait: float = 0.005

    def __post_init__(self) -> None:
        _positive(self, "max_concurrency", "max_queued", "max_inflight_bytes", "max_response_bytes", "max_batch")
        _positive(self, "max_connections_per_host", "max_reorder", "keepalive_timeout", "max_batch_wait", allow_zero=True)
        for n in ("max_concurrency", "max_queued", "max_inflight_bytes", "max_response_bytes",
                  "max_connections_per_host", "max_reorder", "max_batch"):
            if not isinstance(getattr(self, n), int):
                raise InputError(f"Limits.{n} must be an int, got {getattr(self, n)!r}")

    @property
    def reorder_window(self) -> int:
        return self.max_reorder or (self.max_concurrency + self.max_queued)

    @property
    def connections_per_host(self) -> int:
        return self.max_connections_per_host or self.max_concurrency


@dataclass(frozen=True)
class Timeout(_Value):
    """Time limits, in seconds; ``None`` disables one.

    Attributes:
        connect: to open a TCP (and TLS) connection (default 10).
        read: between two chunks of the response, including the wait for the first
            byte while the endpoint queues and computes (default 120).
        attempt: one whole attempt, send to last byte (default None).
        total: one whole call from the moment it is made: the waits for room (budget,
            a request slot), every attempt and backoff (default None). A call whose
            deadline passes while it waits sends nothing, and no attempt starts with
            less than 10 ms left.
    """

    connect: float | None = 10.0
    read: float | None = 120.0
    attempt: float | None = None
    total: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "connect", "read", "attempt", "total", allow_none=True)


@dataclass(frozen=True)
class Retry(_Value):
    """When and how to retry a failed attempt (immutable, like urllib3's ``Retry``).

    Only failures a retry can cure are retried: connection errors, timeouts, truncated
    or malformed bodies, and the statuses in ``statuses``. Other 4xx answers fail at once.

    Attributes:
        attempts: attempts in all, the first included (default 5; 1 disables retries).
        backoff_base: first backoff in seconds; doubles each retry (default 0.2).
        backoff_max: cap of one backoff (default 10).
        jitter: "full" (uniform in [0, backoff], the default) or "none". With a
            ``Retry-After`` the wait is ``max(retry_after, b/2) + uniform(0, b/2)``
            (see :meth:`wait_for`).
        statuses: HTTP statuses that are retried (408, 429, 500, 502, 503, 504).
        respect_retry_after: wait at least what a ``Retry-After`` header asks (seconds or
            an HTTP date), up to ``max_retry_after``, and rest that endpoint for every
            caller as long (default True).
        max_retry_after: the longest ``Retry-After`` honoured, in seconds (default 60).
        unavailable_patience: seconds that 503 answers ("replica starting", scale from
            zero) keep being retried, beyond ``attempts`` (default 120; 0 treats 503 like
            any other retryable status).
        scale_up_timeout: if set, sent as ``X-Scale-Up-Timeout`` so a scale-to-zero
            proxy holds the request while a replica starts.
    """

    attempts: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 10.0
    jitter: str = "full"
    statuses: frozenset[int] = field(default_factory=lambda: RETRYABLE_STATUSES)
    respect_retry_after: bool = True
    max_retry_after: float = 60.0
    unavailable_patience: float = 120.0
    scale_up_timeout: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 1:
            raise InputError(f"Retry.attempts={self.attempts!r} must be an int >= 1 (1 means no retry)")
        _positive(self, "backoff_base", "backoff_max", "max_retry_after", "unavailable_patience", allow_zero=True)
        _positive(self, "scale_up_timeout", allow_none=True)
        if self.jitter not in ("full", "none"):
            raise InputError(f"Retry.jitter={self.jitter!r} must be 'full' or 'none'")
        if not isinstance(self.statuses, frozenset):
            object.__setattr__(self, "statuses", frozenset(self._ints(self.statuses)))

    @staticmethod
    def _ints(values: Iterable[Any]) -> list[int]:
        return [int(v) for v in values]

    @classmethod
    def none(cls) -> Retry:
        """No retries: every failure surfaces at once (503 included)."""
        return cls(attempts=1, unavailable_patience=0)

    def backoff(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry)
        when the endpoint gave no ``Retry-After``: ``backoff_base`` doubled per retry,
        capped at ``backoff_max``; with full jitter, uniform in ``[0, that]``."""
        cap = self._cap(retry_number)
        if self.jitter == "none":
            return cap
        return (rng or random).uniform(0.0, cap)

    def _cap(self, retry_number: int) -> float:
        # the exponent is bounded: thousands of retries (503 patience) never overflow
        return min(self.backoff_max, self.backoff_base * 2.0 ** min(max(0, retry_number - 1), 62))

    def wait_for(self, retry_number: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry_number``.

        Without a ``Retry-After`` (or with ``respect_retry_after=False``): :meth:`backoff`.
        With one, the wait is at least ``min(retry_after, max_retry_after)`` and never
        under half the backoff cap ``b`` (so ``Retry-After: 0`` can't make every caller
        come straight back); full jitter adds ``uniform(0, b/2)`` on top, so callers
        told the same ``Retry-After`` don't all return in the same instant:
        ``max(r, b/2) + uniform(0, b/2)`` (``jitter="none"``: ``max(r, b)``).
        """
        if retry_after is None or not self.respect_retry_after:
            return self.backoff(retry_number, rng)
        r = min(max(0.0, retry_after), self.max_retry_after)
        cap = self._cap(retry_number)
        if self.jitter == "none":
            return max(r, cap)
        return max(r, cap / 2) + (rng or random).uniform(0.0, cap / 2)
