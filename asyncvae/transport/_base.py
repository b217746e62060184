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
  redirects followed — the caller decides about redirects). ``Content-Length`` goes
  out whenever the body is not empty, and for POST/PUT/PATCH also when it is; a
  ``Host`` among the given headers replaces the derived one; a given
  ``Content-Length``/``Transfer-Encoding``, a header name that is not a token, or a
  value with CR/LF/control characters is an :class:`~asyncvae.InputError` (nothing is
  sent). Responses come back as sent: no decompression;
- failures before a response head become :class:`~asyncvae.TransportError`
  (``kind`` ``connection``, ``timeout`` or ``tls``; ``tls`` is not retryable); a
  malformed head or framing becomes a retryable :class:`~asyncvae.ProtocolError`;
  after :meth:`Transport.aclose`, ``send`` (and callers waiting for a connection)
  get a non-retryable ``TransportError``;
- an interim ``1xx`` head is skipped; answers to HEAD and 204/304 answers have no
  body (:attr:`Response.content_length` 0); ``Transfer-Encoding: chunked`` wins over
  ``Content-Length``;
- a body that ends before its declared length, or a connection lost mid-body, is a
  retryable :class:`~asyncvae.ProtocolError` ("cut short"); a read timeout mid-body is
  a :class:`~asyncvae.TransportError` of kind ``timeout``;
- ``Timeouts.read`` bounds the wait for the head and every gap between body reads;
  ``deadline`` (absolute, ``loop.time()`` clock) bounds the whole exchange (waiting
  for a free connection, connecting, sending, the head and every body read);
- a server that answers before it has read the whole request body (413, 429) still
  yields that answer;
- the connection goes back to the pool only when its body was read to the end and
  the server allows keep-alive (HTTP/1.1 without ``Connection: close``, not a
  read-to-EOF body, no bytes after the body); :meth:`Response.close` (or leaving
  ``async with``) before that closes it. A cancelled ``send`` or read closes the
  connection. A connection that receives bytes or EOF while idle is never reused.

Allowed differences: :class:`~.native.NativeTransport` sends a request once more, on
another connection, when a reused keep-alive connection turns out to have been closed
by the server before any byte of the answer arrived (the stale-connection race;
browsers do the same); aiohttp does that only for idempotent methods, so there the
caller sees a retryable ``TransportError`` of kind ``connection``.
"""

from __future__ import annotations

import abc
import functools
import ssl as ssl_mod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy
from yarl import URL

from ..errors import InputError

__all__ = ["Request", "Response", "Timeouts", "Transport"]


def check_pool_args(limit: int, limit_per_host: int, ssl: object) -> None:
    """The checks every transport's constructor makes of its shared arguments."""
    if limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    if limit_per_host < 0:
        raise InputError(f"limit_per_host must be >= 0, got {limit_per_host}")
    if not isinstance(ssl, (bool, ssl_mod.SSLContext)):
        raise InputError(f"ssl must be True, False or an ssl.SSLContext, got {ssl!r}")


@functools.lru_cache(maxsize=1)
def default_tls_context() -> ssl_mod.SSLContext:
    """The process's verified default TLS context (``ssl=True``), made once, on first
    use: loading the CA store costs ~100 ms and ~1 MB that plain-http clients never pay."""
    return ssl_mod.create_default_context()


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
    methods. Use as an async context manager, or call :meth:`close`.

    Reading after the body's end returns 0 / ``b""``; reading after :meth:`close` (or
    after a read failed) before the end raises :class:`~asyncvae.TransportError`."""

    __slots__ = ()

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
        """The length the body is framed with: its ``Content-Length`` (0 where the
        answer has no body: HEAD, 204, 304), or ``None`` (chunked, or read to EOF).

        Raises a retryable :class:`~asyncvae.ProtocolError` when the header is malformed."""
        from ..protocol import parse_content_length

        return parse_content_length(self.headers)

    @abc.abstractmethod
    async def read_into(self, view: memoryview) -> int:
        """Fill ``view`` (a writable, C-contiguous buffer; any item format is taken as
        bytes) from the body and return the number of bytes written: ``view.nbytes``,
        or fewer only when the body ended first. Bytes beyond the view stay unread (see
        :meth:`read_chunk`). A body framed by ``Content-Length`` that ends early raises
        (cut short) instead of returning fewer bytes."""

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
    """Sends :class:`Request` objects over pooled connections.

    Implementations take the same keyword-only constructor arguments: ``limit`` (64),
    ``limit_per_host`` (0: same as ``limit``), ``keepalive_timeout`` (30.0 s; 0: no
    reuse), ``timeouts`` (:class:`Timeouts`), ``ssl`` (``True``: verified
    ``ssl.create_default_context()``; ``False``: no verification; or an
    ``ssl.SSLContext``)."""

    __slots__ = ()

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
