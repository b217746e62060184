"""Run a :class:`~asyncvae.loadtest.spec.LoadSpec`: one process or ``workers`` processes
(kept alive across the steps of a ``find_max`` search), and return a
:class:`~asyncvae.loadtest.report.Report`.

Requests go out through :class:`~asyncvae.loadtest.http.HttpSender` (one pooled
session per process, its connection limit the in-flight cap — no client queue sits
between the schedule and the socket). A stop event (Ctrl-C in the CLI) ends the
schedule, lets answers in flight finish briefly, and the report is marked
``interrupted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import multiprocessing
import queue as queue_module
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram

from ..errors import InputError
from .engine import Clock, MonotonicClock, Sender, drive_closed, drive_open
from .fdlimit import inflight_cap
from .hist import LIVE_ARGS, add_encoded, reset_histogram
from .recorder import Recorder
from .report import Report, Threshold, build_report
from .requests import build_plans, describe_plans
from .schedule import Schedule, measured_window, warmup_seconds
from .spec import LoadSpec

__all__ = ["ProgressCallback", "effective_workers", "run", "run_async", "target_rate", "worker_share"]

#: ``progress(snapshot)``: called about twice a second with running figures:
#: ``elapsed``, cumulative ``sent`` / ``ok`` / ``failed`` / ``late`` / ``capped`` /
#: ``warmup``, ``in_flight``, ``live`` (an HdrHistogram of the ok answers since the
#: previous call, µs; reused, so read it during the call), ``target`` (rate), ``expected`` (measured requests, or None),
#: ``phase`` (e.g. a find-max step).
ProgressCallback = Callable[[dict[str, Any]], None]

PROGRESS_EVERY = 0.5
#: Seconds between handing a run to the worker processes and its synchronised start.
SYNC_DELAY = 0.5


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- plans


def effective_workers(spec: LoadSpec) -> int:
    """Generator processes a run uses: ``workers``, but never more than there are
    requests or closed-loop slots to share (``--requests 3 --workers 4`` sends 3)."""
    n = spec.workers
    if spec.requests is not None:
        n = min(n, spec.requests)
    if spec.concurrency is not None:
        n = min(n, spec.concurrency)
    return max(1, n)


def _split(total: int, k: int, n: int) -> int:
    return total // n + (1 if k < total % n else 0)


def worker_share(spec: LoadSpec, k: int, n: int) -> LoadSpec:
    """Worker ``k`` of ``n``: its share of the rate, concurrency, requests and warm-up.
    An open-loop warm-up of N requests becomes the time the whole schedule takes to
    send N (each worker replays that much of its own schedule)."""
    ch: dict[str, Any] = {"workers": 1}
    if spec.concurrency is None and spec.warmup_requests:
        ch["warmup"] = warmup_seconds(spec.schedule_stages(), spec.warmup_requests)
        ch["warmup_requests"] = 0
    if n == 1:
        return spec.replace(**ch)
    if spec.requests is not None:
        ch["requests"] = _split(spec.requests, k, n)
    if spec.rate is not None:
        ch["rate"] = spec.rate / n
    if spec.stages:
        ch["stages"] = tuple(s.scaled(1 / n) for s in spec.stages)
    if spec.concurrency is not None:
        ch["concurrency"] = _split(spec.concurrency, k, n)
        ch["warmup_requests"] = _split(spec.warmup_requests, k, n)
    return spec.replace(**ch)


def schedule_of(share: LoadSpec, k: int, n: int) -> Schedule:
    """The open-loop schedule of worker ``k`` of ``n`` (``share`` from :func:`worker_share`)."""
    return Schedule(share.schedule_stages(), warmup=float(share.warmup), limit_time=share.duration,
                    limit_count=share.requests, arrival=share.arrival, phase=k / n, seed=share.seed,
                    rate_factor=n)


def target_rate(spec: LoadSpec) -> float | None:
    """The mean scheduled rate of the measured window (``None`` for a closed loop): a
    ramp cut short by ``duration`` counts only the part that runs."""
    if spec.concurrency is not None or spec.find_max is not None:
        return None
    seconds, count = measured_window(spec.schedule_stages(), spec.duration, spec.requests)
    return count / seconds if seconds and seconds != float("inf") else spec.rate


# --------------------------------------------------------------------------- one process


async def _wait_until(epoch: float | None, stop: asyncio.Event | None) -> bool:
    """Sleep until Unix time ``epoch``; False when stopped first."""
    if epoch is None:
        return True
    delay = epoch - time.time()
    if delay <= 0:
        return True
    if stop is None:
        await asyncio.sleep(delay)
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
        return False
    return True


async def run_segment(
    share: LoadSpec, k: int = 0, n: int = 1, *, send: Sender | None = None, clock: Clock | None = None,
    tick: Callable[[Recorder, float], None] | None = None, stop: asyncio.Event | None = None,
    start_at: float | None = None,
) -> Recorder:
    """Run worker ``k`` of ``n`` (``share`` from :func:`worker_share`) in this event
    loop and return its recorder."""
    from .http import HttpSender

    clock = clock or MonotonicClock()
    plans = build_plans(share)
    rec = Recorder(interval=share.interval, late_threshold=share.late_ms / 1000, labels=[p.label for p in plans])
    rng = random.Random(share.seed * 7919 + k)
    want = share.concurrency if share.concurrency is not None else share.max_inflight
    sender: HttpSender | None = None
    if send is None:
        cap, reason = inflight_cap(want)
        sender = HttpSender(share.url, connections=cap, timeout=share.timeout,
                            connect_timeout=share.connect_timeout, token=share.token, headers=dict(share.headers))
        send = sender
    else:
        cap, reason = want, "max_inflight"
    rec.inflight_cap, rec.inflight_cap_reason = cap, reason
    ticker: asyncio.Task[None] | None = None
    try:
        if not await _wait_until(start_at, stop):
            rec.interrupted = True
            return rec
        if tick is not None:
            ticker = asyncio.ensure_future(_ticking(rec, clock, tick))
        if share.concurrency is not None:
            await drive_closed(min(share.concurrency, cap), send, rec, clock=clock, plans=plans,
                               duration=share.duration, requests=share.requests, warmup=float(share.warmup),
                               warmup_requests=share.warmup_requests, retry=share.retry_policy(), stop=stop, rng=rng)
        else:
            await drive_open(schedule_of(share, k, n), send, rec, clock=clock, plans=plans,
                             retry=share.retry_policy(), max_inflight=cap, drain_timeout=share.drain_timeout,
                             stop=stop, rng=rng)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if sender is not None:
            await sender.close()
    rec.workers = [rec.worker_summary(k)]
    return rec


async def _ticking(rec: Recorder, clock: Clock, tick: Callable[[Recorder, float], None]) -> None:
    t0 = clock.now()
    while True:
        await clock.sleep(PROGRESS_EVERY)
        tick(rec, clock.now() - t0)


# --------------------------------------------------------------------------- generators


class LocalGenerator:
    """Runs every load of a session in this process and event loop."""

    def __init__(self, send: Sender | None, clock: Clock | None):
        self.send = send
        self.clock = clock
        self.workers = 1

    async def run(self, spec: LoadSpec, *, stop: asyncio.Event | None, emit: Callable[[dict[str, Any]], None] | None,
                  start_at: float | None = None) -> Recorder:
        share = worker_share(spec, 0, 1)
        live = HdrHistogram(*LIVE_ARGS)  # reused: the callback reads it during the call only

        def tick(rec: Recorder, elapsed: float) -> None:
            assert emit is not None
            snap = rec.progress()
            add_encoded(reset_histogram(live), snap.pop("live"))
            emit({**snap, "elapsed": elapsed, "live": live})

        return await run_segment(share, send=self.send, clock=self.clock, tick=tick if emit else None,
                                 stop=stop, start_at=start_at)

    async def close(self) -> None:
        return None


def _worker_main(k: int, inbox: Any, outbox: Any, interrupt: Any) -> None:
    """Entry point of generator process ``k``: run each load it is handed until told to quit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what a Ctrl-C does

    async def one(share: LoadSpec, n: int, start_at: float) -> Recorder:
        stop = asyncio.Event()

        async def watch() -> None:
            while not interrupt.is_set():
                await asyncio.sleep(0.05)
            stop.set()

        def tick(rec: Recorder, elapsed: float) -> None:
            outbox.put(("progress", k, {**rec.progress(), "elapsed": elapsed}))

        watcher = asyncio.ensure_future(watch())
        try:
            return await run_segment(share, k, n, tick=tick, stop=stop, start_at=start_at)
        finally:
            watcher.cancel()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        while True:
            cmd = inbox.get()
            if cmd is None:
                return
            share, n, start_at = cmd
            try:
                rec = runner.run(one(share, n, start_at))
                outbox.put(("done", k, rec.to_partial()))
            except BaseException as e:
                outbox.put(("error", k, f"{type(e).__name__}: {e}"))


