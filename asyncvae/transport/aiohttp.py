"""The transport seam over one ``aiohttp.ClientSession`` (see :mod:`._base`).

The session is made for exactly this job: no cookie jar, no decompression, no proxy or
``.netrc`` from the environment, no redirects, no automatic ``User-Agent``/``Accept``/
``Accept-Encoding``/``Content-Type`` headers, and one session-level ``ClientTimeout``
(a per-request one only where a deadline is given). aiohttp failures are mapped onto the
error hierarchy by :func:`map_error`, so nothing above the seam needs aiohttp knowledge.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from ..errors import InputError, ProtocolError, TransportError
from . import _http11 as h11
from ._base import Request, Response, Timeouts, Transport, check_pool_args, default_tls_context

__all__ = ["AiohttpResponse", "AiohttpTransport", "map_error"]

#: aiohttp adds these unless told not to; the seam sends only the given headers.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def map_error(e: BaseException, url: URL, *, in_body: bool) -> Exception:
    """An aiohttp/OS/timeout failure of an exchange with ``url`` as an asyncvae error:
    TLS → ``TransportError(kind="tls", retryable=False)``; timeouts →
    ``TransportError(kind="timeout")``; a malformed answer → retryable
    :class:`ProtocolError`; a connection lost while reading the body → retryable
    ``ProtocolError`` ("cut short"); anything else below HTTP →
    ``TransportError(kind="connection")``."""
    where = "while reading the response body" if in_body else "before a response arrived"
    if isinstance(e, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl_mod.SSLError)):
        return TransportError(
            f"TLS failure talking to {url.host}: {e}. Check the certificate, or pass a custom "
            "ssl context; verification stays on by default",
            retryable=False,
            kind="tls",
        )
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return TransportError(f"timed out {where} from {url.host}:{url.port}", kind="timeout")
    if isinstance(e, aiohttp.ClientResponseError):
        # raise_for_status is off, so this comes from the HTTP parser: a malformed answer
        detail = (e.message or type(e).__name__).splitlines()[0]
        return ProtocolError(f"malformed HTTP response from {url.host}:{url.port}: {detail}", retryable=True)
    if in_body and isinstance(
        e, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)
    ):
        return ProtocolError(f"response body from {url.host}:{url.port} was cut short: {e}", retryable=True)
    if isinstance(e, aiohttp.InvalidURL):
        return InputError(f"invalid endpoint URL: {e}")
    return TransportError(f"connection to {url.host}:{url.port} failed {where}: {type(e).__name__}: {e}")


_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def _byte_view(view: memoryview) -> memoryview:
    if not isinstance(view, memoryview):
        view = memoryview(view)
    if view.readonly:
        raise InputError("read_into needs a writable buffer")
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


class AiohttpResponse(Response):
    """A response of :class:`AiohttpTransport` (see :class:`~._base.Response`).
    :meth:`read_into` copies each received chunk into the caller's buffer."""

    __slots__ = ("_broken", "_done", "_left", "_method", "_resp", "headers", "reason", "status", "url")

    def __init__(self, resp: aiohttp.ClientResponse, url: URL, method: str) -> None:
        self._resp = resp
        self._left: memoryview | None = None  # the unread rest of the last chunk
        self._done = False
        self._broken = False  # closed (or failed) before the end of the body
        self._method = method
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers: CIMultiDictProxy[str] = resp.headers
        self.url = url

    @property
    def content_length(self) -> int | None:
        """The length the body is framed with (0 where there is none), ``None`` for
        chunked and read-to-EOF bodies."""
        if self._method == "HEAD" or self.status < 200 or self.status in (204, 304):
            return 0
        te = self.headers.get("Transfer-Encoding")
        if te is not None and "chunked" in te.lower():
            return None
        return super().content_length

    def _closed_error(self) -> TransportError:
        return TransportError("the response was closed (or failed) before its body was read", retryable=True)

    async def _next(self) -> bytes:
        if self._broken:
            raise self._closed_error()
        content = self._resp.content
        try:
            while True:
                chunk, boundary = await content.readchunk()
                if chunk:
                    return chunk
                # (b"", True) is a chunked-encoding boundary, except from aiohttp's shared
                # EMPTY_PAYLOAD (bodiless answers), which says so forever after its first
                # use: at_eof() tells the end there
                if not boundary or content.at_eof():
                    self._done = True
                    return b""
        except _ERRORS as e:
            self._broken = True
            self._resp.close()
            raise map_error(e, self.url, in_body=True) from e
        except BaseException:
            self._broken = True
            self._resp.close()
            raise

    async def read_into(self, view: memoryview) -> int:
        if self._broken:
            raise self._closed_error()
        view = _byte_view(view)
        want = len(view)
        got = 0
        left = self._left
        if left is not None:
            k = min(len(left), want)
            view[:k] = left[:k]
            got = k
            self._left = left[k:] if k < len(left) else None
        while got < want and not self._done:
            chunk = await self._next()
            k = len(chunk)
            if not k:
                break
            if k > want - got:
                k = want - got
                self._left = memoryview(chunk)[k:]
            view[got : got + k] = chunk[:k] if k < len(chunk) else chunk
            got += k
        if not self._done and self._left is None and self._resp.content.at_eof():
            self._done = True  # all of it is here: no need to ask once more
        return got

    async def read_chunk(self) -> bytes | memoryview:
        if self._broken:
            raise self._closed_error()
        left = self._left
        if left is not None:
            self._left = None
            return left
        if self._done:
            return b""
        return await self._next()

    def close(self) -> None:
        resp = self._resp
        conn = resp.connection
        if not self._done and not self._broken and self._left is None and resp.content.at_eof():
            self._done = True
        if self._done and self._left is None:
            resp.release()  # read to its end: aiohttp pools it where allowed
            if resp.connection is None:
                return
            # still attached: aiohttp waits for the request body to go out first (a server
            # that answered early and stopped reading), which may be never
        elif self._broken:
            return
        self._broken = not self._done
        transport = conn.transport if conn is not None else None
        resp.close()
        if transport is not None:
            transport.abort()  # no graceful flush of an unsent body: free the socket now


