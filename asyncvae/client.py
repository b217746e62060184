"""The engine: :class:`Client` — one connection pool, a bounded work queue, a fixed set
of workers, retries with backoff, byte-bounded buffering, request coalescing, many
endpoints, and ordered results.

Data flow: ``decode()``/``decode_many()`` validate and build a request
(:mod:`asyncvae.protocol`, nothing is sent for bad input) → a job enters the bounded
queue (submitters wait when it is full) → a worker takes it (or a batch of matching
jobs), picks the least-loaded healthy endpoint and runs one exchange
(:mod:`asyncvae.transport`) inside the retry loop → the payload becomes the caller's
value (:mod:`asyncvae.convert`) → the job's future. ``decode_many`` reassembles
results in input order within a bounded window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import os
import random
import ssl as ssl_module
import time
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import torch
from tenacity import AsyncRetrying, RetryCallState, RetryError, retry_if_exception
from yarl import URL

from . import convert, protocol, transport
from ._stats import Stats
from .config import Limits, Retry, Timeout
from .errors import (
    AsyncVAEError,
    EndpointError,
    InputError,
    ItemError,
    ProtocolError,
    RetryExhausted,
    TransportError,
    error_kind,
)
from .protocol import DecodeOptions, WireRequest

__all__ = ["Client"]

OnError = Literal["yield", "raise"]

#: Option names ``decode`` accepts (the documented ``remote_decode`` keywords).
DECODE_OPTIONS = frozenset(DecodeOptions.__dataclass_fields__)
ENCODE_OPTIONS = frozenset({"scaling_factor", "shift_factor"})
_DEPRECATED_TENSOR_TYPES = ("input_tensor_type", "output_tensor_type")

#: An endpoint failing this many times in a row is rested.
REST_AFTER_FAILURES = 3
REST_MIN = 0.5
REST_MAX = 30.0


# --------------------------------------------------------------------------- helpers


class _Waiters:
    """FIFO of futures to wake: the small primitive under the budget and the queue."""

    def __init__(self) -> None:
        self._futs: collections.deque[asyncio.Future[None]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._futs)

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futs.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.wake_one()  # we were woken but leave: pass the turn on
            else:
                with contextlib.suppress(ValueError):
                    self._futs.remove(fut)
            raise

    def wake_all(self) -> None:
        while self._futs:
            fut = self._futs.popleft()
            if not fut.done():
                fut.set_result(None)

    def wake_one(self) -> None:
        while self._futs:
            fut = self._futs.popleft()
            if not fut.done():
                fut.set_result(None)
                return


class _ByteBudget:
    """``Limits.max_inflight_bytes``: waits for room (FIFO); one oversize item may pass alone."""

    def __init__(self, limit: int, stats: Stats):
        self.limit = limit
        self.used = 0
        self._stats = stats
        self._waiters = _Waiters()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int, urgent: Callable[[], bool] | None = None) -> None:
        """Take ``n`` bytes, waiting for room. ``urgent()`` true lets it overdraw: the
        ordered iterator is blocked on exactly this item, and the bytes in use may all
        be finished results queued behind it, which only it can release."""
        if n <= 0:
            return
        while self._waiters or not self._fits(n):
            if urgent is not None and urgent():
                break
            await self._waiters.wait()
            if self._fits(n) or (urgent is not None and urgent()):
                break
        self.used += n
        self._stats._set("inflight_bytes", self.used)
        if self._waiters and self.used < self.limit:
            self._waiters.wake_one()  # room may remain for the next in line

    def release(self, n: int) -> None:
        if n <= 0:
            return
        self.used -= n
        self._stats._set("inflight_bytes", self.used)
        self._waiters.wake_one()

    def recheck(self) -> None:
        """Wake every waiter to re-test its ``urgent()`` (the ordered head moved)."""
        if self._waiters:
            self._waiters.wake_all()


class _HeadBudget:
    """The client's budget as one attempt sees it: may overdraw while one of its
    jobs is the item an ordered iterator is waiting for."""

    __slots__ = ("_budget", "_jobs")

    def __init__(self, budget: _ByteBudget, jobs: list[_Job]):
        self._budget = budget
        self._jobs = jobs

    def _urgent(self) -> bool:
        return any(j.is_head is not None and j.is_head() for j in self._jobs)

    async def acquire(self, n: int) -> None:
        await self._budget.acquire(n, self._urgent)

    def release(self, n: int) -> None:
        self._budget.release(n)


@dataclass(eq=False)
class _Job:
    op: str  # "decode" | "encode"
    payload: Any
    opts: Any  # DecodeOptions | (scaling, shift)
    request: WireRequest
    future: asyncio.Future[Any]
    index: int = -1
    batch_key: Any = None
    leading: int = 1
    deadline: float | None = None
    submitted: float = field(default_factory=time.perf_counter)
    on_progress: Callable[[int, int | None], None] | None = None
    held: int = 0
    release_on_done: bool = True
    #: for ordered ``*_many`` jobs: whether the iterator now waits for this one
    is_head: Callable[[], bool] | None = None


class _WorkQueue:
    """A bounded FIFO whose consumers can take a batch of matching jobs at once."""

    def __init__(self, maxsize: int, stats: Stats):
        self.maxsize = maxsize
        self._items: collections.deque[_Job] = collections.deque()
        self._putters = _Waiters()
        self._getters = _Waiters()
        self._stats = stats

    def __len__(self) -> int:
        return len(self._items)

    def _changed(self) -> None:
        self._stats._set("queued", len(self._items))

    async def put(self, job: _Job) -> None:
        while len(self._items) >= self.maxsize:
            await self._putters.wait()
        self._items.append(job)
        self._changed()
        self._getters.wake_one()

    def discard(self, job: _Job) -> None:
        try:
            self._items.remove(job)
        except ValueError:
            return
        self._changed()
        self._putters.wake_one()

    def clear(self) -> list[_Job]:
        items = list(self._items)
        self._items.clear()
        self._changed()
        return items

    async def get_batch(self, max_batch: int, wait: float) -> list[_Job]:
        while not self._items:
            await self._getters.wait()
        batch = [self._items.popleft()]
        if max_batch > 1 and batch[0].batch_key is not None:
            self._take_matching(batch, max_batch)
            if len(batch) < max_batch and wait > 0:
                self._pass_on()
                await asyncio.sleep(wait)  # let a partial batch fill up once
                self._take_matching(batch, max_batch)
        self._pass_on()
        return batch

    def _pass_on(self) -> None:
        self._changed()
        self._putters.wake_one()
        if self._items:
            self._getters.wake_one()

    def _take_matching(self, batch: list[_Job], max_batch: int) -> None:
        key = batch[0].batch_key
        keep: list[_Job] = []
        scanned = 0
        while self._items and len(batch) < max_batch and scanned < 4 * max_batch:
            job = self._items.popleft()
            scanned += 1
            (batch if job.batch_key == key else keep).append(job)
        self._items.extendleft(reversed(keep))


class _Endpoint:
    """One replica URL with its load and health."""

    def __init__(self, url: URL, credential: tuple[Any, str] | None):
        self.url = url
        self.credential = credential
        self.outstanding = 0
        self.failures = 0
        self.rests = 0
        self.rested_until = 0.0
        self.probing = False

    def available(self, now: float) -> bool:
        return now >= self.rested_until and not self.probing

    def __repr__(self) -> str:
        return f"<endpoint {self.url.with_query(None)} outstanding={self.outstanding} failures={self.failures}>"


def _decode_options(kw: dict[str, Any]) -> DecodeOptions:
    unknown = set(kw) - DECODE_OPTIONS - set(_DEPRECATED_TENSOR_TYPES)
    if unknown:
        raise InputError(
            f"unknown decode option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(DECODE_OPTIONS))}"
        )
    for name in _DEPRECATED_TENSOR_TYPES:
        value = kw.pop(name, "binary")
        if value == "base64":
            warnings.warn(f"{name}='base64' is deprecated; using 'binary'", FutureWarning, stacklevel=4)
        elif value != "binary":
            raise InputError(f"{name}={value!r} is not supported; use 'binary'")
    return DecodeOptions(**kw)


def _encode_options(kw: dict[str, Any]) -> tuple[float | None, float | None]:
    unknown = set(kw) - ENCODE_OPTIONS
    if unknown:
        raise InputError(
            f"unknown encode option(s) {', '.join(sorted(unknown))}; valid: scaling_factor, shift_factor"
        )
    return kw.get("scaling_factor"), kw.get("shift_factor")


# --------------------------------------------------------------------------- client


class Client:
    """An asyncio client for remote VAE endpoints.

    ::

        async with asyncvae.Client("http://127.0.0.1:8000/") as client:
            image = await client.decode(latents, scaling_factor=0.18215)
            async for img in client.decode_many(batches, output_type="pt", partial_postprocess=True):
                ...

    Args:
        endpoints: one endpoint URL, or several replicas of the same model; each request
            goes to the healthy one with the fewest outstanding requests, and one that
            keeps failing is rested (then probed) so a dead replica slows nothing down.
        limits: concurrency, queue, memory and coalescing bounds (:class:`Limits`).
        timeout: connect/read/attempt/total limits (:class:`Timeout`).
        retry: the retry policy (:class:`Retry`); ``Retry.none()`` disables retries.
        token: a Hugging Face token sent as ``Authorization: Bearer`` to the endpoints'
            own origins only (never after a redirect to another host). ``None`` reads
            ``HF_TOKEN`` from the environment; ``False`` sends none.
        headers: extra request headers.
        verify: TLS certificate verification (default on), or an ``ssl.SSLContext``.
            ``False`` turns it off and warns.

    A client belongs to the event loop it is first used in. Close it with
    ``async with`` or :meth:`aclose`.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        limits: Limits | None = None,
        timeout: Timeout | None = None,
        retry: Retry | None = None,
        token: str | bool | None = None,
        headers: dict[str, str] | None = None,
        verify: bool | ssl_module.SSLContext = True,
    ) -> None:
        if isinstance(endpoints, (str, URL)):
            urls: list[Any] = [endpoints]
        elif isinstance(endpoints, Sequence):
            urls = list(endpoints)
        else:
            raise InputError(
                f"endpoints must be an http(s) URL string or a list of them, got {type(endpoints).__name__}"
            )
        if not urls:
            raise InputError("Client needs at least one endpoint URL")
        self.limits = limits if limits is not None else Limits()
        self.timeout = timeout if timeout is not None else Timeout()
        self.retry = retry if retry is not None else Retry()
        for name, value, cls in (("limits", self.limits, Limits), ("timeout", self.timeout, Timeout), ("retry", self.retry, Retry)):
            if not isinstance(value, cls):
                raise InputError(f"{name} must be an asyncvae.{cls.__name__}, got {type(value).__name__}")
        if token is None:
            token = os.environ.get("HF_TOKEN") or None
        auth = f"Bearer {token}" if isinstance(token, str) and token else None
        self._endpoints = [
            _Endpoint(u, (transport.origin(u), auth) if auth else None)
            for u in (transport.parse_endpoint(e) for e in urls)
        ]
        if verify is False:
            warnings.warn(
                "TLS certificate verification is off (verify=False): responses can be forged "
                "and your token read by anyone on the path",
                stacklevel=2,
            )
        self._ssl: Any = verify
        self._headers: dict[str, str] = {"User-Agent": "asyncvae", "Accept-Encoding": "identity"}
        if headers:
            self._headers.update(headers)
        if self.retry.scale_up_timeout is not None:
            self._headers[protocol.HEADER_SCALE_UP_TIMEOUT] = str(int(self.retry.scale_up_timeout))
        self.stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._queue: _WorkQueue | None = None
        self._budget: _ByteBudget | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[int, list[_Job]] = {}
        self._closed = False
        self._rng = random.Random()
        self._rr = 0

    # ---- lifecycle
    def __repr__(self) -> str:
        urls = ", ".join(str(e.url.with_query(None)) for e in self._endpoints)
        return f"<asyncvae.Client [{urls}] {self.stats!r}>"

    @property
    def endpoints(self) -> list[str]:
        """The endpoint URLs, in the order given."""
        return [str(e.url) for e in self._endpoints]

    async def __aenter__(self) -> Client:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise InputError("this Client is closed; create a new one")
        if self._loop is not None:
            if self._loop is not loop:
                raise InputError("this Client belongs to another event loop; create one per loop")
            return
        self._loop = loop
        lim = self.limits
        self._session = transport.make_session(
            limit=lim.max_concurrency,
            limit_per_host=lim.connections_per_host,
            keepalive_timeout=lim.keepalive_timeout,
            ssl_context=self._ssl,
        )
        self._queue = _WorkQueue(lim.max_queued, self.stats)
        self._budget = _ByteBudget(lim.max_inflight_bytes, self.stats)
        self._workers = [loop.create_task(self._worker(i), name=f"asyncvae-worker-{i}") for i in range(lim.max_concurrency)]

    async def aclose(self) -> None:
        """Cancel queued and running work, stop the workers and close the pool."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None:
            for job in self._queue.clear():
                job.future.cancel()
        for w in self._workers:
            w.cancel()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- single calls
    async def decode(
        self, tensor: torch.Tensor, *, on_progress: Callable[[int, int | None], None] | None = None, **options: Any
    ) -> Any:
        """Decode one latent tensor; options and result as :func:`asyncvae.remote_decode`.

        ``on_progress(received_bytes, total_bytes)`` is called as the body streams in.
        Raises :class:`InputError` (nothing sent), :class:`EndpointError` (non-retryable
        HTTP error), :class:`RetryExhausted`, or :class:`ProtocolError`.
        """
        job = self._decode_job(tensor, _decode_options(options), on_progress=on_progress)
        return await self._call(job)

    async def encode(self, image: Any, **options: Any) -> torch.Tensor:
        """Encode one PIL image or image tensor into latents (see :func:`asyncvae.remote_encode`)."""
        job = self._encode_job(image, _encode_options(options))
        return await self._call(job)

    async def _call(self, job: _Job) -> Any:
        self._start()
        assert self._queue is not None
        self.stats.submitted += 1
        try:
            await self._queue.put(job)
            return await job.future
        except asyncio.CancelledError:
            self._cancel_job(job)
            raise

    # ---- many
    def decode_many(
        self,
        items: Iterable[torch.Tensor] | AsyncIterable[torch.Tensor],
        *,
        ordered: bool = True,
        on_error: OnError = "yield",
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Decode many latents concurrently; an async iterator of results.

        ``items`` may be any iterable or async iterable; it is read lazily (a generator
        of a million items is never materialised). With ``ordered=True`` (default),
        results come in input order; with ``ordered=False``, ``(index, result)`` pairs
        come as they complete. A failed item gives an :class:`ItemError` (with
        ``.index`` and ``.error``) in its place, or, with ``on_error="raise"``, raises
        its error and stops. Close the iterator early with ``aclose()`` (or
        ``contextlib.aclosing``) to cancel what is still running.
        """
        opts = _decode_options(options)
        return self._many(items, lambda item, i: self._decode_job(item, opts, index=i), ordered, on_error)

    def encode_many(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        on_error: OnError = "yield",
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Encode many images concurrently; like :meth:`decode_many`."""
        opts = _encode_options(options)
        return self._many(items, lambda item, i: self._encode_job(item, opts, index=i), ordered, on_error)

    async def _many(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        make_job: Callable[[Any, int], _Job],
        ordered: bool,
        on_error: OnError,
    ) -> AsyncIterator[Any]:
        if on_error not in ("yield", "raise"):
            raise InputError(f"on_error={on_error!r} must be 'yield' or 'raise'")
        self._start()
        assert self._queue is not None
        window = asyncio.Semaphore(self.limits.reorder_window)
        jobs: dict[int, _Job] = {}
        completed: collections.deque[int] = collections.deque()
        wake = asyncio.Event()
        state: dict[str, Any] = {"total": None, "next": 0}

        def on_done(fut: asyncio.Future[Any], i: int) -> None:
            completed.append(i)
            wake.set()

        async def produce() -> None:
            i = 0
            try:
                async for item in _aiter(items):
                    await window.acquire()
                    try:
                        job = make_job(item, i)
                    except AsyncVAEError as e:
                        job = self._failed_job(i, e)
                    job.release_on_done = False
                    if ordered:
                        job.is_head = lambda i=i: state["next"] == i
                    jobs[i] = job
                    self.stats.submitted += 1
                    job.future.add_done_callback(lambda f, i=i: on_done(f, i))
                    i += 1
                    if not job.future.done():
                        await self._queue.put(job)  # type: ignore[union-attr]
            finally:
                state["total"] = i
                wake.set()

        producer = asyncio.get_running_loop().create_task(produce(), name="asyncvae-producer")
        producer.add_done_callback(lambda _: wake.set())
        next_index = 0
        try:
            while True:
                if ordered:
                    job = jobs.get(next_index)
                    ready = job is not None and job.future.done()
                else:
                    ready = bool(completed)
                    if ready:
                        job = jobs[completed.popleft()]
                if ready:
                    assert job is not None
                    del jobs[job.index]
                    next_index += ordered
                    value = self._outcome(job)
                    if ordered:
                        state["next"] = next_index
                        self._budget.recheck()  # type: ignore[union-attr]
                    window.release()
                    if isinstance(value, ItemError) and on_error == "raise":
                        raise value.error
                    yield value if ordered else (job.index, value)
                    continue
                if producer.done():
                    if not producer.cancelled() and producer.exception() is not None:
                        raise producer.exception()  # type: ignore[misc]
                    if not jobs:
                        break
                wake.clear()
                await wake.wait()
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            for job in jobs.values():
                self._cancel_job(job)
                if job.future.done() and not job.future.cancelled():
                    self._release(job)

    def _outcome(self, job: _Job) -> Any:
        """A finished job's value (budget released) or its :class:`ItemError`."""
        fut = job.future
        if fut.cancelled():
            return ItemError(job.index, asyncio.CancelledError())
        exc = fut.exception()
        if exc is not None:
            return ItemError(job.index, exc)
        self._release(job)
        return fut.result()

    # ---- jobs
    def _new_future(self) -> asyncio.Future[Any]:
        self._start()
        assert self._loop is not None
        return self._loop.create_future()

    def _deadline(self) -> float | None:
        return None if self.timeout.total is None else time.monotonic() + self.timeout.total

    def _decode_job(
        self, tensor: Any, opts: DecodeOptions, *, index: int = -1, on_progress: Any = None
    ) -> _Job:
        req = protocol.decode_request(tensor, opts)
        key = None
        if self.limits.max_batch > 1 and opts.expects_tensor and tensor.dim() in (3, 4):
            key = ("decode", tuple(tensor.shape[1:]), tensor.dtype, opts, req.params[tensor.dim() + 3 :])
        return _Job(
            "decode", tensor, opts, req, self._new_future(), index=index, batch_key=key,
            leading=int(tensor.shape[0]), deadline=self._deadline(), on_progress=on_progress,
        )

    def _encode_job(self, image: Any, opts: tuple[float | None, float | None], *, index: int = -1) -> _Job:
        req = protocol.encode_request(image, *opts)
        key = None
        leading = 1
        if isinstance(image, torch.Tensor):
            leading = int(image.shape[0]) if image.dim() == 4 else 1
            if self.limits.max_batch > 1 and image.dim() == 4:
                key = ("encode", tuple(image.shape[1:]), image.dtype, opts)
        return _Job("encode", image, opts, req, self._new_future(), index=index, batch_key=key,
                    leading=leading, deadline=self._deadline())

    def _failed_job(self, index: int, error: BaseException) -> _Job:
        fut = self._new_future()
        fut.set_exception(error)
        fut.exception()  # mark retrieved
        self.stats._item_failed("input")
        return _Job("failed", None, None, WireRequest((), {}, b"", "bytes"), fut, index=index)

    def _cancel_job(self, job: _Job) -> None:
        if not job.future.done():
            job.future.cancel()
        if self._queue is not None:
            self._queue.discard(job)
        for wid, batch in list(self._running.items()):
            if job in batch and all(j.future.done() for j in batch):
                self._workers[wid].cancel()

    def _release(self, job: _Job) -> None:
        if job.held and self._budget is not None:
            held, job.held = job.held, 0
            self._budget.release(held)

    # ---- workers
    async def _worker(self, wid: int) -> None:
        assert self._queue is not None
        me = asyncio.current_task()
        assert me is not None
        while True:
            batch = await self._queue.get_batch(self.limits.max_batch, self.limits.max_batch_wait)
            live = [j for j in batch if not j.future.done()]
            if not live:
                continue
            self._running[wid] = live
            try:
                await self._execute(live)
            except asyncio.CancelledError:
                if self._closed:
                    for j in live:
                        if not j.future.done():
                            j.future.cancel()
                    raise
                me.uncancel()  # the jobs' callers cancelled; keep serving
            finally:
                self._running.pop(wid, None)
                # an idle worker must not keep its last jobs (futures -> results) alive:
                # with 64 workers and 56 MiB answers that is 3.5 GiB the caller already dropped
                batch = live = None  # type: ignore[assignment]

    async def _execute(self, jobs: list[_Job]) -> None:
        self.stats._set("in_flight", self.stats.in_flight + len(jobs))
        try:
            try:
                values, held = await self._with_retries(jobs)
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    raise
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                        self.stats._item_failed(error_kind(e))
                return
            for j, v, h in zip(jobs, values, held, strict=False):
                if j.future.done():
                    if h and self._budget is not None:
                        self._budget.release(h)
                    continue
                j.held = h
                j.future.set_result(v)
                if j.release_on_done:
                    self._release(j)
                self.stats._item_done(time.perf_counter() - j.submitted)
        finally:
            self.stats._set("in_flight", self.stats.in_flight - len(jobs))

    def _batch_request(self, jobs: list[_Job]) -> WireRequest:
        if len(jobs) == 1:
            return jobs[0].request
        stacked = torch.cat([j.payload for j in jobs], dim=0)
        if jobs[0].op == "decode":
            return protocol.decode_request(stacked, jobs[0].opts)
        return protocol.encode_request(stacked, *jobs[0].opts)

    async def _with_retries(self, jobs: list[_Job]) -> tuple[list[Any], list[int]]:
        req = self._batch_request(jobs)
        if len(jobs) > 1:
            self.stats.batches += 1
            self.stats.coalesced += len(jobs)
        deadlines = [j.deadline for j in jobs if j.deadline is not None]
        deadline = min(deadlines) if deadlines else None
        try:  # fast path: most calls succeed at the first attempt, without retry bookkeeping
            return await self._attempt(jobs, req, deadline)
        except (EndpointError, TransportError, ProtocolError) as e:
            if not self._retryable(e):
                raise
            first = e
        return await self._retry_loop(jobs, req, deadline, first)

    def _retryable(self, e: BaseException) -> bool:
        if isinstance(e, EndpointError):
            return e.status in self.retry.statuses
        return isinstance(e, (TransportError, ProtocolError)) and e.retryable

    async def _retry_loop(
        self, jobs: list[_Job], req: WireRequest, deadline: float | None, first: BaseException
    ) -> tuple[list[Any], list[int]]:
        """Attempts 2..N under tenacity, after the first attempt failed with ``first``."""
        policy = self.retry
        first_503: list[float] = []

        def stop(attempts: int, e: BaseException | None) -> bool:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return True
            if isinstance(e, EndpointError) and e.status == 503 and policy.unavailable_patience > 0:
                if not first_503:
                    first_503.append(now)
                if now - first_503[0] < policy.unavailable_patience:
                    return False
            return attempts >= policy.attempts

        def wait(attempts: int, e: BaseException | None) -> float:
            ra = e.retry_after if isinstance(e, EndpointError) else None
            w = policy.wait_for(attempts, ra, self._rng)
            return w if deadline is None else min(w, max(0.0, deadline - time.monotonic()))

        def exhausted(last: BaseException, attempts: int) -> RetryExhausted:
            late = deadline is not None and time.monotonic() >= deadline
            return RetryExhausted(last, attempts, reason="deadline passed" if late else "retries exhausted")

        def outcome(rs: RetryCallState) -> BaseException | None:
            return rs.outcome.exception() if rs.outcome else None

        if stop(1, first):
            raise exhausted(first, 1) from first
        pause = wait(1, first)
        self.stats._retry(error_kind(first), pause)
        await asyncio.sleep(pause)
        retrying = AsyncRetrying(
            retry=retry_if_exception(self._retryable),
            stop=lambda rs: stop(rs.attempt_number + 1, outcome(rs)),
            wait=lambda rs: wait(rs.attempt_number + 1, outcome(rs)),
            before_sleep=lambda rs: self.stats._retry(error_kind(outcome(rs)), rs.upcoming_sleep),
            reraise=False,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(jobs, req, deadline)
        except RetryError as e:
            last = e.last_attempt.exception()
            assert last is not None
            raise exhausted(last, e.last_attempt.attempt_number + 1) from last
        raise AssertionError("unreachable")  # pragma: no cover

    def _pick(self) -> _Endpoint:
        now = time.monotonic()
        eps = self._endpoints
        if len(eps) == 1:
            return eps[0]
        n = len(eps)
        self._rr = (self._rr + 1) % n
        order = eps[self._rr :] + eps[: self._rr]
        live = [e for e in order if e.available(now)]
        if live:
            best = min(live, key=lambda e: e.outstanding)
            if best.rested_until and best.failures >= REST_AFTER_FAILURES:
                best.probing = True  # half-open: one probe until it answers
            return best
        return min(eps, key=lambda e: e.rested_until)

    def _note(self, ep: _Endpoint, ok: bool, e: BaseException | None = None) -> None:
        ep.probing = False
        if ok:
            ep.failures = 0
            ep.rests = 0
            ep.rested_until = 0.0
            return
        if isinstance(e, EndpointError) and e.status < 500 and e.status not in (408, 429):
            return  # the request was bad, not the endpoint
        ep.failures += 1
        if ep.failures >= REST_AFTER_FAILURES and len(self._endpoints) > 1:
            ep.rests += 1
            ep.rested_until = time.monotonic() + min(REST_MAX, REST_MIN * 2 ** (ep.rests - 1))

    async def _attempt(self, jobs: list[_Job], req: WireRequest, deadline: float | None) -> tuple[list[Any], list[int]]:
        assert self._session is not None
        ep = self._pick()
        t = self.timeout
        attempt_t = t.attempt
        if deadline is not None:
            left = max(0.001, deadline - time.monotonic())
            attempt_t = left if attempt_t is None else min(attempt_t, left)
        on_progress = jobs[0].on_progress if len(jobs) == 1 else None
        ep.outstanding += 1
        self.stats.requests += 1
        self.stats.bytes_out += req.nbytes
        try:
            reply = await transport.exchange(
                self._session, ep.url, req,
                headers=self._headers, credential=ep.credential,
                timeout=transport.client_timeout(t.connect, t.read, attempt_t),
                max_response_bytes=self.limits.max_response_bytes,
                budget=_HeadBudget(self._budget, jobs) if jobs[0].is_head is not None else self._budget,
                on_progress=on_progress,
            )
        except asyncio.CancelledError:
            ep.probing = False
            raise
        except BaseException as e:
            self._note(ep, False, e)
            raise
        finally:
            ep.outstanding -= 1
        self._note(ep, True)
        self.stats.bytes_in += reply.bytes_in
        try:
            return await self._results(jobs, reply)
        except BaseException:
            if reply.held and self._budget is not None:
                self._budget.release(reply.held)
            raise

    async def _results(self, jobs: list[_Job], reply: transport.Reply) -> tuple[list[Any], list[int]]:
        if reply.tensor is None:
            assert reply.data is not None and len(jobs) == 1
            job = jobs[0]
            opts = job.opts
            max_pixels = self.limits.max_response_bytes // 3
            if convert.needs_thread(opts):
                value = await asyncio.to_thread(convert.bytes_result, reply.data, opts, max_pixels=max_pixels)
            else:
                value = convert.bytes_result(reply.data, opts, max_pixels=max_pixels)
            return [value], [reply.held]
        t = reply.tensor
        if len(jobs) == 1:
            parts = [t]
        else:
            sizes = [j.leading for j in jobs]
            if t.dim() == 0 or t.shape[0] != sum(sizes):
                raise ProtocolError(
                    f"batched response has leading dimension {t.shape[0] if t.dim() else 0}, expected "
                    f"{sum(sizes)}; this endpoint may not support batches — use Limits(max_batch=1)"
                )
            parts = list(t.split(sizes, dim=0))
        total = sum(j.leading for j in jobs)
        held = [reply.held * j.leading // total for j in jobs]
        held[-1] += reply.held - sum(held)
        if jobs[0].op == "encode":
            return parts, held
        opts = jobs[0].opts
        if convert.needs_thread(opts):
            values = await asyncio.to_thread(lambda: [convert.tensor_result(p, opts) for p in parts])
        else:
            values = [convert.tensor_result(p, opts) for p in parts]
        return values, held


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable) or hasattr(items, "__aiter__"):
        async for x in items:  # type: ignore[union-attr]
            yield x
    elif isinstance(items, (torch.Tensor,)) or inspect.isawaitable(items):
        raise InputError("items must be an iterable of tensors/images, not a single tensor")
    else:
        for x in items:
            yield x
