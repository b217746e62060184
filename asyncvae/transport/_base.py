"""The transport seam: one HTTP request in; status, headers and the body out.

Everything above this seam (redirects, credentials, the wire protocol, size checks,
the byte budget, retries) is written once against these small abstract classes;
everything below it (sockets, connection pooling, TLS, HTTP/1.1 framing, timeouts)
is one implementation each:

- :class:`~asyncvae.transport.native.NativeTransport` — HTTP/1.1 on asyncio
  ``BufferedProtocol`` connections; reads a sized body straight into the caller's
  buffer (the default: the least CPU per request and no copy of large bodies);
- :class:`~asyncvae.transport.aiohttp.AiohttpTransport` — the same over an
  ``aiohttp.ClientSession``;
- :class:`~asyncvae.transport.memory.MemoryTransport` — no sockets: a handler answers
  in memory, so the engine's unit tests run without a server.

Contract every implementation keeps (``tests/test_transport_conformance.py`` runs the
same checks against each):

- ``send`` sends exactly the given method, URL and headers plus ``Host`` and
  ``Content-Length`` (nothing else: no cookies, no ``Accept-Encoding`` it decodes, no
  redirects followed — the caller decides about redirects);
- failures before a response head become :class:`~asyncvae.TransportError`
  (``kind`` ``connection``, ``timeout`` or ``tls``; ``tls`` is not retryable); a
  malformed head or framing becomes a retryable :class:`~asyncvae.ProtocolError`;
- a body that ends before its declared length, or a connection lost mid-body, is a
  retryable :class:`~asyncvae.ProtocolError` ("cut short"); a read timeout mid-body is
  a :class:`~asyncvae.TransportError` of kind ``timeout``;
- ``Timeouts.read`` bounds the wait for the head and every gap between body reads;
  ``deadline`` (absolute, ``loop.time()`` clock) bounds the whole exchange;
- the connection goes back to the pool only when its body was read to the end and
  the server allows keep-alive; :meth:`Response.close` (or leaving ``async with``)
  before that closes it. A cancelled ``send`` or read closes the connection.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy
from yarl import URL

__all__ = ["Request", "Response", "Timeouts", "Transport"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Transport-level time limits in seconds (``None``: no limit). One object per
    transport; per-request limits are given as a ``deadline`` to :meth:`Transport.send`."""

    #: open a TCP (and TLS) connection
    connect: float | None = 10.0
    #: wait for the response head, and between two reads of the body
    read: float | None = 120.0


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request. ``url`` is absolute, with its query already encoded;
    ``headers`` are sent as given (the transport adds ``Host`` and ``Content-Length``)."""

    method: str
    url: URL
    headers: Sequence[tuple[str, str]]
    body: bytes | memoryview = b""


class Response(abc.ABC):
    """A response whose head has arrived; the body is read with one of the ``read``
    methods. Use as an async context manager, or call :meth:`close`."""

    #: HTTP status code
    status: int
    #: reason phrase ("OK")
    reason: str
    #: response headers, case-insensitive
    headers: CIMultiDictProxy[str]
    #: the URL that was requested
    url: URL

    @property
    def content_length(self) -> int | None:
        """The declared body length, or ``None`` (chunked, or read to EOF).

        Raises a retryable :class:`~asyncvae.ProtocolError` when the header is malformed."""
        from ..protocol import parse_content_length

        return parse_content_length(self.headers)

    @abc.abstractmethod
    async def read_into(self, view: memoryview) -> int:
        """Fill ``view`` (a writable, byte-format memoryview) from the body and return
        the number of bytes written: ``len(view)``, or fewer only when the body ended
        first. Bytes beyond ``len(view)`` stay unread (see :meth:`read_chunk`)."""

    @abc.abstractmethod
    async def read_chunk(self) -> bytes | memoryview:
        """The next piece of the body as it arrives; ``b""`` once it has ended. The
        returned object is only valid until the next read."""

    async def read(self, limit: int) -> bytes:
        """The body, or its first ``limit`` bytes: reads as many pieces as it takes
        (an error body split over several TCP segments comes back whole)."""
        parts: list[bytes] = []
        got = 0
        while got < limit:
            chunk = await self.read_chunk()
            if not chunk:
                break
            piece = bytes(chunk[: limit - got])
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection: back to the pool when the body was read to its end
        (and keep-alive is allowed), else closed. Idempotent."""

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Transport(abc.ABC):
    """Sends :class:`Request` objects over pooled connections."""

    @abc.abstractmethod
    async def send(self, request: Request, *, deadline: float | None = None) -> Response:
        """Send ``request`` and return once the response head has arrived.

        ``deadline`` is an absolute time on the running loop's clock
        (``loop.time()``) by which the whole exchange, body included, must end.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection. Idempotent; ``send`` afterwards raises."""

    def connections(self) -> dict[str, Any]:
        """Pool figures for tests and stats: at least ``open`` (connections open now)
        and ``idle`` (of those, waiting in the pool)."""
        return {"open": 0, "idle": 0}
