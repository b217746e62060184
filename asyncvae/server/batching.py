"""Replica slots and dynamic batching.

Requests wait in one FIFO queue. Each of ``slots`` replica slots takes the oldest
waiting job, adds every later waiting job with the same batch key (same model
method and input shape) while the batch holds at most ``max_batch`` items (leading
dimensions summed), and, when the batch is still short, keeps collecting arrivals
with that key until ``wait`` seconds after the oldest job arrived. It then runs the
whole batch as one call of ``run`` and hands each job its own outcome. With
``max_batch=1`` this is exactly "each replica runs one request at a time and queues
the rest".

:func:`execute` is what a slot runs on its thread for one batch: it prepares every
job's input, stacks them into one forward pass, splits the output back along dim 0
and finishes each job's answer. A job whose preparation or finishing fails gets its
own error; when the stacked forward pass fails, each job is retried alone, so one
bad request can't fail its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

__all__ = ["BatchJob", "Batcher", "execute"]


class BatchJob(Protocol):
    """What the batcher needs of a job."""

    @property
    def items(self) -> int: ...

    @property
    def batch_key(self) -> Hashable: ...


J = TypeVar("J", bound=BatchJob)
R = TypeVar("R")


@dataclass(eq=False)
class _Entry(Generic[J]):
    job: J
    future: asyncio.Future[Any]
    arrived: float
    on_start: Callable[[], None] | None


@dataclass(eq=False)
class _Gathering:
    """A partial batch a slot is holding open for more jobs with its key."""

    key: Hashable
    entries: list[_Entry[Any]]
    items: int
    full: asyncio.Event = field(default_factory=asyncio.Event)


class Batcher(Generic[J]):
    """``slots`` workers pulling batches of same-key jobs from one FIFO queue.

    ``run(jobs)`` computes a batch and returns one outcome per job, in order: a result,
    or an exception to raise to that job's submitter.
    """

    def __init__(
        self,
        slots: int,
        max_batch: int,
        wait: float,
        run: Callable[[list[J]], Awaitable[Sequence[Any]]],
    ) -> None:
        if slots < 1 or max_batch < 1 or wait < 0:
            raise ValueError("slots and max_batch must be >= 1 and wait >= 0")
        self.slots = slots
        self.max_batch = max_batch
        self.wait = wait
        self._run = run
        self._queue: collections.deque[_Entry[J]] = collections.deque()
        self._gathering: dict[Hashable, _Gathering] = {}
        self._ready: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the slot tasks in the running loop."""
        if self._tasks:
            return
        self._ready = asyncio.Condition()
        self._tasks = [
            asyncio.create_task(self._slot(), name=f"asyncvae-slot-{i}") for i in range(self.slots)
        ]

    async def stop(self, error: BaseException | None = None) -> None:
        """Stop the slots; jobs still waiting fail with ``error`` (default: cancelled)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        pending = list(self._queue) + [e for g in self._gathering.values() for e in g.entries]
        self._queue.clear()
        self._gathering.clear()
        for e in pending:
            if not e.future.done():
                if error is None:
                    e.future.cancel()
                else:
                    e.future.set_exception(error)

    @property
    def waiting(self) -> int:
        """Jobs queued or held in a partial batch (not yet computing)."""
        return len(self._queue) + sum(len(g.entries) for g in self._gathering.values())

    async def submit(self, job: J, on_start: Callable[[], None] | None = None) -> Any:
        """Queue ``job`` and wait for its outcome; ``on_start`` runs when its batch starts.

        Cancelling the caller drops the job if it hasn't started.
        """
        if self._ready is None:
            raise RuntimeError("Batcher.start() was not called")
        loop = asyncio.get_running_loop()
        entry = _Entry(job, loop.create_future(), loop.time(), on_start)
        g = self._gathering.get(job.batch_key)
        if g is not None and g.items + job.items <= self.max_batch:
            g.entries.append(entry)
            g.items += job.items
            if g.items >= self.max_batch:
                g.full.set()
        else:
            async with self._ready:
                self._queue.append(entry)
                self._ready.notify()
        return await entry.future

    async def _take(self) -> list[_Entry[J]]:
        """The next batch: the oldest live job plus later same-key jobs, up to max_batch."""
        assert self._ready is not None
        async with self._ready:
            while True:
                await self._ready.wait_for(lambda: bool(self._queue))
                head = self._queue.popleft()
                if not head.future.done():
                    break
            batch, items = [head], head.job.items
            if items < self.max_batch:
                key = head.job.batch_key
                keep: collections.deque[_Entry[J]] = collections.deque()
                for e in self._queue:
                    if e.future.done():
                        continue
                    if e.job.batch_key == key and items + e.job.items <= self.max_batch:
                        batch.append(e)
                        items += e.job.items
                    else:
                        keep.append(e)
                self._queue = keep
        if items >= self.max_batch or self.wait <= 0:
            return batch
        loop = asyncio.get_running_loop()
        left = head.arrived + self.wait - loop.time()
        if left <= 0:
            return batch
        g = _Gathering(head.job.batch_key, batch, items)
        self._gathering.setdefault(g.key, g)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await g.full.wait()
        finally:
            if self._gathering.get(g.key) is g:
                del self._gathering[g.key]
        return g.entries

    async def _slot(self) -> None:
        while True:
            batch = [e for e in await self._take() if not e.future.done()]
            if not batch:
                continue
            for e in batch:
                if e.on_start is not None:
                    e.on_start()
            try:
                outcomes = await self._run([e.job for e in batch])
            except asyncio.CancelledError:
                for e in batch:
                    if not e.future.done():
                        e.future.cancel()
                raise
            except Exception as exc:
                outcomes = [exc] * len(batch)
            for e, outcome in zip(batch, outcomes, strict=True):
                if e.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    e.future.set_exception(outcome)
                else:
                    e.future.set_result(outcome)


# --------------------------------------------------------------------------- one batch


class ModelJob(BatchJob, Protocol):
    """What :func:`execute` needs of a job (see :class:`asyncvae.server.codec.Job`)."""

    @property
    def fn(self) -> str: ...

    def prepare(self) -> torch.Tensor: ...

    def finish(self, output: torch.Tensor) -> Any: ...


@dataclass
class BatchRun:
    """What one :func:`execute` call did: one outcome per job, and the forward time."""

    outcomes: list[Any]
    compute_seconds: float
    forward_passes: int


def execute(model: Any, jobs: Sequence[ModelJob]) -> BatchRun:
    """Run ``jobs`` (same ``fn`` and input shape) through ``model`` as one forward pass.

    Blocking (call it on a replica thread). Each job's outcome is its result or the
    exception its preparation, forward pass or finishing raised.
    """
    outcomes: list[Any] = [None] * len(jobs)
    inputs: list[tuple[int, torch.Tensor]] = []
    for i, job in enumerate(jobs):
        try:
            inputs.append((i, job.prepare()))
        except Exception as e:
            outcomes[i] = e
    if not inputs:
        return BatchRun(outcomes, 0.0, 0)
    forward = getattr(model, jobs[inputs[0][0]].fn)
    t0 = time.perf_counter()
    passes = 1
    outputs: list[tuple[int, torch.Tensor]] = []
    try:
        if len(inputs) == 1:
            outputs = [(inputs[0][0], _checked(forward(inputs[0][1]), inputs[0][1]))]
        else:
            stacked = torch.cat([x for _, x in inputs])
            out = _checked(forward(stacked), stacked)
            parts = out.split([x.shape[0] for _, x in inputs])
            outputs = [(i, part) for (i, _), part in zip(inputs, parts, strict=True)]
    except Exception as e:
        if len(inputs) == 1:
            outcomes[inputs[0][0]] = e
        else:  # one bad request must not fail its neighbours: retry each alone
            passes += len(inputs)
            outputs = []
            for i, x in inputs:
                try:
                    outputs.append((i, _checked(forward(x), x)))
                except Exception as e1:
                    outcomes[i] = e1
    compute = time.perf_counter() - t0
    for i, out in outputs:
        try:
            outcomes[i] = jobs[i].finish(out)
        except Exception as e:
            outcomes[i] = e
    return BatchRun(outcomes, compute, passes)


def _checked(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if out.shape[0] != x.shape[0]:
        raise RuntimeError(
            f"the model answered {out.shape[0]} items for a batch of {x.shape[0]}; "
            "it must keep the batch dimension"
        )
    return out