class WorkerPool:
    """``n`` generator processes (``spawn``), started once and kept across runs (the
    steps of a find-max search); each run starts on all of them at one wall-clock time
    so their interleaved schedules line up."""

    def __init__(self, n: int):
        self.workers = n
        ctx = multiprocessing.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(n)]
        self._interrupt = ctx.Event()
        self._procs = [ctx.Process(target=_worker_main, args=(k, self._inboxes[k], self._outbox, self._interrupt),
                                   daemon=True, name=f"asyncvae-loadtest-{k}") for k in range(n)]
        for p in self._procs:
            p.start()

    async def run(self, spec: LoadSpec, *, stop: asyncio.Event | None, emit: Callable[[dict[str, Any]], None] | None,
                  start_at: float | None = None) -> Recorder:
        n = min(self.workers, effective_workers(spec))
        self._interrupt.clear()
        at = max(start_at or 0.0, time.time() + SYNC_DELAY)
        for k in range(n):
            self._inboxes[k].put((worker_share(spec, k, n), n, at))
        watcher = asyncio.ensure_future(self._forward_stop(stop)) if stop is not None else None
        try:
            parts = await self._collect(n, emit)
        finally:
            if watcher is not None:
                watcher.cancel()
        return Recorder.merge(parts[k] for k in sorted(parts))

    async def _forward_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._interrupt.set()

    async def _collect(self, n: int, emit: Callable[[dict[str, Any]], None] | None) -> dict[int, Recorder]:
        loop = asyncio.get_running_loop()
        parts: dict[int, Recorder] = {}
        errors: list[str] = []
        snaps: dict[int, dict[str, Any]] = {}
        live = HdrHistogram(*LIVE_ARGS)
        last_emit = 0.0
        while len(parts) + len(errors) < n:
            try:
                kind, k, payload = await loop.run_in_executor(None, self._outbox.get, True, 0.25)
            except queue_module.Empty:
                if not all(p.is_alive() for p in self._procs[:n]):
                    errors.append("a generator process died without a result")
                    break
                continue
            if kind == "progress":
                add_encoded(live, payload.pop("live"))
                snaps[k] = payload
                if emit is not None and time.monotonic() - last_emit >= PROGRESS_EVERY:
                    last_emit = time.monotonic()
                    emit({**_sum_snaps(snaps), "live": live})
                    reset_histogram(live)
            elif kind == "done":
                parts[k] = Recorder.from_partial(payload)
            else:
                errors.append(f"worker {k}: {payload}")
        if errors:
            raise InputError("load generator failed: " + "; ".join(errors))
        return parts

    async def close(self) -> None:
        for q in self._inboxes:
            with contextlib.suppress(Exception):
                q.put(None)
        loop = asyncio.get_running_loop()
        for p in self._procs:
            await loop.run_in_executor(None, p.join, 5)
            if p.is_alive():
                p.kill()


