"""Run a :class:`~asyncvae.loadtest.spec.LoadSpec`: one process or ``workers`` processes,
one load model or a ``find_max`` search, and return a :class:`~asyncvae.loadtest.report.Report`.

Requests go out through :func:`asyncvae.transport.exchange` over one session from
:func:`asyncvae.transport.make_session` per process, with a connection limit as large
as ``max_inflight`` — no client queue sits between the schedule and the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import multiprocessing
import os
import queue as queue_module
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import transport
from ..config import Retry
from ..errors import InputError
from .engine import (
    Answer,
    Clock,
    InvalidAnswer,
    MonotonicClock,
    Recorder,
    Sender,
    drive_closed,
    drive_open,
)
from .report import Report, Threshold, build_report
from .schedule import arrival_times, expected_count, with_warmup
from .spec import LoadSpec, RequestPlan, build_request, check_answer

__all__ = ["ProgressCallback", "run", "run_async"]

#: ``progress(snapshot)``: called about twice a second with running figures
#: (``elapsed``, ``sent``, ``ok``, ``failed``, ``in_flight``, ``late``, ``p50_us``,
#: ``p99_us``, ``target``, ``phase``).
ProgressCallback = Callable[[dict[str, Any]], None]

PROGRESS_EVERY = 0.5
MAX_RESPONSE_BYTES = 4 << 30


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- plans


def _split(n: int | None, k: int, workers: int) -> int | None:
    if n is None:
        return None
    return n // workers + (1 if k < n % workers else 0)


def _worker_spec(spec: LoadSpec, k: int, workers: int) -> LoadSpec:
    """Worker ``k`` of ``workers``: its share of the rate, concurrency and requests."""
    if workers == 1:
        return spec
    ch: dict[str, Any] = {"requests": _split(spec.requests, k, workers)}
    if spec.rate is not None:
        ch["rate"] = spec.rate / workers
    if spec.stages:
        ch["stages"] = tuple(s.scaled(1 / workers) for s in spec.stages)
    if spec.concurrency is not None:
        ch["concurrency"] = max(1, _split(spec.concurrency, k, workers) or 0)
    if isinstance(spec.warmup, int) and spec.warmup:
        if spec.concurrency is not None:
            ch["warmup"] = _split(spec.warmup, k, workers) or 0
        else:  # open loop: the whole generator's first `warmup` requests, as time
            first = spec.schedule_stages()[0]
            r = first.start_rate or first.end_rate
            ch["warmup"] = float(spec.warmup / r) if r else 0.0
    if ch.get("requests") == 0:
        ch["requests"] = None if spec.duration is not None else 1
    return spec.replace(**ch)


def open_arrivals(spec: LoadSpec, *, phase: float = 0.0) -> Iterator[tuple[float, bool]]:
    """``(offset, measured)`` of every open-loop send of ``spec`` (warm-up first)."""
    stages = spec.schedule_stages()
    first = stages[0].start_rate or stages[0].end_rate
    if isinstance(spec.warmup, int):
        warm_s = spec.warmup / first if (spec.warmup and first) else 0.0
    else:
        warm_s = float(spec.warmup)
    # an int warmup is a request count; after the split across workers it becomes time
    all_stages = with_warmup(stages, warm_s)
    limit_time = warm_s + spec.duration if spec.duration is not None else None
    n_warm = None
    if spec.requests is not None:
        n_warm = sum(1 for t in arrival_times(all_stages[:1], phase=phase) if t < warm_s) if warm_s else 0
    limit_count = spec.requests + n_warm if spec.requests is not None and n_warm is not None else None
    rng = random.Random(spec.seed + int(phase * 1_000_003))
    eps = 1e-9
    for t in arrival_times(all_stages, phase=phase, arrival=spec.arrival, rng=rng,
                           limit_time=limit_time, limit_count=limit_count):
        yield t, t >= warm_s - eps


def target_rate(spec: LoadSpec) -> float | None:
    """The mean scheduled rate of the measured part (``None`` for a closed loop)."""
    if spec.concurrency is not None:
        return None
    if spec.stages:
        total = sum(s.duration or 0.0 for s in spec.stages)
        return expected_count(spec.stages) / total if total else None
    return spec.rate


# --------------------------------------------------------------------------- HTTP


def http_sender(session: Any, spec: LoadSpec, plan: RequestPlan) -> Sender:
    """A sender posting ``plan.request`` to ``spec.url`` with :func:`transport.exchange`
    and checking the answer's shape or format (an invalid one raises :class:`InvalidAnswer`)."""
    url = transport.parse_endpoint(spec.url)
    token = spec.token if spec.token is not None else (os.environ.get("HF_TOKEN") or None)
    credential = (transport.origin(url), f"Bearer {token}") if token else None
    headers = dict(spec.headers)
    timeout = transport.client_timeout(spec.connect_timeout, spec.timeout, spec.timeout)
    req = plan.request

    async def send() -> Answer:
        reply = await transport.exchange(
            session, url, req, headers=headers, credential=credential, timeout=timeout,
            max_response_bytes=MAX_RESPONSE_BYTES,
        )
        why = check_answer(plan, reply.spec.shape if reply.spec is not None else None, reply.data)
        if why:
            raise InvalidAnswer(why)
        return Answer(200, reply.ttfb, reply.bytes_in)

    return send


