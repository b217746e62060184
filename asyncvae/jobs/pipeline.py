"""The one pipeline of both jobs: units → prepare (a pool) → ``*_many`` → sink.

A *unit* is what gets written as a whole: an output shard (encode) or one latent file's
outputs (decode). It lists the slots it still needs (``pending``), takes each slot's
outcome (``accept`` / ``reject``), and writes itself (``finish``, run in a thread) when
every slot is accounted. The pipeline:

1. prepares the pending slots of the units in order in a pool (processes or threads),
   a bounded number ahead;
2. feeds the prepared values to ``Client.encode_many``/``decode_many`` (ordered,
   failures yielded in place), so the engine's own bounds (queue, reorder window,
   byte budget) hold the memory;
3. matches each result to its slot, classifies failures (``input`` / ``endpoint``),
   aborts at once on 401/403/404 and when ``--max-failure-rate`` is passed;
4. hands finished units to at most ``writers`` writer threads at a time: when they
   are all busy (a slow disk), consuming results pauses, and so does intake.

On an abort, units that got results are written as they are (incomplete: no
completion marker), so the next run reuses their done items.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ItemError
from .accounting import FailureGuard, JobSummary, Progress
from .endpoint import JobAborted, classify, describe, fatal_reason

__all__ = ["PipelineSettings", "Run", "Unit", "run_pipeline"]


class Unit(Protocol):
    """What the pipeline needs of a unit of output (see the module docstring)."""

    name: str
    remaining: int
    touched: bool

    def pending(self) -> Iterator[tuple[int, Any]]: ...

    def accept(self, slot: int, result: Any) -> None: ...

    def reject(self, slot: int, error: BaseException, klass: str, kind: str) -> None: ...

    def label(self, slot: int) -> str: ...

    def finish(self) -> None: ...

    # optional: ``async def wait_room(self) -> None`` — called after each accepted result;
    # a unit that writes as results arrive (decode) waits there for its writes to catch up


@dataclass(frozen=True)
class PipelineSettings:
    """How the pipeline runs: ``depth`` items prepared ahead, ``writers`` units written
    at once, ``direction`` ``"encode"`` or ``"decode"``."""

    direction: str
    depth: int = 16
    writers: int = 2
    quiet: bool = False


@dataclass
class Run:
    """Units sent with the same request options (decode groups files by scaling)."""

    options: dict[str, Any]
    units: Sequence[Unit]


async def run_pipeline(
    client: Any,
    runs: Sequence[Run],
    *,
    prepare: Callable[[Any], Any],
    wrap: Callable[[Any, Unit, int], Any],
    pool: concurrent.futures.Executor | None,
    settings: PipelineSettings,
    summary: JobSummary,
    guard: FailureGuard,
    progress: Progress,
) -> None:
    """Run every unit through prepare → send → sink (see the module docstring).

    ``prepare(arg)`` runs in ``pool`` (``None``: in the event loop thread, for cheap
    work); ``wrap(value, unit, slot)`` turns its value into what is sent, in the loop.
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max(1, settings.writers))
    writers: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []
    written: set[int] = set()

    def check_writers() -> None:
        if errors:
            raise errors[0]

    async def write(unit: Unit) -> None:
        check_writers()
        if id(unit) in written:
            return
        written.add(id(unit))
        await slots.acquire()  # backpressure: at most `writers` units being written

        async def go() -> None:
            try:
                await asyncio.to_thread(unit.finish)
            except BaseException as e:  # surfaced by check_writers / the final gather
                errors.append(e)
            finally:
                slots.release()

        t = loop.create_task(go())
        writers.add(t)
        t.add_done_callback(writers.discard)

    def account(unit: Unit, slot: int, error: BaseException | None, result: Any = None) -> None:
        summary.processed += 1
        if error is None:
            unit.accept(slot, result)
            summary.count("ok")
            progress.advance()
            guard.record(False)
            return
        klass, kind = classify(error)
        reason = describe(error)
        unit.reject(slot, error, klass, kind)
        summary.count("failed", klass)
        progress.advance(failed=True)
        if klass == "endpoint":
            guard.record(True, reason)

    touched: list[Unit] = []
    stopping: list[JobAborted] = []  # set on an abort: feed stops, in-flight results drain
    try:
        for run in runs:
            sent: collections.deque[tuple[Unit, int]] = collections.deque()

            async def feed(run: Run = run, sent: collections.deque[tuple[Unit, int]] = sent) -> AsyncIterator[Any]:
                def flat() -> Iterator[tuple[Unit, int, Any]]:
                    for unit in run.units:
                        yield from ((unit, slot, arg) for slot, arg in unit.pending())
                        yield (unit, -1, None)  # end of unit marker

                it = flat()
                q: collections.deque[tuple[Unit, int, Any]] = collections.deque()
                waiting = 0

                def fill() -> None:
                    nonlocal waiting
                    while waiting < settings.depth:
                        nxt = next(it, None)
                        if nxt is None:
                            return
                        unit, slot, arg = nxt
                        if slot < 0:
                            q.append((unit, -1, None))
                            continue
                        fut: Any = loop.run_in_executor(pool, prepare, arg) if pool is not None else None
                        if fut is None:
                            f2: asyncio.Future[Any] = loop.create_future()
                            try:
                                f2.set_result(prepare(arg))
                            except Exception as e:
                                f2.set_exception(e)
                            fut = f2
                        q.append((unit, slot, fut))
                        waiting += 1

                fill()
                try:
                    while q:
                        unit, slot, fut = q.popleft()
                        if slot < 0:
                            if unit.remaining == 0:
                                await write(unit)
                            fill()
                            continue
                        waiting -= 1
                        fill()
                        if not unit.touched:
                            unit.touched = True
                            touched.append(unit)
                        try:
                            value = wrap(await fut, unit, slot)
                        except Exception as e:
                            account(unit, slot, e)
                            if unit.remaining == 0:
                                await write(unit)
                            continue
                        if stopping:
                            return
                        sent.append((unit, slot))
                        summary.sent += 1
                        yield value
                finally:
                    for _, s, fut in q:
                        if s >= 0 and fut is not None:
                            fut.cancel()

            many = client.encode_many if settings.direction == "encode" else client.decode_many
            async with contextlib.aclosing(many(feed(), ordered=True, on_error="yield", **run.options)) as results:
                await _consume(results, sent, account, write, stopping)
        if writers:
            await asyncio.gather(*list(writers))
        check_writers()
    except JobAborted as e:
        summary.aborted = str(e)
        # keep what was done: write the units that got results, incomplete (no marker)
        if writers:
            await asyncio.gather(*list(writers), return_exceptions=True)
        for unit in touched:
            if unit.remaining > 0 and id(unit) not in written:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(unit.finish)
        raise
    finally:
        if writers:
            await asyncio.gather(*list(writers), return_exceptions=True)


