"""The engine's front: :class:`Client`, a thin facade over parts that each have one job.

==========================  ==========================================================
part                        job
==========================  ==========================================================
``protocol.DecodePlan``     options checked once; per-shape request facts cached
``_budget.FifoSemaphore``   request slots (``max_concurrency`` items in flight), FIFO
``_budget.ByteBudget``      response bytes, reserved as a lease *before* sending
``_pool.EndpointPool``      least-outstanding choice, health, rests, Retry-After rests
``_retry.RetryPolicy``      retry / stop / wait, once per client, in tenacity's terms
``_exchange.exchange``      one attempt: redirects, credentials, sized streamed body
``_coalesce.Coalescer``     same-shaped items batched into one request, split back
``_many.ManyIterator``      ``*_many``: lazy snapshotted intake, runners, ordered results
``transport.*Transport``    sockets: native HTTP/1.1, aiohttp, or in-memory
==========================  ==========================================================

A single call runs in its caller's task: reserve its answer's bytes → take a slot →
attempt (retrying as the policy says) → convert → release. Nothing is queued to a
worker; backpressure is the wait for a slot or for budget, both FIFO, both ended with
:class:`~asyncvae.ClientClosedError` when the client closes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl as ssl_module
import time
import warnings
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from yarl import URL

from . import convert, protocol
from ._budget import ByteBudget, FifoSemaphore, Lease
from ._coalesce import Coalescer, Pending, split, stack_body
from ._exchange import Reply, exchange
from ._many import ManyIterator
from ._pool import EndpointPool
from ._retry import CallContext, NoTimeLeft, RetryPolicy
from ._stats import Stats
from .config import Limits, Retry, Timeout
from .errors import (
    AsyncVAEError,
    ClientClosedError,
    InputError,
    RetryExhausted,
    TransportError,
    error_kind,
)
from .protocol import DecodeOptions, DecodePlan, EncodePlan, WireRequest
from .transport import Timeouts, Transport

__all__ = ["Client"]

OnError = Literal["yield", "raise"]
TransportChoice = Literal["native", "aiohttp"]

#: Option names ``decode`` accepts (the documented ``remote_decode`` keywords).
DECODE_OPTIONS = frozenset(DecodeOptions.__dataclass_fields__)
ENCODE_OPTIONS = frozenset({"scaling_factor", "shift_factor"})
_DEPRECATED_TENSOR_TYPES = ("input_tensor_type", "output_tensor_type")
#: Plans (checked options) a client remembers, for repeated single calls.
_PLANS = 64
#: Request bodies above this many bytes are copied off the event loop.
_BIG_COPY = 8 << 20
#: No attempt is started with less than this left of ``Timeout.total``: it could not
#: finish, and it would cost the endpoint work for nothing.
_MIN_ATTEMPT = 0.01


def decode_options(kw: dict[str, Any]) -> DecodeOptions:
    """The :class:`DecodeOptions` of ``remote_decode``-style keywords (unknown names and
    the deprecated ``*_tensor_type`` values handled here)."""
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


def encode_options(kw: dict[str, Any]) -> tuple[float | None, float | None]:
    unknown = set(kw) - ENCODE_OPTIONS
    if unknown:
        raise InputError(
            f"unknown encode option(s) {', '.join(sorted(unknown))}; valid: scaling_factor, shift_factor"
        )
    return kw.get("scaling_factor"), kw.get("shift_factor")


def parse_endpoint(endpoint: Any) -> URL:
    """Check an endpoint URL (raises :class:`InputError` with what to fix)."""
    if not isinstance(endpoint, (str, URL)):
        raise InputError(f"endpoint must be an http(s) URL string, got {type(endpoint).__name__}")
    try:
        url = URL(str(endpoint))
    except (ValueError, TypeError) as e:
        raise InputError(f"endpoint {endpoint!r} is not a valid URL: {e}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InputError(
            f"endpoint {endpoint!r} is not an http(s) URL; expected e.g. "
            "'https://xxxx.endpoints.huggingface.cloud/' or 'http://127.0.0.1:8000/'"
        )
    return url


class _Op:
    """One kind of call (decode or encode) with its checked options: prepares requests
    and turns answers into the caller's values."""

    __slots__ = ("client", "headers", "kind", "opts", "plan")

    def __init__(self, client: Client, kind: str, plan: DecodePlan | EncodePlan) -> None:
        self.client = client
        self.kind = kind
        self.plan = plan
        self.opts = plan.opts if isinstance(plan, DecodePlan) else None
        #: every request header of this kind of call (the client's, then the plan's)
        self.headers: tuple[tuple[str, str], ...] = client._headers + tuple(plan.headers.items())

    def prepare(self, item: Any, copy: bool) -> Any:
        """A :class:`WireRequest` for ``item``, or a callable that makes one in a thread
        (large PIL images, device or very large tensors)."""
        if isinstance(item, torch.Tensor):
            if item.layout is torch.strided and (not item.is_cpu or item.nbytes > _BIG_COPY):
                self.plan.facts(item)  # bad input fails now, on the caller's side
                return functools.partial(self.plan.request, item, copy=copy)
        elif isinstance(item, Image.Image) and item.width * item.height > protocol.PNG_THREAD_PIXELS:
            snap = item.copy() if copy else item
            return functools.partial(self.plan.request, snap)
        return self.plan.request(item, copy=copy)

    async def finish(self, reply: Reply | torch.Tensor) -> Any:
        """The caller's value from an answer (or a coalesced answer's part)."""
        if self.opts is None:  # encode: the latents as they came
            return reply.tensor if isinstance(reply, Reply) else reply
        opts = self.opts
        if isinstance(reply, torch.Tensor) or reply.tensor is not None:
            t = reply if isinstance(reply, torch.Tensor) else reply.tensor
            if convert.needs_thread(opts):
                return await asyncio.to_thread(convert.tensor_result, t, opts)
            return convert.tensor_result(t, opts)
        assert reply.data is not None
        max_pixels = self.client.limits.max_response_bytes // 3
        if convert.needs_thread(opts):
            return await asyncio.to_thread(convert.bytes_result, reply.data, opts, max_pixels=max_pixels)
        return convert.bytes_result(reply.data, opts, max_pixels=max_pixels)

    async def run(self, prepared: Any, on_progress: Any = None) -> tuple[Any, int]:
        """Send one prepared request; ``(value, answer bytes)``."""
        if callable(prepared):
            prepared = await asyncio.get_running_loop().run_in_executor(None, prepared)
        return await self.client._submit(self, prepared, on_progress)