class AiohttpTransport(Transport):
    """The seam over one ``aiohttp.ClientSession`` with a ``TCPConnector``; the same
    constructor as :class:`~.native.NativeTransport` (``limit``, ``limit_per_host``,
    ``keepalive_timeout`` (0: no reuse), ``timeouts``, ``ssl``). The session is made on
    first use, on the running loop."""

    def __init__(
        self,
        *,
        limit: int = 64,
        limit_per_host: int = 0,
        keepalive_timeout: float = 30.0,
        timeouts: Timeouts = Timeouts(),
        ssl: bool | ssl_mod.SSLContext = True,
    ) -> None:
        check_pool_args(limit, limit_per_host, ssl)
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive = keepalive_timeout
        self._timeouts = timeouts
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._checked: dict[tuple[Any, ...], None] = {}

    def _make_session(self) -> aiohttp.ClientSession:
        ssl_arg: bool | ssl_mod.SSLContext = self._ssl
        if ssl_arg is True:
            ssl_arg = default_tls_context()
        kw: dict[str, Any] = {}
        if self._keepalive > 0:
            kw["keepalive_timeout"] = self._keepalive
        else:
            kw["force_close"] = True
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            ssl=ssl_arg,
            enable_cleanup_closed=False,
            **kw,
        )
        t = self._timeouts
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect, sock_read=t.read),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            raise_for_status=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            read_bufsize=1 << 20,
        )
        return self._session

    def _check(self, request: Request) -> None:
        """The same checks of method, URL and headers as the native transport (cached)."""
        headers = request.headers
        try:
            key = (request.method, request.url, headers if type(headers) is tuple else tuple(headers))
            if key in self._checked:
                return
        except TypeError:
            key = None
        h11.request_head_prefix(request.method, request.url, headers)
        if key is not None:
            if len(self._checked) >= 1024:
                self._checked.clear()
            self._checked[key] = None

    def connections(self) -> dict[str, Any]:
        """``open``, ``idle`` and ``in_use`` as the connector counts them."""
        s = self._session
        conn = s.connector if s is not None else None
        if conn is None or conn.closed:
            return {"open": 0, "idle": 0, "in_use": 0}
        idle = sum(len(v) for v in getattr(conn, "_conns", {}).values())
        in_use = len(getattr(conn, "_acquired", ()))
        return {"open": idle + in_use, "idle": idle, "in_use": in_use}

    async def send(self, request: Request, *, deadline: float | None = None) -> AiohttpResponse:
        if self._closed:
            raise self._closed_error()
        session = self._session or self._make_session()
        self._check(request)
        method = request.method
        body: Any = request.body
        if type(body) is not bytes:
            body = memoryview(body)
            if body.ndim != 1 or body.format not in ("B", "b", "c"):
                body = body.cast("B")
        data = body if len(body) or h11.sends_content_length(method, 0) else None
        url = request.url
        kw: dict[str, Any] = {}
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TransportError("timed out: the deadline passed before sending", kind="timeout")
            t = self._timeouts
            kw["timeout"] = aiohttp.ClientTimeout(total=left, sock_connect=t.connect, sock_read=t.read)
        try:
            resp = await session.request(
                method, url, data=data, headers=request.headers, allow_redirects=False, **kw
            )
        except _ERRORS as e:
            if self._closed:
                raise self._closed_error() from e
            raise map_error(e, url, in_body=False) from e
        except asyncio.CancelledError:
            # aiohttp cancels the futures of callers waiting for a connection slot when
            # the session closes: that is our aclose(), not a cancellation of the caller
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise self._closed_error() from None
            raise
        return AiohttpResponse(resp, url, method)

    @staticmethod
    def _closed_error() -> TransportError:
        return TransportError("the transport is closed", retryable=False)

    async def aclose(self) -> None:
        self._closed = True
        s = self._session
        if s is not None and not s.closed:
            await s.close()
            for _ in range(3):  # transports close on the next loop iterations
                await asyncio.sleep(0)
