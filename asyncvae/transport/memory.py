"""An in-memory transport: no sockets, a handler answers each request.

For the engine's unit tests (ordering, budgets, retries, coalescing, close) and for
users who want to test code that uses :class:`~asyncvae.Client` without a server::

    def handler(request):
        return MemoryAnswer.tensor(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))

    client = asyncvae.Client("http://vae.test/", transport=MemoryTransport(handler))

The handler may be a coroutine function (to delay, or to wait on an event) and may
raise :class:`~asyncvae.TransportError` to stand for a failed connection.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from ..errors import ProtocolError, TransportError
from ._base import Request, Response, Transport

__all__ = ["MemoryAnswer", "MemoryTransport"]


@dataclass
class MemoryAnswer:
    """One answer: status, headers and the body, delivered in ``chunks`` when given.

    ``cut`` ends the body after that many bytes as if the connection dropped (a
    retryable :class:`~asyncvae.ProtocolError` on read).
    """

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    chunks: Sequence[int] | None = None
    cut: int | None = None
    content_length: bool = True

    @classmethod
    def tensor(cls, t: Any, **kw: Any) -> MemoryAnswer:
        """A 200 tensor answer with correct ``shape``/``dtype`` headers."""
        from ..protocol import tensor_body, tensor_response_headers

        return cls(200, list(tensor_response_headers(t).items()), bytes(tensor_body(t)), **kw)

    @classmethod
    def error(cls, status: int, message: str = "error", headers: Sequence[tuple[str, str]] = ()) -> MemoryAnswer:
        """A JSON error answer as the endpoints send it."""
        return cls(status, [("Content-Type", "application/json"), *headers], json.dumps({"error": message}).encode())


Handler = Callable[[Request], "MemoryAnswer | Awaitable[MemoryAnswer]"]


class _MemoryResponse(Response):
    def __init__(self, request: Request, answer: MemoryAnswer) -> None:
        self.status = answer.status
        self.reason = "OK" if answer.status == 200 else ""
        h: CIMultiDict[str] = CIMultiDict(answer.headers)
        body = answer.body
        if answer.content_length and "Content-Length" not in h:
            h["Content-Length"] = str(len(body))
        self.headers = CIMultiDictProxy(h)
        self.url = request.url
        if answer.cut is not None:
            body = body[: answer.cut]
        self._body = body
        self._cut = answer.cut is not None
        sizes = list(answer.chunks) if answer.chunks else [len(body) or 0]
        self._sizes = sizes
        self._pos = 0
        self._closed = False

    def _next_size(self) -> int:
        if not self._sizes:
            return len(self._body) - self._pos
        return self._sizes.pop(0) if len(self._sizes) > 1 else self._sizes[0]

    def _end(self) -> bytes:
        if self._cut:
            raise ProtocolError("response body was cut short (connection lost)", retryable=True)
        return b""

    async def read_chunk(self) -> bytes:
        await asyncio.sleep(0)
        if self._closed:
            raise ProtocolError("read after close")
        if self._pos >= len(self._body):
            return self._end()
        n = max(1, self._next_size())
        chunk = self._body[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    async def read_into(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            if self._pos >= len(self._body):
                self._end()
                break
            await asyncio.sleep(0)
            n = min(len(view) - got, max(1, self._next_size()), len(self._body) - self._pos)
            view[got : got + n] = self._body[self._pos : self._pos + n]
            self._pos += n
            got += n
        return got

    def close(self) -> None:
        self._closed = True


@dataclass
class MemoryTransport(Transport):
    """A :class:`Transport` whose answers come from ``handler(request)``.

    ``requests`` records every request sent (method, URL, headers, body bytes), unless
    ``record=False`` (long runs).
    """

    handler: Handler
    record: bool = True
    requests: list[Request] = field(default_factory=list)
    closed: bool = False

    async def send(self, request: Request, *, deadline: float | None = None) -> Response:
        if self.closed:
            raise TransportError("transport is closed", retryable=False, kind="connection")
        if self.record:
            self.requests.append(Request(request.method, request.url, tuple(request.headers), bytes(request.body)))
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            if deadline is not None:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    answer = await asyncio.wait_for(answer, max(0.0, left))
                except TimeoutError:
                    raise TransportError("timed out waiting for the answer", kind="timeout") from None
            else:
                answer = await answer
        await asyncio.sleep(0)
        return _MemoryResponse(request, answer)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        self.closed = True