class Client:
    """An asyncio client for remote VAE endpoints.

    ::

        async with asyncvae.Client("http://127.0.0.1:8000/") as client:
            image = await client.decode(latents, scaling_factor=0.18215)
            async for img in client.decode_many(batches, output_type="pt", partial_postprocess=True):
                ...

    Args:
        endpoints: one endpoint URL, or several replicas of the same model; each attempt
            goes to the healthy one with the fewest outstanding requests, and one that
            keeps failing is rested (then probed) so a dead replica slows nothing down.
        limits: concurrency, read-ahead, memory and coalescing bounds (:class:`Limits`).
        timeout: connect/read/attempt/total limits (:class:`Timeout`).
        retry: the retry policy (:class:`Retry`); ``Retry.none()`` disables retries.
        token: a Hugging Face token sent as ``Authorization: Bearer`` to the endpoints'
            own origins only (never after a redirect to another origin). ``None`` reads
            ``HF_TOKEN`` from the environment; ``False`` sends none.
        headers: extra request headers (sent to the endpoints' origins only, like the
            token; an ``Authorization`` given here wins over ``token``).
        verify: TLS certificate verification (default on), or an ``ssl.SSLContext``.
            ``False`` turns it off and warns.
        transport: ``"native"`` (default: HTTP/1.1 on asyncio, bodies streamed straight
            into the result tensor), ``"aiohttp"``, or a
            :class:`~asyncvae.transport.Transport` instance (e.g. a
            :class:`~asyncvae.transport.memory.MemoryTransport` in tests), which the
            client then owns and closes.

    A client belongs to the event loop it is first used in. Close it with
    ``async with`` or :meth:`aclose`: every call still waiting or running then ends
    with :class:`~asyncvae.ClientClosedError`.
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
        transport: TransportChoice | Transport = "native",
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
        for name, value, cls in (("limits", self.limits, Limits), ("timeout", self.timeout, Timeout),
                                 ("retry", self.retry, Retry)):
            if not isinstance(value, cls):
                raise InputError(f"{name} must be an asyncvae.{cls.__name__}, got {type(value).__name__}")
        if not (transport in ("native", "aiohttp") or isinstance(transport, Transport)):
            raise InputError(f"transport must be 'native', 'aiohttp' or a Transport, got {transport!r}")
        self._urls = [parse_endpoint(u) for u in urls]
        if verify is False:
            warnings.warn(
                "TLS certificate verification is off (verify=False): responses can be forged "
                "and your token read by anyone on the path",
                stacklevel=2,
            )
        self._verify: bool | ssl_module.SSLContext = verify
        self._transport_choice = transport
        if token is None:
            token = os.environ.get("HF_TOKEN") or None
        base: dict[str, str] = {"User-Agent": "asyncvae", "Accept-Encoding": "identity"}
        if self.retry.scale_up_timeout is not None:
            base[protocol.HEADER_SCALE_UP_TIMEOUT] = str(int(self.retry.scale_up_timeout))
        for k, v in (headers or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InputError(f"headers must map str to str, got {k!r}: {type(v).__name__}")
            base = {n: x for n, x in base.items() if n.lower() != k.lower()}
            base[k] = v
        if isinstance(token, str) and token and not any(k.lower() == "authorization" for k in base):
            base[protocol.HEADER_AUTHORIZATION] = f"Bearer {token}"
        self._headers: tuple[tuple[str, str], ...] = tuple(base.items())
        self.stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: ClientClosedError | None = None
        self._broken: BaseException | None = None
        self._urlcache: dict[tuple[int, tuple[tuple[str, str], ...]], URL] = {}
        self._ops: dict[Any, _Op] = {}
        self._iterators: weakref.WeakSet[ManyIterator] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sleepers: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    def __repr__(self) -> str:
        urls = ", ".join(str(u.with_query(None)) for u in self._urls)
        return f"<asyncvae.Client [{urls}] {self.stats!r}>"

    @property
    def endpoints(self) -> list[str]:
        """The endpoint URLs, in the order given."""
        return [str(u) for u in self._urls]

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed is not None

    async def __aenter__(self) -> Client:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _make_transport(self) -> Transport:
        choice = self._transport_choice
        if isinstance(choice, Transport):
            return choice
        lim, t = self.limits, self.timeout
        kwargs = dict(
            limit=lim.max_concurrency, limit_per_host=lim.connections_per_host,
            keepalive_timeout=lim.keepalive_timeout, timeouts=Timeouts(connect=t.connect, read=t.read),
            ssl=self._verify,
        )
        if choice == "aiohttp":
            from .transport.aiohttp import AiohttpTransport

            return AiohttpTransport(**kwargs)  # type: ignore[arg-type]
        from .transport.native import NativeTransport

        return NativeTransport(**kwargs)  # type: ignore[arg-type]

    def _start(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            if self._closed is not None:
                raise self._closed
            if asyncio.get_running_loop() is not loop:
                raise InputError("this Client belongs to another event loop; create one per loop")
            return loop
        if self._closed is not None:
            raise self._closed
        loop = asyncio.get_running_loop()
        lim = self.limits
        self._transport = self._make_transport()
        self._pool = EndpointPool(self._urls)
        self._slots = FifoSemaphore(lim.max_concurrency)
        self._budget = ByteBudget(lim.max_inflight_bytes, self.stats._bytes)
        self._policy = RetryPolicy(self.retry, sleep=self._sleep, on_retry=self.stats._retry)
        self._coalescer = (
            Coalescer(lim.max_batch, lim.max_batch_wait, self._dispatch) if lim.max_batch > 1 else None
        )
        self._loop = loop
        return loop

    async def aclose(self) -> None:
        """Close the client: every call waiting for room or running ends with
        :class:`ClientClosedError` (within a bounded time), every ``*_many`` iterator
        raises it, and the connections are closed. Idempotent."""
        if self._closed is not None:
            return
        exc = self._closed = ClientClosedError("the asyncvae Client was closed")
        if self._loop is None:
            return
        self._slots.close(exc)
        self._budget.close(exc)
        if self._coalescer is not None:
            self._coalescer.close(exc)
        for fut in list(self._sleepers):
            if not fut.done():
                fut.set_exception(exc)
        for it in list(self._iterators):
            it._client_closed(exc)
        for task in list(self._tasks):
            task.cancel()
        await self._transport.aclose()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    async def _sleep(self, seconds: float) -> None:
        """Sleep between attempts; ends early with :class:`ClientClosedError` on close."""
        if self._closed is not None:
            raise self._closed
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, fut)
        self._sleepers.add(fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # a bug in the engine: fail loudly, and every later call with it
            self._broken = task.exception()
            if self._coalescer is not None:
                self._coalescer.close(self._broken)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ plans
    def _op(self, kind: str, options: dict[str, Any]) -> _Op:
        """The checked options of a call, cached by the keywords as given (with their
        types: ``1`` and ``1.0`` format differently on the wire)."""
        try:
            raw: Any = (kind, *((k, type(v), v) for k, v in options.items()))
            op = self._ops.get(raw)
        except TypeError:  # an unhashable option value (a processor): no caching
            raw, op = None, None
        if op is not None:
            return op
        if kind == "decode":
            plan: DecodePlan | EncodePlan = DecodePlan(decode_options(dict(options)))
        else:
            plan = EncodePlan(*encode_options(options))
        op = _Op(self, kind, plan)
        if raw is not None:
            if len(self._ops) >= _PLANS:
                self._ops.clear()
            self._ops[raw] = op
        return op

    # ------------------------------------------------------------------ single calls
    async def decode(
        self, tensor: torch.Tensor, *, on_progress: Callable[[int, int | None], None] | None = None,
        **options: Any,
    ) -> Any:
        """Decode one latent tensor; options and result as :func:`asyncvae.remote_decode`.

        ``on_progress(received_bytes, total_bytes)`` is called as the body streams in
        (an exception it raises fails the call, unretried).
        Raises :class:`InputError` (nothing sent), :class:`EndpointError` (non-retryable
        HTTP error), :class:`RetryExhausted`, :class:`ProtocolError` or
        :class:`ClientClosedError`.
        """
        self._start()
        op = self._op("decode", options)
        value, _ = await op.run(op.prepare(tensor, copy=False), on_progress)
        return value

    async def encode(self, image: Any, **options: Any) -> torch.Tensor:
        """Encode one PIL image or image tensor into latents (see :func:`asyncvae.remote_encode`)."""
        self._start()
        op = self._op("encode", options)
        value, _ = await op.run(op.prepare(image, copy=False))
        return value  # type: ignore[no-any-return]

    async def _submit(self, op: _Op, wire: WireRequest, on_progress: Any = None) -> tuple[Any, int]:
        """One item through the engine: ``(value, answer bytes)``."""
        if self._loop is None:
            self._start()
        if self._broken is not None:
            raise self._broken
        stats = self.stats
        stats.submitted += 1
        t0 = time.perf_counter()
        try:
            if self._coalescer is not None and wire.batch_key is not None and on_progress is None:
                part, nbytes = await self._coalesced(op, wire)
                value = await op.finish(part)
            else:
                value, nbytes = await self._direct(op, wire, on_progress)
        except AsyncVAEError as e:
            stats._item_failed(error_kind(e))
            raise
        stats._item_done(time.perf_counter() - t0)
        return value, nbytes

    def _deadline_passed(self, what: str) -> RetryExhausted:
        total = self.timeout.total
        cause = TransportError(
            f"Timeout.total ({total:g} s) passed while the call waited {what}; nothing was sent",
            kind="timeout", retryable=False,
        )
        return RetryExhausted(cause, 0, reason="deadline passed")

    async def _wait(self, aw: Awaitable[Any], ctx: CallContext, what: str) -> Any:
        """Await ``aw`` (a slot or budget wait) within the call's deadline."""
        if ctx.deadline is None:
            return await aw
        left = ctx.deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                return await aw
        except TimeoutError:
            raise self._deadline_passed(what) from None

    async def _slot(self, ctx: CallContext) -> None:
        """Wait in line for a request slot (counted in ``stats.queued``)."""
        self.stats._queued(1)
        try:
            await self._wait(self._slots.acquire(1), ctx, "for a request slot (max_concurrency)")
        finally:
            self.stats._queued(-1)

    async def _direct(self, op: _Op, wire: WireRequest, on_progress: Any) -> tuple[Any, int]:
        ctx = self._policy.context(self.timeout.total)
        if wire.size_hint and (self._budget.waiting or self._budget.used + wire.size_hint > self._budget.limit):
            lease = await self._wait(self._budget.reserve(wire.size_hint), ctx, "for room in max_inflight_bytes")
        else:
            lease = await self._budget.reserve(wire.size_hint)
        with lease:
            slots = self._slots
            if slots._waiters or slots._value < 1:
                await self._slot(ctx)
            else:
                slots._value -= 1
            self.stats._in_flight(1)
            try:
                reply = await self._policy.run(
                    functools.partial(self._attempt, wire, op.headers, lease, on_progress), ctx
                )
            finally:
                self.stats._in_flight(-1)
                slots.release(1)
            value = await op.finish(reply)
            return value, reply.bytes_in

    async def _attempt(self, wire: WireRequest, headers: tuple[tuple[str, str], ...], lease: Lease | None,
                       on_progress: Any, ctx: CallContext) -> Reply:
        """One attempt at the chosen endpoint."""
        if self._closed is not None:
            raise self._closed
        pool = self._pool
        ep, wait, probe = pool.pick()
        if wait > 0:
            if ctx.deadline is not None:
                wait = min(wait, max(0.0, ctx.deadline - time.monotonic()))
            await self._sleep(wait)
        loop = self._loop
        assert loop is not None
        deadline = None
        attempt_limit = self.timeout.attempt
        if ctx.deadline is not None:
            left = ctx.deadline - time.monotonic()
            if left < _MIN_ATTEMPT:
                if probe:
                    ep.probing = False
                raise NoTimeLeft(self._deadline_passed("for its turn").last)
            attempt_limit = left if attempt_limit is None else min(attempt_limit, left)
        if attempt_limit is not None:
            deadline = loop.time() + attempt_limit
        key = (ep.index, wire.params)
        url = self._urlcache.get(key)
        if url is None:
            if len(self._urlcache) > 1024:
                self._urlcache.clear()
            url = self._urlcache[key] = ep.url.extend_query(wire.params) if wire.params else ep.url
        stats = self.stats
        stats.requests += 1
        stats.bytes_out += wire.nbytes
        ep.outstanding += 1
        try:
            reply = await exchange(
                self._transport, url, wire, headers, deadline=deadline,
                max_response_bytes=self.limits.max_response_bytes, lease=lease, on_progress=on_progress,
            )
        except AsyncVAEError as e:
            ep.outstanding -= 1
            if self._closed is not None:
                raise self._closed from e
            if ctx.deadline is not None and time.monotonic() >= ctx.deadline - 1e-3:
                if probe:
                    ep.probing = False  # our own deadline says nothing about the endpoint
            else:
                pool.failed(ep, e, probe, retry_after_cap=self.retry.max_retry_after
                            if self.retry.respect_retry_after else None)
            raise
        except BaseException:
            ep.outstanding -= 1
            if probe:
                ep.probing = False
            raise
        ep.outstanding -= 1
        pool.succeeded(ep, probe)
        stats.bytes_in += reply.bytes_in
        return reply

    # ------------------------------------------------------------------ coalescing
    async def _coalesced(self, op: _Op, wire: WireRequest) -> tuple[Any, int]:
        ctx_deadline = None if self.timeout.total is None else time.monotonic() + self.timeout.total
        slots = self._slots
        if slots._waiters or slots._value < 1:
            await self._slot(CallContext(ctx_deadline))
        else:
            slots._value -= 1
        try:
            loop = self._loop
            assert loop is not None
            fut: asyncio.Future[Any] = loop.create_future()
            assert wire.shape is not None
            self._coalescer.submit(Pending(wire, op, fut))  # type: ignore[union-attr]
            try:
                return await fut  # type: ignore[no-any-return]
            except asyncio.CancelledError:
                fut.cancel()
                raise
        finally:
            slots.release(1)

    def _dispatch(self, batch: list[Pending]) -> None:
        self._spawn(self._run_batch(batch))

    async def _run_batch(self, batch: list[Pending]) -> None:
        op: _Op = batch[0].op
        try:
            if len(batch) == 1:
                wire = batch[0].wire
            else:
                shape, body = stack_body(batch)
                wire = op.plan.stacked(shape, dict(batch[0].wire.params)["dtype"], body)
                self.stats.batches += 1
                self.stats.coalesced += len(batch)
            ctx = self._policy.context(self.timeout.total)
            with await self._budget.reserve(wire.size_hint) as lease:
                self.stats._in_flight(len(batch))
                try:
                    reply = await self._policy.run(
                        functools.partial(self._attempt, wire, op.headers, lease, None), ctx
                    )
                finally:
                    self.stats._in_flight(-len(batch))
            assert reply.tensor is not None
            leadings = [p.leading for p in batch]
            parts = split(reply.tensor, leadings) if len(batch) > 1 else [reply.tensor]
            total = sum(leadings)
            for p, part in zip(batch, parts, strict=True):
                if not p.future.done():
                    p.future.set_result((part, reply.bytes_in * p.leading // total))
        except asyncio.CancelledError:
            exc = self._closed or ClientClosedError("the batch was cancelled")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            raise
        except BaseException as e:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)

    # ------------------------------------------------------------------ many
    def decode_many(
        self,
        items: Iterable[torch.Tensor] | AsyncIterable[torch.Tensor],
        *,
        ordered: bool = True,
        on_error: OnError = "yield",
        copy_inputs: bool = True,
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Decode many latents concurrently; an async iterator of results.

        ``items`` may be any iterable or async iterable; it is read lazily (a generator
        of a million items is never materialised) and each item is copied when it is
        taken, so a generator may reuse its buffer (``copy_inputs=False`` skips the
        copy, for callers that never change an item once yielded). With
        ``ordered=True`` (default) results come in input order; with
        ``ordered=False``, ``(index, result)`` pairs come as they complete. A failed
        item gives an :class:`ItemError` (``.index``, ``.error``) in its place, or,
        with ``on_error="raise"``, raises its error and stops. Close the iterator early
        with ``aclose()`` (or ``contextlib.aclosing``) to cancel what is still running.
        """
        return self._many("decode", items, ordered, on_error, copy_inputs, options)

    def encode_many(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        on_error: OnError = "yield",
        copy_inputs: bool = True,
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Encode many images concurrently; like :meth:`decode_many`."""
        return self._many("encode", items, ordered, on_error, copy_inputs, options)

    def _many(self, kind: str, items: Any, ordered: bool, on_error: str, copy: bool,
              options: dict[str, Any]) -> ManyIterator:
        if on_error not in ("yield", "raise"):
            raise InputError(f"on_error={on_error!r} must be 'yield' or 'raise'")
        if self._closed is not None:
            raise self._closed
        op = self._op(kind, options)
        lim = self.limits
        it = ManyIterator(
            items,
            prepare=functools.partial(op.prepare, copy=copy),
            run=op.run,
            ordered=ordered,
            on_error=on_error,
            window=lim.reorder_window,
            byte_window=lim.max_inflight_bytes,
            runners=lim.max_concurrency,
            ahead=lim.max_queued,
            start=self._start,
        )
        self._iterators.add(it)
        return it


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
