"""Simulated time for deterministic tests of the generator (no sockets, no real waiting).

:class:`VirtualTimeLoop` is an asyncio event loop whose clock jumps straight to the next
timer whenever nothing is ready, so ``asyncio.sleep(3600)`` returns at once while
``loop.time()`` advances by an hour. :class:`QueueEndpoint` is a fake endpoint with
``servers`` replicas of fixed service time and a FIFO queue, modelled in that time::

    loop = VirtualTimeLoop()
    ep = QueueEndpoint(service=0.010)
    report = run_virtual(run_async(LoadSpec(url, rate=150, duration=2), send=ep, clock=LoopClock()))
"""

from __future__ import annotations

import asyncio
import heapq
import selectors
from collections.abc import Coroutine
from typing import Any

from ..errors import EndpointError, TransportError
from .engine import Answer, Clock, LoopClock

__all__ = ["QueueEndpoint", "VirtualTimeLoop", "run_virtual"]


class _VirtualSelector(selectors.DefaultSelector):
    """A selector that never blocks: it advances the loop's virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise RuntimeError("simulation deadlock: nothing is ready and no timer is pending")
        if timeout > 0:
            self.loop._now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop running on simulated time (starts at 0.0; see the module doc)."""

    def __init__(self) -> None:
        sel = _VirtualSelector()
        super().__init__(sel)
        sel.loop = self
        self._now = 0.0

    def time(self) -> float:
        return self._now


def run_virtual(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop` and close it."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class QueueEndpoint:
    """A fake endpoint: ``servers`` replicas, each serving one request at a time for
    ``service`` seconds, the rest waiting FIFO (a G/D/c queue in simulated time).

    ``stall(at, seconds)`` makes every replica unavailable from ``at`` for ``seconds``
    (a GC pause, a cold start). ``fail_every`` > 0 answers every n-th request with a
    503 at once. ``timeout``: the client gives up on an answer that would take longer
    (a ``timeout`` error after that many seconds; the replica still does the work).
    ``client_cost``: simulated CPU seconds the *generator* spends per send (virtual
    time jumps that much, so a generator too slow for its schedule falls behind).
    Use it as a sender: ``await ep(plan)`` returns an :class:`Answer`.
    """

    def __init__(self, service: float, servers: int = 1, *, clock: Clock | None = None,
                 fail_every: int = 0, bytes_out: int = 1000, timeout: float | None = None,
                 client_cost: float = 0.0):
        self.service = service
        self.clock: Clock = clock or LoopClock()
        self._free = [0.0] * servers  # when each replica is next free (heap)
        self._stalls: list[tuple[float, float]] = []
        self.fail_every = fail_every
        self.bytes_out = bytes_out
        self.timeout = timeout
        self.client_cost = client_cost
        self.calls = 0

    def stall(self, at: float, seconds: float) -> None:
        """Block every replica during ``[at, at + seconds)`` (clock time)."""
        self._stalls.append((at, at + seconds))

    def _start_time(self, t: float) -> float:
        for a, b in self._stalls:
            if a <= t < b:
                t = b
        return t

    async def __call__(self, plan: Any = None) -> Answer:
        self.calls += 1
        if self.client_cost:
            loop = asyncio.get_running_loop()
            if isinstance(loop, VirtualTimeLoop):
                loop._now += self.client_cost
        now = self.clock.now()
        if self.fail_every and self.calls % self.fail_every == 0:
            raise EndpointError({"error": "503 Service Unavailable"}, status=503)
        free = heapq.heappop(self._free)
        start = self._start_time(max(now, free))
        done = start + self.service
        heapq.heappush(self._free, done)
        if self.timeout is not None and done - now > self.timeout:
            await self.clock.sleep(self.timeout)
            raise TransportError("timed out before a response arrived (simulated)", kind="timeout")
        await self.clock.sleep(done - now)
        return Answer(200, ttfb=done - now, bytes_in=self.bytes_out)
