"""The load generator's core: send requests on a schedule (open loop) or from a fixed
number of workers (closed loop), and record what happened in a
:class:`~asyncvae.loadtest.recorder.Recorder`.

It knows nothing about HTTP: a *sender* is an ``async (plan) -> Answer`` that raises
an :class:`~asyncvae.AsyncVAEError` for a failed attempt, and a *clock* gives the
time and sleeps. Tests drive it with a simulated endpoint on a virtual-time loop
(:mod:`asyncvae.loadtest.sim`); :mod:`asyncvae.loadtest.http` is the HTTP sender.

Open-loop latency is measured from the time each request was *scheduled* to be sent,
not from when it actually went out (the coordinated-omission correction of wrk2): a
stalled endpoint or a generator that falls behind shows up as latency, not as fewer
samples. How late each send was is recorded too (the ``lag`` histogram), and
whether it waited for the in-flight cap (``capped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Retry
from ..errors import AsyncVAEError, EndpointError
from ..errors import error_kind as _error_kind
from .hist import new_histogram
from .policy import RetryState, make_policy, next_retry
from .recorder import Recorder
from .requests import Mixer, RequestPlan

__all__ = [
    "Answer",
    "ClientSideError",
    "Clock",
    "InvalidAnswer",
    "LoopClock",
    "MonotonicClock",
    "Recorder",
    "Sender",
    "drive_closed",
    "drive_open",
    "error_kind",
    "new_histogram",
]

#: Seconds a Ctrl-C'd run keeps waiting for answers already in flight.
INTERRUPT_DRAIN = 2.0


class Clock(Protocol):
    """Time source and sleeper of the generator (inject a fake one in tests)."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` (may return a little late, never early by much)."""
        ...


class MonotonicClock:
    """The real clock: ``time.perf_counter`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class LoopClock:
    """The running event loop's clock (virtual time under :class:`~asyncvae.loadtest.sim.VirtualTimeLoop`)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@dataclass(frozen=True)
class Answer:
    """A valid answer to one attempt: HTTP status, seconds from send to first byte, bytes read."""

    status: int = 200
    ttfb: float = 0.0
    bytes_in: int = 0


#: ``async (plan) -> Answer``: one attempt of the request ``plan``.
Sender = Callable[[RequestPlan], Awaitable[Answer]]


class InvalidAnswer(AsyncVAEError):
    """A 2xx answer that is not what the request asked for (wrong shape, not an image)."""