# --------------------------------------------------------------------------- one process


async def _segment(
    spec: LoadSpec,
    *,
    phase: float = 0.0,
    send: Sender | None = None,
    clock: Clock | None = None,
    plan: RequestPlan | None = None,
    tick: Callable[[Recorder, float], None] | None = None,
) -> Recorder:
    """Run ``spec`` (one worker's share) in this event loop and return its recorder."""
    clock = clock or MonotonicClock()
    rec = Recorder(interval=spec.interval, late_threshold=spec.late_ms / 1000)
    retry = Retry(attempts=spec.retries + 1) if spec.retries else None
    rng = random.Random(spec.seed * 7919 + int(phase * 1_000_003))
    session = None
    if send is None:
        plan = plan or build_request(spec)
        session = transport.make_session(
            limit=spec.max_inflight, limit_per_host=spec.max_inflight, keepalive_timeout=30.0
        )
        send = http_sender(session, spec, plan)
    nbytes = plan.request.nbytes if plan is not None else 0
    ticker: asyncio.Task[None] | None = None
    if tick is not None:
        t0 = clock.now()

        async def ticking() -> None:
            while True:
                await clock.sleep(PROGRESS_EVERY)
                tick(rec, clock.now() - t0)

        ticker = asyncio.ensure_future(ticking())
    try:
        if spec.concurrency is not None:
            await drive_closed(
                spec.concurrency, send, rec, clock=clock, duration=spec.duration, requests=spec.requests,
                warmup=spec.warmup, retry=retry, nbytes_out=nbytes, rng=rng,
            )
        else:
            await drive_open(
                open_arrivals(spec, phase=phase), send, rec, clock=clock, retry=retry, nbytes_out=nbytes,
                max_inflight=spec.max_inflight, drain_timeout=spec.drain_timeout, rng=rng,
            )
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if session is not None:
            await session.close()
    return rec


# --------------------------------------------------------------------------- worker processes


def _worker_main(spec: LoadSpec, k: int, workers: int, q: Any, barrier: Any) -> None:
    """Entry point of generator process ``k``: run its share and send back its figures."""
    try:
        wspec = _worker_spec(spec, k, workers)
        plan = build_request(wspec)
    except Exception as e:  # report, don't hang the barrier
        q.put(("error", k, f"{type(e).__name__}: {e}"))
        barrier.abort()
        return

    def tick(rec: Recorder, elapsed: float) -> None:
        snap = rec.progress()
        snap["elapsed"] = elapsed
        q.put(("progress", k, snap))

    async def main() -> Recorder:
        return await _segment(wspec, phase=k / workers, plan=plan, tick=tick)

    try:
        barrier.wait(60)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            rec = runner.run(main())
        rec.workers = [rec.worker_summary(k)]
        q.put(("done", k, rec.to_partial()))
    except Exception as e:
        q.put(("error", k, f"{type(e).__name__}: {e}"))


