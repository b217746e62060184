"""``decode_many``/``encode_many``: many items through the engine, results in order.

A pull model, with no producer → queue → worker relay per item: up to
``max_concurrency`` *runner* tasks each take the next item from the input, prepare its
request, send it (with the client's slots, budget and retries, or through the
coalescer) and park the result; the consumer takes results in input order (or as they
finish, ``ordered=False``).

- **Input** is read lazily, in order, and each item is *snapshotted when it is taken*
  (its request body copied), so a generator that refills one buffer sends what it
  yielded, not what the buffer holds later (``copy_inputs=False`` opts out). Lists and
  tuples are indexed on the loop; other iterables are read by a helper thread, so a
  slow generator (decoding files, say) never stalls the connections; async iterables
  by one prefetch task. Up to ``max_queued`` items are read ahead, and no more than
  ``max_inflight_bytes / 16`` of request bodies (so big items, video latents say, are
  not copied 256 at a time).
- **Memory** stays bounded whatever the consumer does: a runner takes a new item only
  while fewer than ``max_reorder`` items are taken and not yet handed over, and while
  this iterator's parked results, its answers on the way (each request's size hint)
  and one more answer fit in ``max_inflight_bytes``. Where a request can't tell its
  answer's size (mp4, an input prepared in a thread) the latest answer's size stands
  in; before the first answer only the item limits apply. Parked results hold no part of
  the client's byte budget, so a consumer that makes calls of its own while it
  iterates is never starved: they only stop new items being started. The item the consumer waits for was taken before
  any later one, and every closed gate opens when the consumer takes a result, so
  these gates never deadlock.
- **Failures** stay with their item: an input that can't be prepared or a request that
  fails gives an :class:`~asyncvae.ItemError` in its place. An input iterable that
  raises is not an item's failure: its exception is raised to the consumer *after*
  every earlier item's result, as a ``for`` loop over it would. A failure of the
  machinery itself (a bug) is raised to the consumer, not swallowed.
- **Leaving early** (``aclose()``, or dropping the iterator) cancels the runners and
  the requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import Any

import torch

from .errors import AsyncVAEError, ClientClosedError, InputError, ItemError

__all__ = ["ManyIterator", "make_source"]

_MISSING = object()
_END = object()

#: ``prepare(item)`` → a prepared request, a zero-argument callable to run in a worker
#: thread for one (large images), or the exception that preparing raised.
Prepare = Callable[[Any], Any]
#: ``run(prepared)`` → ``(value, nbytes)``; raises the item's error.
Run = Callable[[Any], Awaitable[tuple[Any, int]]]


def _prepare_safely(prepare: Prepare, item: Any) -> Any:
    try:
        return prepare(item)
    except Exception as e:  # an input that can't be sent is that item's failure
        if not isinstance(e, AsyncVAEError):
            e = InputError(f"item could not be prepared for sending: {type(e).__name__}: {e}")
        return e


class _Failure:
    """The input iterable itself raised (at ``index``)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Source:
    """Prepared items in input order: :meth:`take` gives ``(index, prepared)``, ``None``
    when none is ready yet (then :meth:`wait`), or ``_END``."""

    index = 0

    def take(self) -> tuple[int, Any] | object | None:
        raise NotImplementedError

    async def wait(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SequenceSource(_Source):
    """A list or tuple, indexed on the loop (each item prepared as it is taken)."""

    def __init__(self, items: Sequence[Any], prepare: Prepare) -> None:
        self._items = items
        self._prepare = prepare

    def take(self) -> tuple[int, Any] | object | None:
        i = self.index
        if i >= len(self._items):
            return _END
        self.index = i + 1
        return i, _prepare_safely(self._prepare, self._items[i])

    async def wait(self) -> None:  # pragma: no cover - take never answers None
        return


class _BufferedSource(_Source):
    """Items prepared ahead by a producer (a thread or a task) into a bounded buffer."""

    def __init__(self, ahead: int, ahead_bytes: int) -> None:
        self._buf: collections.deque[tuple[int, Any, int]] = collections.deque()
        self._ahead = max(1, ahead)
        self._ahead_bytes = ahead_bytes
        self._held = 0  # request body bytes in the buffer
        self._done = False
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()

    def _has_room(self) -> bool:
        """Whether the producer may read one more item (at least one always fits)."""
        return not self._buf or (len(self._buf) < self._ahead and self._held < self._ahead_bytes)

    def _add(self, i: int, prepared: Any) -> None:
        n = getattr(prepared, "nbytes", 0)  # a WireRequest's body; 0 for the rest
        self._held += n
        self._buf.append((i, prepared, n))

    def take(self) -> tuple[int, Any] | object | None:
        if self._buf:
            i, prepared, n = self._buf.popleft()
            self._taken(n)
            return i, prepared
        return _END if self._done else None

    def _taken(self, nbytes: int) -> None:
        pass

    async def wait(self) -> None:
        if self._buf or self._done:
            return
        if self._waiter is None or self._waiter.done():
            self._waiter = self._loop.create_future()
        await asyncio.shield(self._waiter)

    def _wake(self) -> None:  # on the loop
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class _ThreadSource(_BufferedSource):
    """A sync iterable read by a daemon thread, ``ahead`` items ahead of the runners."""

    def __init__(self, items: Iterable[Any], prepare: Prepare, ahead: int, ahead_bytes: int) -> None:
        super().__init__(ahead, ahead_bytes)
        self._cond = threading.Condition()
        self._stop = False
        it = iter(items)
        self._thread = threading.Thread(
            target=self._produce, args=(it, prepare), name="asyncvae-intake", daemon=True
        )
        self._thread.start()

    def _produce(self, it: Any, prepare: Prepare) -> None:
        i = 0
        try:
            while True:
                with self._cond:
                    while not (self._stop or self._has_room()):
                        self._cond.wait()
                if self._stop:
                    return
                try:
                    item = next(it)
                except StopIteration:
                    return
                except BaseException as e:
                    self._push(i, _Failure(e))
                    return
                self._push(i, _prepare_safely(prepare, item))
                i += 1
        finally:
            self._finish()

    def _push(self, i: int, prepared: Any) -> None:
        with self._cond:
            self._add(i, prepared)
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self._stop = True

    def _finish(self) -> None:
        def done() -> None:
            self._done = True
            self._wake()

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(done)

    def _taken(self, nbytes: int) -> None:
        with self._cond:
            self._held -= nbytes
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()  # unblock the producer if it waits for room


class _AsyncSource(_BufferedSource):
    """An async iterable read by one prefetch task (snapshots taken as items arrive)."""

    def __init__(self, items: AsyncIterable[Any], prepare: Prepare, ahead: int, ahead_bytes: int) -> None:
        super().__init__(ahead, ahead_bytes)
        self._room = asyncio.Event()
        self._task = self._loop.create_task(self._produce(items, prepare), name="asyncvae-intake")

    async def _produce(self, items: AsyncIterable[Any], prepare: Prepare) -> None:
        i = 0
        it = items.__aiter__()
        try:
            while True:
                while not self._has_room():
                    self._room.clear()
                    await self._room.wait()
                try:
                    item = await it.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:
                    self._add(i, _Failure(e))
                    return
                self._add(i, _prepare_safely(prepare, item))
                i += 1
                self._wake()
        finally:
            self._done = True
            self._wake()

    def _taken(self, nbytes: int) -> None:
        self._held -= nbytes
        self._room.set()

    def close(self) -> None:
        self._task.cancel()


def make_source(items: Any, prepare: Prepare, ahead: int, ahead_bytes: int = 1 << 62) -> _Source:
    """The right :class:`_Source` for ``items`` (see the module docstring)."""
    if isinstance(items, (torch.Tensor, str, bytes)) or hasattr(items, "__await__"):
        raise InputError(
            f"items must be an iterable of tensors/images (a list, a generator, an async "
            f"iterable), not a single {type(items).__name__}"
        )
    if isinstance(items, (list, tuple)):
        return _SequenceSource(items, prepare)
    if isinstance(items, AsyncIterable) or hasattr(items, "__aiter__"):
        return _AsyncSource(items, prepare, ahead, ahead_bytes)
    if isinstance(items, Iterable):
        return _ThreadSource(items, prepare, ahead, ahead_bytes)
    raise InputError(f"items must be an iterable or async iterable, got {type(items).__name__}")


def result_nbytes(value: Any) -> int:
    """Bytes a finished result holds (for the parked-results bound)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, list):
        return sum(result_nbytes(v) for v in value)
    size = getattr(value, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # a PIL image
        return int(size[0]) * int(size[1]) * 3
    return 0


class _State:
    """What the runners share (kept apart from the iterator object, so that dropping
    the iterator lets it be collected and cancel the runners)."""

    def __init__(self, source: _Source, run: Run, ordered: bool, window: int, byte_window: int,
                 runners: int) -> None:
        self.source = source
        self.run = run
        self.ordered = ordered
        self.window = window
        self.byte_window = byte_window
        self.nrunners = runners
        self.ready: dict[int, tuple[Any, int]] = {}
        self.done_order: collections.deque[int] = collections.deque()
        self.next = 0  # ordered: the index the consumer waits for
        self.taken = 0  # items taken from the source
        self.handed = 0  # items handed to the consumer
        self.parked_bytes = 0
        self.running_bytes = 0  # expected answer bytes of the items taken, not yet parked
        self.item_bytes = 0  # the latest item's answer size, expected or seen (the next one's likely size)
        self.end_at: int | None = None  # index after the last item, once known
        self.failure: BaseException | None = None
        self.source_error: BaseException | None = None  # the input iterable raised this
        self.consumer: asyncio.Future[None] | None = None
        self.room: asyncio.Future[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.get_running_loop()
        self.closed = False

    # ---- runners
    def start(self) -> None:
        for _ in range(self.nrunners):
            t = self.loop.create_task(self._runner(), name="asyncvae-runner")
            self.tasks.add(t)
            t.add_done_callback(self._runner_done)

    def _runner_done(self, t: asyncio.Task[None]) -> None:
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            self.fail(t.exception())  # type: ignore[arg-type]
        else:
            self._wake_consumer()

    def _has_room(self) -> bool:
        return self.taken - self.handed < self.window and (
            self.taken == self.handed
            or self.parked_bytes + self.running_bytes + self.item_bytes <= self.byte_window
        )

    async def _runner(self) -> None:
        src = self.source
        while True:
            if not self._has_room():
                if self.room is None or self.room.done():
                    self.room = self.loop.create_future()
                await asyncio.shield(self.room)
                continue
            got = src.take()
            if got is None:
                await src.wait()
                continue  # re-check the gates: other runners may have taken items meanwhile
            if got is _END:
                if self.end_at is None:
                    self.end_at = self.taken
                return
            i, prepared = got  # type: ignore[misc]
            self.taken += 1
            if isinstance(prepared, _Failure):
                self.end_at = i
                self.source_error = prepared.error
                self._wake_consumer()
                return
            # a request says how big its answer will be; where it can't (mp4, an input
            # prepared in a thread) the latest answer's size stands in. The latest, not
            # the largest: one huge item must not leave the rest running one at a time.
            expect = getattr(prepared, "size_hint", 0) or self.item_bytes
            self.item_bytes = expect
            self.running_bytes += expect
            try:
                if isinstance(prepared, BaseException):
                    raise prepared
                value, nbytes = await self.run(prepared)
            except AsyncVAEError as e:
                value, nbytes = ItemError(i, e), 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a user callback (processor, ...) raised for this item
                value, nbytes = ItemError(i, e), 0
            finally:
                self.running_bytes -= expect
            self._park(i, value, nbytes)
            # drop this frame's references before waiting again: an idle runner must
            # not keep its last result (or request) alive after the consumer took it
            value = prepared = got = None

    def _park(self, i: int, value: Any, nbytes: int) -> None:
        self.ready[i] = (value, nbytes)
        self.parked_bytes += nbytes
        if nbytes:
            self.item_bytes = nbytes
        if not self.ordered:
            self.done_order.append(i)
            self._wake_consumer()
        elif i == self.next:
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        c = self.consumer
        if c is not None and not c.done():
            c.set_result(None)

    def _wake_runners(self) -> None:
        r = self.room
        if r is not None and not r.done():
            r.set_result(None)

    # ---- consumer
    def pop(self) -> tuple[int, Any] | object:
        if self.ordered:
            got = self.ready.pop(self.next, _MISSING)
            if got is _MISSING:
                return _MISSING
            i = self.next
            self.next = i + 1
        else:
            if not self.done_order:
                return _MISSING
            i = self.done_order.popleft()
            got = self.ready.pop(i)
        value, nbytes = got  # type: ignore[misc]
        self.handed += 1
        self.parked_bytes -= nbytes
        self._wake_runners()
        return i, value

    def finished(self) -> bool:
        return self.end_at is not None and self.handed >= self.end_at and not self.ready

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.cancel()
        self._wake_consumer()

    def cancel(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.source.close()
        for t in list(self.tasks):
            t.cancel()
        self._wake_runners()


class ManyIterator:
    """The async iterator ``decode_many``/``encode_many`` return (see the module
    docstring). Close it early with :meth:`aclose`."""

    def __init__(
        self,
        items: Any,
        *,
        prepare: Prepare,
        run: Run,
        ordered: bool,
        on_error: str,
        window: int,
        byte_window: int,
        runners: int,
        ahead: int,
        start: Callable[[], object] | None = None,
    ) -> None:
        self._items = items
        self._start = start
        self._prepare = prepare
        self._run = run
        self._ordered = ordered
        self._raise = on_error == "raise"
        self._limits = (window, byte_window, runners, ahead)
        self._state: _State | None = None

    def __aiter__(self) -> ManyIterator:
        return self

    def _begin(self) -> _State:
        if self._start is not None:
            self._start()  # the client: raises ClientClosedError once it is closed
        window, byte_window, runners, ahead = self._limits
        source = make_source(self._items, self._prepare, ahead, max(1, byte_window // 16))
        self._items = None
        if isinstance(source, _SequenceSource):
            runners = max(1, min(runners, len(source._items)))
        st = _State(source, self._run, self._ordered, window, byte_window, runners)
        st.start()
        self._state = st
        return st

    async def __anext__(self) -> Any:
        st = self._state or self._begin()
        while True:
            got = st.pop()
            if got is not _MISSING:
                i, value = got  # type: ignore[misc]
                if isinstance(value, ItemError) and self._raise:
                    await self.aclose()
                    raise value.error
                return value if self._ordered else (i, value)
            if st.failure is not None:
                exc = st.failure
                await self.aclose()
                raise exc
            if st.finished() or (st.closed and not st.tasks):
                await self.aclose()
                if st.source_error is not None:
                    raise st.source_error  # after every item before it, like a for loop
                raise StopAsyncIteration
            st.consumer = st.loop.create_future()
            try:
                await st.consumer
            finally:
                st.consumer = None

    async def aclose(self) -> None:
        """Stop: cancel what is still running and drop parked results."""
        st = self._state
        if st is None:
            self._items = None
            return
        st.cancel()
        if st.tasks:
            await asyncio.gather(*st.tasks, return_exceptions=True)
        st.ready.clear()

    def _client_closed(self, exc: ClientClosedError) -> None:
        """The client is closing: end the iteration with ``exc``."""
        if self._state is not None:
            self._state.fail(exc)

    def __del__(self) -> None:
        st = self._state
        if st is not None and not st.closed:
            with contextlib.suppress(RuntimeError):
                st.loop.call_soon_threadsafe(st.cancel)