#: How long an aborting job waits for the requests already in flight (so that every
#: answer is taken, and none is left unretrieved in the engine).
DRAIN_SECONDS = 5.0


async def _consume(
    results: Any,
    sent: collections.deque[tuple[Unit, int]],
    account: Callable[..., None],
    write: Callable[[Unit], Any],
    stopping: list[JobAborted],
) -> None:
    """Match results to slots and account them. On an abort (401/403/404, the failure
    guard, a model mismatch) intake stops at once; the answers already under way are
    taken for up to :data:`DRAIN_SECONDS` (not accounted), then the abort is raised."""
    deadline: float | None = None
    loop = asyncio.get_running_loop()
    it = results.__aiter__()
    while True:
        try:
            if deadline is None:
                r = await it.__anext__()
            else:
                r = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except TimeoutError:
            break
        unit, slot = sent.popleft()
        if stopping:
            continue
        try:
            if isinstance(r, ItemError):
                fatal = fatal_reason(r.error, unit.label(slot))
                if fatal:
                    raise JobAborted(fatal)
                account(unit, slot, r.error)
            else:
                account(unit, slot, None, r)
                room = getattr(unit, "wait_room", None)
                if room is not None:
                    await room()
            if unit.remaining == 0:
                await write(unit)
        except JobAborted as e:
            stopping.append(e)
            deadline = loop.time() + DRAIN_SECONDS
    if stopping:
        raise stopping[0]