async def _run_processes(spec: LoadSpec, tick: Callable[[dict[str, Any]], None] | None) -> Recorder:
    n = spec.workers
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(n + 1)
    procs = [ctx.Process(target=_worker_main, args=(spec, k, n, q, barrier), daemon=True) for k in range(n)]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    parts: dict[int, Recorder] = {}
    errors: list[str] = []
    snaps: dict[int, dict[str, Any]] = {}
    try:
        try:
            await loop.run_in_executor(None, barrier.wait, 120)
        except Exception:
            pass  # a worker aborted: its error is in the queue
        while len(parts) + len(errors) < n:
            try:
                kind, k, payload = await loop.run_in_executor(None, q.get, True, 0.5)
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs) and q.empty():
                    errors.append("a generator process died without a result")
                    break
                continue
            if kind == "progress":
                snaps[k] = payload
                if tick is not None:
                    tick(_merge_snaps(snaps))
            elif kind == "done":
                parts[k] = Recorder.from_partial(payload)
            else:
                errors.append(f"worker {k}: {payload}")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    if errors:
        raise InputError("load generator failed: " + "; ".join(errors))
    return Recorder.merge(parts[k] for k in sorted(parts))


def _merge_snaps(snaps: dict[int, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in snaps.values():
        for key, v in s.items():
            if key in ("p50_us", "p99_us", "elapsed"):
                out[key] = max(out.get(key, 0), v)
            else:
                out[key] = out.get(key, 0) + v
    return out


# --------------------------------------------------------------------------- public


async def _run_once(
    spec: LoadSpec, *, send: Sender | None, clock: Clock | None,
    progress: ProgressCallback | None, phase_name: str = "",
) -> Recorder:
    target = target_rate(spec)

    def emit(snap: dict[str, Any]) -> None:
        if progress is not None:
            snap = dict(snap)
            snap["target"] = target
            snap["phase"] = phase_name
            progress(snap)

    if spec.workers > 1:
        if send is not None or clock is not None:
            raise InputError("a custom sender or clock runs in one process; use workers=1")
        return await _run_processes(spec, emit if progress else None)

    def tick(rec: Recorder, elapsed: float) -> None:
        snap = rec.progress()
        snap["elapsed"] = elapsed
        emit(snap)

    rec = await _segment(spec, send=send, clock=clock, tick=tick if progress else None)
    rec.workers = [rec.worker_summary(0)]
    return rec


def _describe(spec: LoadSpec, send: Sender | None) -> str:
    if send is not None and spec.latent is None:
        with contextlib.suppress(Exception):
            return build_request(spec).description + " (custom sender)"
        return "custom sender"
    return build_request(spec).description


async def run_async(
    spec: LoadSpec,
    *,
    thresholds: Sequence[Threshold] = (),
    progress: ProgressCallback | None = None,
    send: Sender | None = None,
    clock: Clock | None = None,
) -> Report:
    """Run the load test ``spec`` in the running event loop and return its :class:`Report`.

    ``send`` replaces the HTTP sender (an ``async () -> Answer``; tests use a simulated
    endpoint) and ``clock`` the real clock. ``thresholds`` are checked into
    ``report.passed``. ``progress`` receives running figures about twice a second.
    """
    description = _describe(spec, send)  # validates the request before any load
    started = _now_iso()
    if spec.find_max is not None:
        return await _find_max(spec, thresholds=thresholds, progress=progress, send=send, clock=clock,
                               description=description, started=started)
    rec = await _run_once(spec, send=send, clock=clock, progress=progress)
    return build_report(
        rec, spec=spec.redacted(), mode=spec.mode, request=description, target_rate=target_rate(spec),
        started_at=started, workers=spec.workers, thresholds=list(thresholds),
    )


def run(
    spec: LoadSpec,
    *,
    thresholds: Sequence[Threshold] = (),
    progress: ProgressCallback | None = None,
) -> Report:
    """Run the load test ``spec`` on a fresh event loop (uvloop when installed) and
    return its :class:`Report`. From async code, ``await run_async(spec)`` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise InputError("asyncvae.loadtest.run() was called inside a running event loop; await run_async()")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_async(spec, thresholds=thresholds, progress=progress))


# --------------------------------------------------------------------------- find-max


def _step_verdict(rep: Report, rate: float, slo_ms: float, max_err: float) -> tuple[bool, str]:
    d = rep.data
    why = []
    if d["latency_ms"]["p99"] > slo_ms:
        why.append(f"p99 {d['latency_ms']['p99']:.1f} ms > {slo_ms:g} ms")
    if d["error_rate"] > max_err:
        why.append(f"errors {100 * d['error_rate']:.2f}% > {100 * max_err:g}%")
    if d["rate"]["completed"] < 0.9 * rate:
        why.append(f"answered {d['rate']['completed']:.1f}/s < 90% of {rate:.1f}/s")
    if not d["requests"]["ok"]:
        why.append("no successful answer")
    return (not why), "; ".join(why)


async def _find_max(
    spec: LoadSpec, *, thresholds: Sequence[Threshold], progress: ProgressCallback | None,
    send: Sender | None, clock: Clock | None, description: str, started: str,
) -> Report:
    fm = spec.find_max
    assert fm is not None
    clk = clock or MonotonicClock()
    slo_s = fm.slo_p99_ms / 1000
    drain = spec.drain_timeout if spec.drain_timeout is not None else max(4 * slo_s, 1.0)
    base = spec.replace(find_max=None, rate=fm.start_rate, stages=(), concurrency=None,
                        duration=fm.step_duration, requests=None)
    lo: float | None = None
    hi: float | None = None
    rate = fm.start_rate
    steps: list[dict[str, Any]] = []
    best: Report | None = None
    last: Report | None = None
    while len(steps) < fm.max_steps:
        step = base.replace(rate=rate, duration=fm.step_duration, requests=None,
                            warmup=fm.step_warmup, drain_timeout=drain)
        tries = 2 if fm.confirm else 1
        for attempt in range(1, tries + 1):
            rec = await _run_once(step, send=send, clock=clock, progress=progress,
                                  phase_name=f"find-max step {len(steps) + 1} @ {rate:.1f}/s")
            rep = build_report(rec, spec=step.redacted(), mode="open", request=description,
                               target_rate=rate, started_at=started, workers=spec.workers)
            ok, why = _step_verdict(rep, rate, fm.slo_p99_ms, fm.max_error_rate)
            d = rep.data
            steps.append({
                "rate": rate, "ok": ok, "why": why, "attempt": attempt,
                "p50_ms": d["latency_ms"]["p50"], "p99_ms": d["latency_ms"]["p99"],
                "error_rate": d["error_rate"], "achieved": d["rate"]["completed"],
                "late_fraction": d["schedule"]["late_fraction"],
            })
            last = rep
            if not ok and rec.unfinished:
                # let the endpoint work off what the cancelled requests left queued
                await clk.sleep(min(10.0, rec.unfinished / max(d["rate"]["ok"], 1.0)))
            if ok or len(steps) >= fm.max_steps:
                break
            await clk.sleep(0.2)
        if ok:
            lo = rate
            best = rep
        else:
            hi = rate
        if hi is None:
            if rate >= fm.max_rate:
                break
            rate = min(rate * 2, fm.max_rate)
        elif lo is None:
            rate = hi / 2
            if rate < 0.01:
                break
        else:
            if (hi - lo) / lo <= fm.precision:
                break
            rate = (lo + hi) / 2
        await clk.sleep(0.2)
    chosen = best or last
    assert chosen is not None and chosen.recorder is not None
    fm_data = {
        "slo_p99_ms": fm.slo_p99_ms,
        "max_error_rate": fm.max_error_rate,
        "max_rate": lo,
        "bracket": [lo, hi],
        "precision": fm.precision,
        "steps": steps,
    }
    rep = build_report(
        chosen.recorder, spec=spec.redacted(), mode="find-max", request=description,
        target_rate=lo if lo is not None else (steps[-1]["rate"] if steps else None),
        started_at=started, workers=spec.workers, thresholds=list(thresholds), find_max=fm_data,
    )
    return rep