class ClientSideError(AsyncVAEError):
    """A failure of the load generator itself, not of the endpoint: ``kind`` is
    ``client_fd_limit`` (out of file descriptors) or ``client_ports`` (out of local
    ports)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def error_kind(e: BaseException) -> str:
    """The bucket an error is counted in: :func:`asyncvae.errors.error_kind`'s words
    (``http_503``, ``timeout``, ``connection``, ``tls``, ``protocol``,
    ``exception_<Type>``, ...) plus ``invalid_response`` and the generator's own
    ``client_fd_limit`` / ``client_ports``."""
    if isinstance(e, InvalidAnswer):
        return "invalid_response"
    if isinstance(e, ClientSideError):
        return e.kind
    return _error_kind(e)


def status_of(e: BaseException) -> int | None:
    """The HTTP status that came with a failed attempt, if one came."""
    if isinstance(e, EndpointError):
        return e.status
    return getattr(e, "answered_status", None)


# --------------------------------------------------------------------------- one request


class _Driver:
    """Sends one request with its retries and records every outcome. Open-loop
    requests run as tasks registered in ``tasks`` (by key) until they end; whoever
    waits for a free in-flight slot sets ``waiting`` and waits on ``room``."""

    def __init__(self, send: Sender, rec: Recorder, clock: Clock, retry: Retry | None, rng: random.Random):
        self.send = send
        self.rec = rec
        self.clock = clock
        self.policy = make_policy(retry, clock, rng)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.room = asyncio.Event()
        self.waiting = False

    async def one(self, due: float, sent: float, measured: bool, plan: RequestPlan, key: int = -1) -> None:
        """Send ``plan`` (due at ``due``, sent at ``sent``), retry per the policy, record;
        ``in_flight`` was already counted."""
        rec, o = self.rec, self.rec.origin
        now_ = self.clock.now
        due_rel = due - o
        state: RetryState | None = None
        label = plan.label
        try:
            while True:
                t_att = now_()
                try:
                    ans = await self.send(plan)
                except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:
                    kind = error_kind(e)
                    status = status_of(e)
                    rec.on_attempt(status, status is not None or kind == "timeout", plan.nbytes, measured)
                    if self.policy is not None:
                        state = state or RetryState()
                        state.attempts += 1
                        wait = next_retry(self.policy, e, state)
                        if wait is not None:
                            rec.on_retry(kind, measured)
                            await self.clock.sleep(wait)
                            continue
                    rec.on_error(kind, due_rel, now_() - o, measured, status is not None, label)
                    return
                now = now_()
                rec.on_ok(due_rel, sent - o, t_att + ans.ttfb - o, now - o, ans.bytes_in, measured, label,
                          ans.status, plan.nbytes)
                return
        except asyncio.CancelledError:
            rec.on_unfinished(due_rel, now_() - o, measured, label)
            raise
        finally:
            rec.in_flight -= 1
            if key >= 0:
                self.tasks.pop(key, None)
                if self.waiting:
                    self.room.set()


async def _drain(tasks: dict[int, asyncio.Task[None]], timeout: float | None) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(list(tasks.values()), timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def _run_until_stopped(work: Awaitable[None], stop: asyncio.Event | None) -> bool:
    """Run ``work``; cancel it when ``stop`` is set first. True when it was stopped."""
    task = asyncio.ensure_future(work)
    if stop is None:
        await task
        return False
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()
        return False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return True


def _wall_epoch(clock: Clock, at: float) -> float:
    return time.time() - (clock.now() - at)


# --------------------------------------------------------------------------- open loop


async def drive_open(
    arrivals: Iterable[tuple[float, bool]],
    send: Sender,
    rec: Recorder,
    *,
    clock: Clock,
    plans: tuple[RequestPlan, ...],
    retry: Retry | None = None,
    max_inflight: int = 10_000,
    drain_timeout: float | None = None,
    stop: asyncio.Event | None = None,
    rng: random.Random | None = None,
) -> None:
    """Open loop: send one request at each scheduled time of ``arrivals`` (``(offset
    seconds, measured)`` pairs; a :class:`~asyncvae.loadtest.schedule.Schedule`
    also gives the measured window), whatever is still in flight, and wait for the
    answers.

    Latency counts from the scheduled time. A send that can't go out on time (the
    loop was busy, or ``max_inflight`` requests are out) goes as soon as it can and is
    recorded as late (and as capped when it waited for the cap). Answers still
    missing ``drain_timeout`` s after the last send are cancelled and counted as
    ``unfinished``. When ``stop`` is set the schedule stops at once, answers in flight
    get :data:`INTERRUPT_DRAIN` s more, and the recorder is marked ``interrupted``.
    """
    start = clock.now()
    rec.origin = start
    rec.origin_epoch = _wall_epoch(clock, start)
    drv = _Driver(send, rec, clock, retry, rng or random.Random(0))
    mixer = Mixer(plans)
    tasks = drv.tasks
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def window_end_at(end_rel: float) -> None:
        delay = start + end_rel - clock.now()
        if delay <= 0:
            rec.on_window_end()
        else:
            timer.append(loop.call_later(delay, rec.on_window_end))

    planned = getattr(arrivals, "planned_end", None)
    end_rel = planned() if planned is not None else None
    if end_rel is not None:
        window_end_at(end_rel)

    async def feed() -> None:
        now, sleep, one, create_task = clock.now, clock.sleep, drv.one, loop.create_task
        for key, (offset, measured) in enumerate(arrivals, 1):
            due = start + offset
            rec.on_schedule(offset, measured)
            delay = due - now()
            if delay > 0:
                await sleep(delay)
            capped = False
            while rec.in_flight >= max_inflight:
                capped = drv.waiting = True
                drv.room.clear()
                await drv.room.wait()
                drv.waiting = False
            plan = mixer.next()
            sent = now()
            rec.on_send(offset, sent - start, measured, capped, plan.label)
            rec.in_flight += 1
            if rec.in_flight > rec.peak_in_flight:
                rec.peak_in_flight = rec.in_flight
            tasks[key] = create_task(one(due, sent, measured, plan, key))

    try:
        stopped = await _run_until_stopped(feed(), stop)
        window = getattr(arrivals, "window", None)
        if window is not None:
            rec.window_start, rec.window_end = window
        if stopped:
            _interrupted(rec, clock.now() - start)
        elif end_rel is None and rec.window_end is not None:
            window_end_at(rec.window_end)
        await _drain_or_stop(tasks, INTERRUPT_DRAIN if stopped else drain_timeout, stop, rec, clock)
    finally:
        if tasks:
            await _drain(tasks, 0)
        for h in timer:
            h.cancel()
        rec.on_window_end()
        rec.finish()


def _interrupted(rec: Recorder, now_rel: float) -> None:
    rec.interrupted = True
    if rec.window_start is None:
        rec.window_start = 0.0
    if rec.window_end is None or rec.window_end > now_rel:
        rec.window_end = max(rec.window_start, now_rel)
    rec.on_window_end()


async def _drain_or_stop(tasks: dict[int, asyncio.Task[None]], timeout: float | None, stop: asyncio.Event | None,
                         rec: Recorder, clock: Clock) -> None:
    """Wait for the answers in flight (up to ``timeout``); a stop cuts that to
    :data:`INTERRUPT_DRAIN` seconds."""
    if not tasks:
        return
    if stop is None or stop.is_set():
        await _drain(tasks, timeout)
        return
    if await _run_until_stopped(_drain(tasks, timeout), stop):
        _interrupted(rec, clock.now() - rec.origin)
        await _drain(tasks, INTERRUPT_DRAIN)


# --------------------------------------------------------------------------- closed loop


async def drive_closed(
    concurrency: int,
    send: Sender,
    rec: Recorder,
    *,
    clock: Clock,
    plans: tuple[RequestPlan, ...],
    duration: float | None,
    requests: int | None,
    warmup: float = 0.0,
    warmup_requests: int = 0,
    retry: Retry | None = None,
    stop: asyncio.Event | None = None,
    rng: random.Random | None = None,
) -> None:
    """Closed loop: ``concurrency`` workers each send the next request when their last
    one finished (latency from the actual send; there is no schedule to be late for).

    Runs ``warmup`` seconds or ``warmup_requests`` requests first, then ``duration``
    seconds and/or ``requests`` measured requests. The measured window runs from the
    first measured send for ``duration`` seconds (or to the last answer).
    """
    start = clock.now()
    rec.origin = start
    rec.origin_epoch = _wall_epoch(clock, start)
    drv = _Driver(send, rec, clock, retry, rng or random.Random(0))
    mixer = Mixer(plans)
    st: dict[str, Any] = {"issued": 0, "measured": 0, "warm_until": None,
                          "stop_at": start + warmup + duration if duration is not None and not warmup_requests else None}

    def next_request() -> bool | None:
        """Whether the next request is measured; None: stop issuing."""
        now = clock.now()
        if st["stop_at"] is not None and now >= st["stop_at"]:
            return None
        measured = st["issued"] >= warmup_requests and now - start >= warmup
        if measured and requests is not None and st["measured"] >= requests:
            return None
        st["issued"] += 1
        if measured:
            if st["warm_until"] is None:
                st["warm_until"] = now
                rec.window_start = now - start
                if duration is not None:
                    st["stop_at"] = now + duration
                    rec.window_end = rec.window_start + duration
            st["measured"] += 1
        return measured

    async def worker() -> None:
        while True:
            measured = next_request()
            if measured is None:
                return
            now = clock.now()
            plan = mixer.next()
            rec.on_schedule(now - start, measured)
            rec.on_send(now - start, now - start, measured, False, plan.label)
            rec.in_flight += 1
            rec.peak_in_flight = max(rec.peak_in_flight, rec.in_flight)
            await drv.one(now, now, measured, plan)

    workers = asyncio.gather(*(worker() for _ in range(concurrency)))
    try:
        if stop is None:
            await workers
        else:
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({workers, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if workers.done():
                workers.result()
            else:  # stopped: issue nothing more, let what is out finish briefly
                st["stop_at"] = clock.now()
                if duration is not None:
                    _interrupted(rec, clock.now() - start)
                else:
                    rec.interrupted = True
                await asyncio.wait({workers}, timeout=INTERRUPT_DRAIN)
    finally:
        if not workers.done():
            workers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await workers
        if duration is None or rec.window_end is None:
            rec.window_end = rec.last_done if rec.last_done is not None else rec.window_start
        rec.on_window_end()
        rec.finish()