def _sum_snaps(snaps: dict[int, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in snaps.values():
        for key, v in s.items():
            out[key] = max(out.get(key, 0), v) if key == "elapsed" else out.get(key, 0) + v
    return out


@contextlib.asynccontextmanager
async def open_generator(spec: LoadSpec, send: Sender | None, clock: Clock | None) -> AsyncIterator[Any]:
    """The generator of a session: this process, or a :class:`WorkerPool`."""
    n = effective_workers(spec) if spec.find_max is None else spec.workers
    if n > 1 and (send is not None or clock is not None):
        raise InputError("a custom sender or clock runs in one process; use workers=1")
    gen: LocalGenerator | WorkerPool = WorkerPool(n) if n > 1 else LocalGenerator(send, clock)
    try:
        yield gen
    finally:
        await gen.close()


def make_emitter(progress: ProgressCallback | None, spec: LoadSpec, phase: str = "") -> Callable[[dict[str, Any]], None] | None:
    """Wrap ``progress`` to add the run's target rate, expected count and phase."""
    if progress is None:
        return None
    target = target_rate(spec)
    expected = None
    if spec.concurrency is None and spec.find_max is None:
        seconds, count = measured_window(spec.schedule_stages(), spec.duration, spec.requests)
        expected = round(count) if seconds != float("inf") else spec.requests
    elif spec.requests is not None:
        expected = spec.requests

    def emit(snap: dict[str, Any]) -> None:
        progress({**snap, "target": target, "expected": expected, "phase": phase})

    return emit


# --------------------------------------------------------------------------- public


async def run_async(
    spec: LoadSpec,
    *,
    thresholds: Sequence[Threshold] = (),
    progress: ProgressCallback | None = None,
    send: Sender | None = None,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
) -> Report:
    """Run the load test ``spec`` in the running event loop and return its :class:`Report`.

    ``send`` replaces the HTTP sender (an ``async (plan) -> Answer``; tests use a
    simulated endpoint) and ``clock`` the real clock. ``thresholds`` are checked into
    ``report.passed``. ``progress`` receives running figures about twice a second.
    Setting ``stop`` ends the run early: the report covers what ran and says
    ``interrupted``.
    """
    from .findmax import find_max
    from .http import describe_endpoint

    plans = build_plans(spec)  # validates the request before any load
    if send is None:
        describe_endpoint(spec.url)
    description = describe_plans(plans) + (" (custom sender)" if send is not None else "")
    started = _now_iso()
    async with open_generator(spec, send, clock) as gen:
        if spec.find_max is not None:
            return await find_max(spec, gen, thresholds=thresholds, progress=progress, clock=clock or MonotonicClock(),
                                  description=description, started=started, stop=stop)
        rec = await gen.run(spec, stop=stop, emit=make_emitter(progress, spec), start_at=spec.start_at)
    return build_report(
        rec, spec=spec.redacted(), mode=spec.mode, request=description, target_rate=target_rate(spec),
        started_at=started, workers=min(gen.workers, effective_workers(spec)), thresholds=list(thresholds),
    )


def run(
    spec: LoadSpec,
    *,
    thresholds: Sequence[Threshold] = (),
    progress: ProgressCallback | None = None,
    handle_signals: bool = False,
) -> Report:
    """Run the load test ``spec`` on a fresh event loop (uvloop when installed) and
    return its :class:`Report`. From async code, ``await run_async(spec)`` instead.

    With ``handle_signals`` (the CLI's choice) a first Ctrl-C (SIGINT) or SIGTERM
    stops the run gracefully and the report is returned marked ``interrupted``; a
    second Ctrl-C raises :class:`KeyboardInterrupt` at once.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise InputError("asyncvae.loadtest.run() was called inside a running event loop; await run_async()")

    async def main() -> Report:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        if handle_signals:
            def on_signal(sig: int) -> None:
                stop.set()
                loop.remove_signal_handler(sig)  # a second Ctrl-C is a KeyboardInterrupt again
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, on_signal, sig)
                    installed.append(sig)
        try:
            return await run_async(spec, thresholds=thresholds, progress=progress, stop=stop)
        finally:
            for sig in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())
