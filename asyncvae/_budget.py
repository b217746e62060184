"""Admission primitives of the engine: a FIFO semaphore counted in units (request slots)
and a byte budget handed out as leases.

Both are closable: :meth:`close` fails every waiter, at once, with the given error,
and every later acquire raises it. Both are FIFO: a large request at the head of the
line is not overtaken by smaller ones behind it (no starvation), and a waiter that is
cancelled after it was granted gives its grant back to the next in line.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

__all__ = ["ByteBudget", "FifoSemaphore", "Lease"]


class FifoSemaphore:
    """``value`` units; :meth:`acquire` waits in line for ``n`` of them."""

    __slots__ = ("_closed", "_value", "_waiters")

    def __init__(self, value: int) -> None:
        self._value = value
        self._waiters: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
        self._closed: BaseException | None = None

    @property
    def available(self) -> int:
        return self._value

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, n: int = 1) -> None:
        if self._closed is not None:
            raise self._closed
        if not self._waiters and self._value >= n:
            self._value -= n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, n))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(n)  # granted, but the waiter left: pass the units on
            else:
                self._remove(fut)
                self._wake()  # a large waiter leaving may unblock smaller ones behind it
            raise

    def release(self, n: int = 1) -> None:
        self._value += n
        if self._waiters:
            self._wake()

    def close(self, exc: BaseException) -> None:
        """Fail every waiter with ``exc``; later acquires raise it too."""
        self._closed = exc
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _remove(self, fut: asyncio.Future[None]) -> None:
        for i, (f, _) in enumerate(self._waiters):
            if f is fut:
                del self._waiters[i]
                return

    def _wake(self) -> None:
        while self._waiters:
            fut, n = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self._value < n:
                return
            self._value -= n
            self._waiters.popleft()
            fut.set_result(None)


class ByteBudget:
    """``Limits.max_inflight_bytes``: room for response bytes, reserved as a
    :class:`Lease` before a request is sent.

    A reservation waits (FIFO) until it fits; one larger than the whole budget is let
    through alone, once nothing else is held, so it can never wait forever.
    ``on_change(used)`` is told every change (the stats gauge).
    """

    __slots__ = ("_on_change", "_waiters", "closed", "limit", "used")

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
        self._on_change = on_change
        self.closed: BaseException | None = None

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def reserve(self, n: int) -> Lease:
        """A lease of ``n`` bytes, once they fit (``n <= 0``: an empty lease at once)."""
        if self.closed is not None:
            raise self.closed
        if n > 0 and (self._waiters or not self._fits(n)):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((fut, n))
            try:
                await fut  # granted: the bytes were taken for us by _wake
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._give(n)
                else:
                    self._drop(fut)
                raise
            return Lease(self, n)
        lease = Lease(self, 0)
        if n > 0:
            lease.resize(n)
        return lease

    def close(self, exc: BaseException) -> None:
        """Fail every waiter with ``exc``; later reservations raise it too."""
        self.closed = exc
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _take(self, n: int) -> None:
        self.used += n
        if self._on_change is not None:
            self._on_change(self.used)

    def _give(self, n: int) -> None:
        self.used -= n
        if self._on_change is not None:
            self._on_change(self.used)
        if self._waiters:
            self._wake()

    def _drop(self, fut: asyncio.Future[None]) -> None:
        for i, (f, _) in enumerate(self._waiters):
            if f is fut:
                del self._waiters[i]
                break
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            fut, n = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)


class Lease:
    """Bytes of a :class:`ByteBudget` held by one exchange. The owner releases it on
    every path (``with lease:`` or :meth:`release`); releasing twice is harmless."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def resize(self, n: int) -> None:
        """Hold ``n`` bytes from now on. Growth is taken at once, without waiting (the
        answer is already arriving: waiting here would hold a connection); shrinking
        gives the difference back to the waiters."""
        delta = n - self.nbytes
        if delta > 0:
            self._budget._take(delta)
        elif delta < 0:
            self._budget._give(-delta)
        self.nbytes = n

    def release(self) -> None:
        if self.nbytes:
            n, self.nbytes = self.nbytes, 0
            self._budget._give(n)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Lease {self.nbytes} bytes>"
