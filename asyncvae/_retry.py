"""The retry policy of a client, stated once, in tenacity's own terms.

A :class:`~asyncvae.Retry` value becomes one :class:`RetryPolicy` per client: a
``retry`` strategy (what is worth another attempt), a ``stop`` strategy (attempts,
503 patience, the call's deadline) and a ``wait`` strategy (full-jitter exponential
backoff; ``Retry-After`` honoured above a floor, with jitter on top), built once and
shared by every call. The load tester asks the same object what to do.

The first attempt runs outside tenacity, because most attempts succeed and tenacity's
bookkeeping costs tens of microseconds; when it fails, tenacity takes over with that
failure replayed as its attempt 1, so every decision — including the one about the
first failure — comes from the same three strategies.

Everything reads time through an injected ``clock`` and draws jitter from an injected
``rng``, so the policy is unit-tested without sleeping (``tests/test_engine_parts.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, RetryError
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .config import Retry
from .errors import AsyncVAEError, EndpointError, RetryExhausted, error_kind

__all__ = ["CallContext", "NoTimeLeft", "RetryPolicy"]

T = TypeVar("T")


class NoTimeLeft(Exception):
    """Raised by an attempt function that finds no time left before the call's deadline
    (so it sends nothing); :meth:`RetryPolicy.run` turns it into
    :class:`~asyncvae.RetryExhausted` naming the last real failure, or ``cause`` when
    there was none."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class CallContext:
    """What the policy knows about one call across its attempts."""

    __slots__ = ("deadline", "first_503", "stop_reason")

    def __init__(self, deadline: float | None = None) -> None:
        #: absolute time (the policy's clock) by which the call must end, or None
        self.deadline = deadline
        #: when the first 503 of this call arrived (for ``unavailable_patience``)
        self.first_503: float | None = None
        self.stop_reason = "retries exhausted"


def _ctx(state: RetryCallState) -> CallContext:
    return state.args[0]  # type: ignore[no-any-return]


def _error(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


class _Retryable(retry_base):
    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy

    def __call__(self, state: RetryCallState) -> bool:
        e = _error(state)
        return e is not None and self._policy.retryable(e)


class _Stop(stop_base):
    """Stop after ``attempts`` attempts — unless the endpoint says it is starting (503)
    and ``unavailable_patience`` has not run out — and always at the deadline."""

    def __init__(self, config: Retry, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock

    def __call__(self, state: RetryCallState) -> bool:
        ctx = _ctx(state)
        now = self._clock()
        if ctx.deadline is not None and now >= ctx.deadline:
            ctx.stop_reason = "deadline passed"
            return True
        e = _error(state)
        patience = self._config.unavailable_patience
        if isinstance(e, EndpointError) and e.status == 503 and patience > 0:
            if ctx.first_503 is None:
                ctx.first_503 = now
            if now - ctx.first_503 < patience:
                return False
            ctx.stop_reason = f"unavailable for {patience:g} s"
            return True
        return state.attempt_number >= self._config.attempts


class _Wait(wait_base):
    """The wait before the next attempt (see :meth:`Retry.wait_for`), cut at the deadline."""

    def __init__(self, config: Retry, clock: Callable[[], float], rng: random.Random) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng

    def __call__(self, state: RetryCallState) -> float:
        e = _error(state)
        ra = e.retry_after if isinstance(e, EndpointError) else None
        w = self._config.wait_for(state.attempt_number, ra, self._rng)
        deadline = _ctx(state).deadline
        if deadline is not None:
            w = min(w, max(0.0, deadline - self._clock()))
        return w


class RetryPolicy:
    """One client's retry policy (see the module docstring).

    Args:
        config: the :class:`~asyncvae.Retry` value.
        clock: monotonic seconds (deadlines and 503 patience are on this clock).
        rng: the jitter's random source.
        sleep: ``async sleep(seconds)`` between attempts (the client passes one that
            ends early, with an error, when the client closes).
        on_retry: ``on_retry(kind, wait)`` before each wait (``Client.stats``).
    """

    def __init__(
        self,
        config: Retry,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.retry = _Retryable(self)
        self.stop = _Stop(config, clock)
        self.wait = _Wait(config, clock, rng or random.Random())
        self._on_retry = on_retry
        kwargs: dict[str, Any] = {}
        if sleep is not None:
            kwargs["sleep"] = sleep
        self._template = AsyncRetrying(
            retry=self.retry, stop=self.stop, wait=self.wait, before_sleep=self._before_sleep,
            reraise=False, **kwargs,
        )

    def retryable(self, e: BaseException) -> bool:
        """Whether another attempt could cure ``e``: a status in ``Retry.statuses``,
        or a transport/protocol failure marked retryable."""
        if isinstance(e, EndpointError):
            return e.status in self.config.statuses
        return isinstance(e, AsyncVAEError) and e.retryable

    def decide(self, error: BaseException, attempts: int, ctx: CallContext) -> float | None:
        """One decision, for callers that drive their own attempts (the load tester
        records each one): after ``error`` ended attempt number ``attempts``, the
        seconds to wait before the next attempt, or ``None`` to give up. The same
        ``retry``, ``stop`` and ``wait`` strategies :meth:`run` uses."""
        state = RetryCallState(self._template, None, (ctx,), {})
        state.attempt_number = attempts
        state.set_exception((type(error), error, error.__traceback__))
        if not self.retry(state) or self.stop(state):
            return None
        return self.wait(state)

    def context(self, timeout: float | None) -> CallContext:
        """A fresh :class:`CallContext` whose deadline is ``timeout`` seconds away."""
        return CallContext(None if timeout is None else self.clock() + timeout)

    def _before_sleep(self, state: RetryCallState) -> None:
        if self._on_retry is not None:
            e = _error(state)
            self._on_retry(error_kind(e) if e is not None else "unknown", state.upcoming_sleep)

    async def run(self, attempt: Callable[[CallContext], Awaitable[T]], ctx: CallContext) -> T:
        """``await attempt(ctx)`` until it succeeds or the policy stops.

        Raises the error itself when it is not retryable, else
        :class:`~asyncvae.RetryExhausted` naming the last cause.
        """
        try:
            return await attempt(ctx)
        except AsyncVAEError as e:
            if not self.retryable(e):
                raise
            first: BaseException = e
        except NoTimeLeft as e:
            raise RetryExhausted(e.cause, 0, reason="deadline passed") from None
        # tenacity from here on; the first failure is replayed as its attempt 1
        attempts = 1
        last: BaseException = first
        pending: BaseException | None = first

        async def replay(c: CallContext) -> T:
            nonlocal attempts, last, pending
            if pending is not None:
                e, pending = pending, None
                raise e
            if c.deadline is not None and self.clock() >= c.deadline:
                # the wait ran into the deadline: no attempt is started with no time left
                raise RetryExhausted(last, attempts, reason="deadline passed")
            attempts += 1
            try:
                return await attempt(c)
            except NoTimeLeft:
                attempts -= 1  # nothing was sent
                raise RetryExhausted(last, attempts, reason="deadline passed") from None
            except BaseException as e:
                last = e
                raise

        try:
            return await self._template.copy()(replay, ctx)
        except RetryError as err:
            final = err.last_attempt.exception()
            assert final is not None
            raise RetryExhausted(final, attempts, reason=ctx.stop_reason) from final
