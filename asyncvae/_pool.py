"""The endpoint pool: which replica gets the next attempt, and which ones rest.

Pure policy with an injected clock (``tests/test_engine_parts.py`` drives it without
sockets):

- **choice**: the available endpoint with the fewest outstanding attempts; ties go
  round-robin, so equal replicas share the load;
- **health**: ``REST_AFTER_FAILURES`` endpoint failures in a row (connection errors,
  timeouts, cut-short or malformed answers, 408/429/5xx) rest an endpoint — when there
  is another to use. After its rest it is *half-open*: one probe goes out, and nothing
  else, until the probe answers. A failed probe rests it again, each time twice as long
  (``REST_MIN`` doubling up to ``REST_MAX``; the exponent is bounded, so thousands of
  rests never overflow). A success makes it healthy at once;
- **Retry-After**: a 429 or 503 that says how long to stay away rests that endpoint for
  *every* caller for that long (a single endpoint too: new attempts wait instead of
  hammering it), whether or not its failure count trips.

Answers that are the request's fault (other 4xx) or the client's own limits say nothing
about the endpoint's health.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from yarl import URL

from .errors import EndpointError, ProtocolError, TransportError

__all__ = ["REST_AFTER_FAILURES", "REST_MAX", "REST_MIN", "Endpoint", "EndpointPool", "endpoint_fault"]

#: Endpoint failures in a row that rest an endpoint (when others remain).
REST_AFTER_FAILURES = 3
#: The first rest, in seconds; each failed probe doubles it ...
REST_MIN = 0.5
#: ... up to this.
REST_MAX = 30.0
_MAX_EXPONENT = 16


def endpoint_fault(e: BaseException) -> bool:
    """Whether a failed attempt says something about the endpoint's health."""
    if isinstance(e, EndpointError):
        return e.status >= 500 or e.status in (408, 429)
    if isinstance(e, TransportError):
        return True
    if isinstance(e, ProtocolError):
        return e.retryable  # cut short / malformed; not "over our own max_response_bytes"
    return False


def rest_seconds(rests: int) -> float:
    """How long the ``rests``-th rest in a row lasts (1 is the first)."""
    return min(REST_MAX, REST_MIN * 2.0 ** min(max(rests - 1, 0), _MAX_EXPONENT))


class Endpoint:
    """One replica: its URL, load and health."""

    __slots__ = ("failures", "index", "outstanding", "probing", "rested_until", "rests", "url")

    def __init__(self, url: URL, index: int) -> None:
        self.url = url
        self.index = index
        self.outstanding = 0
        self.failures = 0
        self.rests = 0
        self.rested_until = 0.0
        self.probing = False

    def __repr__(self) -> str:
        return (
            f"<endpoint {self.url.with_query(None)} outstanding={self.outstanding} "
            f"failures={self.failures} rests={self.rests}>"
        )


class EndpointPool:
    """Chooses endpoints and keeps their health (see the module docstring)."""

    def __init__(self, urls: Sequence[URL], *, clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("EndpointPool needs at least one URL")
        self.endpoints = [Endpoint(u, i) for i, u in enumerate(urls)]
        self._clock = clock
        self._rr = 0

    def pick(self) -> tuple[Endpoint, float, bool]:
        """``(endpoint, wait, probe)``: the endpoint for the next attempt, the seconds
        to wait before using it (0 unless every endpoint rests), and whether the
        attempt is its half-open probe (hand it back to :meth:`succeeded`/:meth:`failed`)."""
        eps = self.endpoints
        now = self._clock()
        if len(eps) == 1:
            ep = eps[0]
            return ep, max(0.0, ep.rested_until - now), False
        n = len(eps)
        self._rr = start = (self._rr + 1) % n
        best: Endpoint | None = None
        for k in range(n):
            ep = eps[(start + k) % n]
            if ep.probing or ep.rested_until > now:
                continue
            if best is None or ep.outstanding < best.outstanding:
                best = ep
        if best is not None:
            if best.rests:  # its rest is over: this attempt is the probe
                best.probing = True
                return best, 0.0, True
            return best, 0.0, False
        soonest = min(eps, key=lambda e: (e.probing, e.rested_until))
        return soonest, max(0.0, soonest.rested_until - now), False

    def succeeded(self, ep: Endpoint, probe: bool = False) -> None:
        """An attempt at ``ep`` got an answer (any answer that is not an endpoint fault)."""
        if probe:
            ep.probing = False
        ep.failures = 0
        ep.rests = 0

    def failed(self, ep: Endpoint, error: BaseException, probe: bool = False, *,
               retry_after_cap: float | None = None) -> None:
        """An attempt at ``ep`` failed with ``error``.

        ``retry_after_cap`` (the policy's ``max_retry_after``; ``None``: Retry-After is
        not honoured) bounds the rest a 429/503 ``Retry-After`` asks for.
        """
        if not endpoint_fault(error):
            self.succeeded(ep, probe)
            return
        now = self._clock()
        if probe:
            ep.probing = False
        ep.failures += 1
        if len(self.endpoints) > 1:
            if probe:
                ep.rests += 1
                ep.rested_until = max(ep.rested_until, now + rest_seconds(ep.rests))
            elif ep.rests == 0 and ep.failures >= REST_AFTER_FAILURES:
                ep.rests = 1
                ep.rested_until = max(ep.rested_until, now + rest_seconds(1))
        if (
            retry_after_cap is not None
            and isinstance(error, EndpointError)
            and error.status in (429, 503)
            and error.retry_after
        ):
            ep.rested_until = max(ep.rested_until, now + min(error.retry_after, retry_after_cap))
