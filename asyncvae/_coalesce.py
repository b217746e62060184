"""Request coalescing (``Limits(max_batch=N)``): same-shaped items with the same options
go out as one batched request and their answers are split back.

One place for the three facts of coalescing:

- **key** — what may share a request: the operation, the per-item shape (all but the
  leading dimension), the dtype and every option (``batch_key`` of the request facts);
- **stack** — the batch body is the items' C-order bodies one after another (the
  bytes of ``torch.cat(items, 0)``, without a torch call), its shape the summed
  leading dimension;
- **split** — the answer's leading dimension must be that sum; it is split back by
  each item's share (anything else is a :class:`ProtocolError`: the endpoint doesn't
  batch).

:class:`Coalescer` holds pending items per key: a full batch leaves at once, a partial
one after ``max_batch_wait``. It never holds request slots: each caller takes its item's
slot before submitting, so with ``max_concurrency`` items in flight the pending items
form full batches by themselves while earlier batches are out.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .errors import ProtocolError
from .protocol import WireRequest

__all__ = ["Coalescer", "Pending", "split", "stack_body"]


class Pending:
    """One item waiting for a batch: its request (whose ``batch_key`` and ``shape`` say
    what it may share and how much of the answer is its part), the ``op`` that knows how
    to stack requests of its kind, and the future its caller awaits (result: the item's
    part of the answer)."""

    __slots__ = ("future", "key", "leading", "op", "shape", "wire")

    def __init__(self, wire: WireRequest, op: Any, future: asyncio.Future[Any]) -> None:
        assert wire.shape is not None and wire.batch_key is not None
        self.wire = wire
        self.op = op
        self.key: Hashable = wire.batch_key
        self.shape = wire.shape
        self.leading = wire.shape[0]
        self.future = future


def stack_body(items: list[Pending]) -> tuple[tuple[int, ...], bytes]:
    """The stacked shape and body of a batch (``torch.cat(..., dim=0)`` as bytes)."""
    first = items[0].shape
    total = sum(p.leading for p in items)
    return (total, *first[1:]), b"".join(bytes(p.wire.body) for p in items)


def split(t: torch.Tensor, leadings: list[int]) -> list[torch.Tensor]:
    """Split a batched answer back into the items' parts (views, no copy)."""
    want = sum(leadings)
    if t.dim() == 0 or t.shape[0] != want:
        got = t.shape[0] if t.dim() else 0
        raise ProtocolError(
            f"batched response has leading dimension {got}, expected {want}; this endpoint may "
            "not support batches — use Limits(max_batch=1)"
        )
    return list(t.split(leadings, dim=0))


class Coalescer:
    """Pending items per key; ``dispatch(batch)`` is called with each batch to send.

    Cancelled items are dropped before a batch leaves; :meth:`close` fails every
    pending item's future with the given error (none is lost)."""

    def __init__(
        self,
        max_batch: int,
        max_wait: float,
        dispatch: Callable[[list[Pending]], None],
    ) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._dispatch = dispatch
        self._groups: dict[Hashable, collections.deque[Pending]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._closed: BaseException | None = None

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def submit(self, item: Pending) -> None:
        if self._closed is not None:
            item.future.set_exception(self._closed)
            return
        group = self._groups.get(item.key)
        if group is None:
            group = self._groups[item.key] = collections.deque()
        group.append(item)
        if len(group) >= self.max_batch:
            self._flush(item.key, full_only=True)
        elif item.key not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[item.key] = loop.call_later(self.max_wait, self._flush, item.key, False)

    def _flush(self, key: Hashable, full_only: bool) -> None:
        group = self._groups.get(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        while group:
            batch: list[Pending] = []
            while group and len(batch) < self.max_batch:
                p = group.popleft()
                if not p.future.done():  # a caller that left is dropped here
                    batch.append(p)
            if full_only and len(batch) < self.max_batch:
                group.extendleft(reversed(batch))  # not full yet: keep waiting
                break
            if batch:
                self._dispatch(batch)
        if group:
            self._timers[key] = asyncio.get_running_loop().call_later(self.max_wait, self._flush, key, False)
        else:
            self._groups.pop(key, None)

    def close(self, exc: BaseException) -> None:
        self._closed = exc
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        for group in self._groups.values():
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
        self._groups.clear()
