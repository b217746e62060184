"""HTTP/1.1 on asyncio ``BufferedProtocol`` connections: the default transport.

Why a transport of our own: per request, aiohttp runs a few hundred lines of Python
(request and response objects, header multidicts built twice, a stream reader, timer
contexts, payload writers), and a large body arrives as a list of ``bytes`` that is then
copied into the tensor. Here one :class:`_Conn` protocol object per connection owns a
scratch buffer for heads (and chunked bodies), and while :meth:`NativeResponse.read_into`
fills a ``Content-Length`` body, ``get_buffer`` hands the kernel the caller's own buffer:
the body is received straight into the final tensor storage, with no copy at all.

Hot path per request on a kept-alive connection: pop an idle connection (LIFO), one
cached head prefix plus the length line, one ``transport.write``, one future for the
head, one head parse, one copy of the body from the scratch buffer if it came along with
the head (else none), and the connection back on the idle list. Timeouts cost no timer
per read: a connection keeps one timer that is re-armed lazily from the time of the last
received bytes (see :meth:`_Conn._on_timer`).

Works under the default asyncio loop and under uvloop (both support ``BufferedProtocol``,
TLS included). Not supported: proxies, HTTP/2, ``Expect: 100-continue`` (an unasked-for
``100 Continue`` is skipped), response decompression (bodies come as sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_mod
import time
from collections import deque
from typing import Any

from multidict import CIMultiDictProxy
from yarl import URL

from ..errors import InputError, ProtocolError, TransportError
from . import _http11 as h11
from ._base import Request, Response, Timeouts, Transport, check_pool_args, default_tls_context

__all__ = ["NativeResponse", "NativeTransport"]

#: Scratch buffer of a connection: heads, chunked bodies, ``read_chunk`` pieces, and body
#: bytes that arrive before the caller starts reading. It starts at SCRATCH_SIZE and
#: grows (doubling) up to SCRATCH_MAX when it fills up; beyond that, reading pauses
#: until the reader catches up.
SCRATCH_SIZE = 64 * 1024
SCRATCH_MAX = 256 * 1024
#: While a head is awaited, one receive takes at most this much into the scratch buffer:
#: under asyncio's selector loop (one receive per readiness event) the rest of a large
#: body then goes straight into the caller's buffer once ``read_into`` starts. (uvloop
#: reads until the socket is drained, so there up to SCRATCH_MAX may arrive before the
#: reader runs; pausing reading to prevent that measured slower than the copy it saves.)
HEAD_WINDOW = 64 * 1024
#: A request body up to this size goes out joined to its head in one write.
SMALL_BODY = 64 * 1024
#: Larger request bodies are written in slices of this size, waiting for the transport's
#: write buffer to drain in between (write flow control).
WRITE_SLICE = 1 << 20
#: Slack when deciding whether an armed timer fires early enough (it re-arms itself).
_EPS = 1e-3

_CONNECTING, _BUSY, _IDLE, _CLOSED = range(4)
#: (as _http11.request_head_end)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

Key = tuple[str, str, int]

_monotonic = time.monotonic  # idle bookkeeping (timers use the loop's clock)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class _Stale(TransportError):
    """A reused keep-alive connection was closed by the server before any byte of the
    answer arrived (the stale-connection race): the request is sent once more."""


class _Conn(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection: the protocol callbacks and the read/write primitives the
    request and response use. All state is plain attributes; only the owning
    :class:`NativeTransport` and :class:`NativeResponse` touch it."""

    __slots__ = (
        "activity",
        "buf",
        "deadline",
        "direct",
        "eof",
        "exc",
        "idle_since",
        "key",
        "lent",
        "loop",
        "lost",
        "must_close",
        "mv",
        "owner",
        "r",
        "read_timeout",
        "reused",
        "rpaused",
        "rx",
        "size",
        "state",
        "target",
        "timer",
        "timer_when",
        "tpos",
        "transport",
        "w",
        "waiter",
        "window",
        "wpaused",
    )

    def __init__(self, owner: NativeTransport, key: Key, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.key = key
        self.loop = loop
        self.transport: Any = None
        self.size = SCRATCH_SIZE
        self.buf = bytearray(SCRATCH_SIZE)
        self.mv = memoryview(self.buf)
        self.r = 0  # unread scratch data is buf[r:w]
        self.w = 0
        self.lent = False  # a view of buf[..r] was handed out until the next read
        self.target: memoryview | None = None  # the caller's buffer being filled
        self.tpos = 0
        self.direct = False  # the last get_buffer returned the target
        self.window = SCRATCH_MAX  # most bytes one receive may put into the scratch buffer
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.lost = False
        self.exc: BaseException | None = None
        self.rpaused = False
        self.wpaused = False
        self.state = _CONNECTING
        self.idle_since = 0.0
        self.reused = False
        self.must_close = False
        self.rx = 0  # bytes received, ever
        self.read_timeout = owner._timeouts.read
        self.deadline: float | None = None
        self.activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0

    # ------------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.owner._alive += 1
        if self.owner._closed:
            transport.abort()  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        t = self.target
        if t is not None:
            p = self.tpos
            if p < len(t):
                self.direct = True
                return t[p:]
        self.direct = False
        w = self.w
        if w == self.size:
            self._make_room(force=True)
            w = self.w
        return self.mv[w : w + self.window]

    def buffer_updated(self, nbytes: int) -> None:
        self.rx += nbytes
        self.activity = self.loop.time()
        if self.direct:
            self.direct = False
            self.tpos += nbytes
            if self.tpos >= len(self.target):  # type: ignore[arg-type]
                self._wake()
            return
        self.w += nbytes
        if self.state == _IDLE:  # bytes on an idle connection: nothing to answer, drop it
            self.owner._drop(self)
            return
        self._wake()
        if self.w == self.size and not self._make_room(force=False):
            if self.size < SCRATCH_MAX:
                self._regrow(min(2 * self.size, SCRATCH_MAX))
            else:
                self.rpaused = True
                with contextlib.suppress(Exception):
                    self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == _IDLE:
            self.owner._drop(self)
        else:
            self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.exc = exc
        self.owner._alive -= 1
        self._cancel_timer()
        self._wake()
        if self.state != _CLOSED:
            self.owner._drop(self)

    def pause_writing(self) -> None:
        self.wpaused = True

    def resume_writing(self) -> None:
        self.wpaused = False
        self._wake()

    # ------------------------------------------------------------------ buffer management

    def _make_room(self, *, force: bool) -> bool:
        """Free space at the end of the scratch buffer: move unread data to the front
        (unless views of it are lent out). With ``force``, switch to a fresh buffer when
        that is impossible (lent views keep the old one alive)."""
        r, w = self.r, self.w
        if r and not self.lent:
            n = w - r
            self.buf[:n] = bytes(self.mv[r:w])
            self.r, self.w = 0, n
            return True
        if not force:
            return False
        self._regrow(max(self.size, 2 * (w - r)))
        return True

    def _regrow(self, size: int) -> None:
        """Move the unread bytes into a fresh buffer of ``size`` (views lent out of the
        old one stay valid: they keep it alive)."""
        r, w = self.r, self.w
        n = w - r
        new = bytearray(size)
        new[:n] = self.mv[r:w]
        self.buf, self.mv, self.size = new, memoryview(new), size
        self.r, self.w = 0, n
        self.lent = False

    def consumed(self) -> None:
        """Call after advancing ``r``: rewind an empty buffer, resume a paused reader."""
        if self.r == self.w and not self.lent:
            self.r = self.w = 0
        if self.rpaused:
            self.resume()

    def resume(self) -> None:
        """Resume reading (paused for a full scratch buffer, or after a head window)."""
        self.rpaused = False
        if self.w == self.size:
            self._make_room(force=True)
        if self.transport is not None and not self.lost:
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def release_lent(self) -> None:
        if self.lent:
            self.lent = False
            self.consumed()

    # ------------------------------------------------------------------ waiting and timers

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        """Wait for the next event on this connection (bytes, EOF, loss, write room),
        bounded by the read timeout and the exchange's deadline."""
        if self.lost:
            return
        if self.rpaused:
            self.resume()  # whoever waits wants more bytes
        fut = self.loop.create_future()
        self.waiter = fut
        self._arm()
        try:
            await fut
        finally:
            self.waiter = None

    def _arm(self) -> None:
        now = self.activity = self.loop.time()
        rt, dl = self.read_timeout, self.deadline
        if rt is None:
            if dl is None:
                return
            due = dl
        else:
            due = now + rt if dl is None or now + rt < dl else dl
        h = self.timer
        if h is not None:
            if self.timer_when <= due + _EPS:
                return  # fires early enough; it re-arms itself from the last activity
            h.cancel()
        self.timer_when = due
        self.timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        w = self.waiter
        if w is None or w.done():
            return
        now = self.loop.time()
        rt, dl = self.read_timeout, self.deadline
        # never time out before the limit: a timer that fires early is armed again
        if dl is not None and now >= dl:
            what = "the exchange's deadline passed"
        elif rt is not None and now >= self.activity + rt:
            what = f"no data for {rt:g} s (read timeout)"
        else:
            due = self.activity + rt if rt is not None else dl
            if dl is not None and due > dl:  # type: ignore[operator]
                due = dl
            self.timer_when = due  # type: ignore[assignment]
            self.timer = self.loop.call_at(due, self._on_timer)  # type: ignore[arg-type]
            return
        self.waiter = None
        host, port = self.key[1], self.key[2]
        w.set_exception(TransportError(f"timed out talking to {host}:{port}: {what}", kind="timeout"))

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # ------------------------------------------------------------------ shutdown

    def shut(self) -> None:
        """Close the socket now (no graceful flush: the connection is not reusable)."""
        self._cancel_timer()
        self.target = None
        t = self.transport
        if t is not None and not self.lost:
            t.abort()
        self._wake()

    # ------------------------------------------------------------------ one exchange

    def _lost_error(self, before_head: bool) -> Exception:
        host, port = self.key[1], self.key[2]
        exc = self.exc
        if before_head:
            if isinstance(exc, ssl_mod.SSLError):
                return TransportError(f"TLS failure talking to {host}: {exc}", retryable=False, kind="tls")
            why = f": {exc}" if exc else ""
            return TransportError(f"{host}:{port} closed the connection before answering{why}")
        why = f" ({exc})" if exc else ""
        return ProtocolError(f"response body from {host}:{port} was cut short{why}", retryable=True)

    async def write_request(self, head: bytes, body: bytes | memoryview, nbody: int) -> None:
        """Write head and body. Stops early (the connection is then not reused) when the
        connection ends or the server's final answer arrives before the body is out;
        :meth:`read_head` then reads that answer or reports the failure."""
        t = self.transport
        if self.lost or self.eof or t is None:
            self.must_close = True
            return
        if nbody <= SMALL_BODY:
            t.write(head + body if nbody else head)
            return
        t.write(head)
        off = 0
        while off < nbody:
            if self.lost or self.eof or (self.w > self.r and self._final_head_waiting()):
                self.must_close = True  # the server answered (or left) early: stop sending
                return
            t.write(body[off : off + WRITE_SLICE])
            off += WRITE_SLICE
            while self.wpaused and not (self.lost or self.eof):
                if self.w > self.r and self._final_head_waiting():
                    self.must_close = True
                    return
                await self.wait()
        if self.lost or self.eof or t.get_write_buffer_size():
            self.must_close = True  # not all of the body left yet: reading may race it

    def _final_head_waiting(self) -> bool:
        """Whether a final (non-1xx) response head is complete in the buffer; skips
        interim 1xx heads."""
        while True:
            end = h11.find_head_end(self.buf, self.r, self.w)
            if end < 0:
                return False
            if self.buf[self.r + 9 : self.r + 10] == b"1":
                self.r = end
                self.consumed()
                continue
            return True

    async def read_head(self, method: str, rx0: int) -> h11.ResponseHead:
        """Wait for and parse the final response head (interim 1xx heads are skipped).
        ``rx0``: bytes received before the request (tells a stale connection)."""
        scan = 0  # bytes of buf[r:w] already searched for the end of the head
        while True:
            r = self.r
            n = self.w - r
            end = h11.find_head_end(self.buf, r + scan, self.w) if n else -1
            if end >= 0:
                head = bytes(self.mv[r:end])
                self.r = end
                self.consumed()
                scan = 0
                rh = h11.parse_response_head(head, request_method=method)
                if rh.status < 200:
                    if rh.status == 101:
                        raise ProtocolError("unexpected 101 Switching Protocols", retryable=True)
                    continue
                if rh.framing != h11.BODY_LENGTH:
                    self.window = SCRATCH_MAX  # chunked or to-EOF: all of it goes through here
                return rh
            if n > h11.MAX_HEAD:
                raise ProtocolError(
                    f"malformed HTTP response: head longer than {h11.MAX_HEAD} bytes", retryable=True
                )
            scan = max(0, n - 2)
            if self.eof or self.lost:
                if n:
                    raise ProtocolError(
                        f"response head from {self.key[1]}:{self.key[2]} was cut short", retryable=True
                    )
                err = self._lost_error(True)
                if self.reused and self.rx == rx0 and not isinstance(self.exc, ssl_mod.SSLError):
                    raise _Stale(str(err))
                raise err
            await self.wait()

    async def fill(self, view: memoryview) -> int:
        """Let the kernel write straight into ``view`` until it is full or the stream
        ends; returns the bytes written. The scratch buffer must be empty."""
        self.target = view
        self.tpos = 0
        size = len(view)
        try:
            while self.tpos < size and not self.lost and not self.eof:
                await self.wait()
            return self.tpos
        finally:
            self.target = None
            self.direct = False


# --------------------------------------------------------------------------- response

_OPEN, _DONE, _CLOSED_EARLY = range(3)


def _byte_view(view: memoryview) -> memoryview:
    if not isinstance(view, memoryview):
        view = memoryview(view)
    if view.readonly:
        raise InputError("read_into needs a writable buffer")
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


class NativeResponse(Response):
    """A response of :class:`NativeTransport` (see :class:`~._base.Response`)."""

    __slots__ = (
        "_conn",
        "_decoder",
        "_end_pending",
        "_framing",
        "_keep",
        "_length",
        "_pending",
        "_remaining",
        "_state",
        "_transport",
        "headers",
        "reason",
        "status",
        "url",
        "version",
    )

    def __init__(self, transport: NativeTransport, conn: _Conn, rh: h11.ResponseHead, url: URL) -> None:
        self._transport = transport
        self._conn: _Conn | None = conn
        self.status = rh.status
        self.reason = rh.reason
        self.headers = CIMultiDictProxy(rh.headers)
        self.url = url
        #: (1, 0) or (1, 1)
        self.version = (1, rh.minor)
        self._framing = rh.framing
        self._length = rh.length
        self._remaining = rh.length or 0
        self._keep = rh.keep_alive
        self._decoder: h11.ChunkedDecoder | None = None
        self._pending: deque[memoryview] = deque()
        self._end_pending = False
        self._state = _OPEN
        if rh.framing == h11.BODY_CHUNKED:
            self._decoder = h11.ChunkedDecoder()
        elif rh.framing == h11.BODY_NONE or (rh.framing == h11.BODY_LENGTH and not rh.length):
            self._finish(strict=False)

    @property
    def content_length(self) -> int | None:
        """The length the body is framed with (0 where there is none), ``None`` for
        chunked and read-to-EOF bodies."""
        if self._framing == h11.BODY_NONE:
            return 0
        return self._length

    # ------------------------------------------------------------------ release

    def _finish(self, strict: bool = True) -> None:
        """The body was read to its end: the connection goes back to the pool.

        ``strict``: bytes that arrived after the end of a sized or chunked body (with
        it, before it was read) make the answer suspect — its framing lied — and raise a
        retryable ProtocolError; bytes that come later only keep the connection from
        being reused (it is dropped when they arrive)."""
        conn = self._conn
        self._state = _DONE
        if conn is None:
            return
        self._conn = None
        conn.lent = False
        if strict and conn.w > conn.r and self._framing != h11.BODY_EOF:
            self._state = _CLOSED_EARLY
            self._transport._drop(conn)
            what = "Content-Length" if self._framing == h11.BODY_LENGTH else "last chunk"
            raise ProtocolError(
                f"response from {conn.key[1]}:{conn.key[2]} has more bytes after its {what}",
                retryable=True,
            )
        reusable = (
            self._keep
            and conn.r == conn.w  # nothing after the body
            and not conn.eof
            and not conn.lost
            and not conn.must_close
        )
        if reusable:
            conn.r = conn.w = 0
            if conn.rpaused:
                conn.resume()  # (idle, it must notice EOF or stray bytes)
        self._transport._release(conn, reusable)

    def _fail(self) -> None:
        conn = self._conn
        if self._state == _OPEN:
            self._state = _CLOSED_EARLY
        if conn is not None:
            self._conn = None
            self._transport._drop(conn)

    def close(self) -> None:
        if self._conn is None:
            return
        if self._end_pending or (self._framing == h11.BODY_LENGTH and not self._remaining):
            self._finish(strict=False)
        else:
            self._fail()

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:  # dropped unclosed: free its slot
            self._conn = None
            with contextlib.suppress(Exception):
                conn.loop.call_soon_threadsafe(self._transport._drop, conn)

    def _closed_error(self) -> Exception:
        return TransportError("the response was closed (or failed) before its body was read", retryable=True)

    # ------------------------------------------------------------------ reads

    async def read_into(self, view: memoryview) -> int:
        conn = self._conn
        if conn is None:
            if self._state == _DONE:
                return 0
            raise self._closed_error()
        if self._end_pending:
            self._finish()
            return 0
        if type(view) is not memoryview or view.ndim != 1 or view.format != "B" or view.readonly:
            view = _byte_view(view)
        try:
            framing = self._framing
            if framing != h11.BODY_LENGTH:
                if framing == h11.BODY_EOF:
                    return await self._read_eof_into(conn, view)
                return await self._read_chunks_into(conn, view)
            # Content-Length: what came with the head is copied, the rest is received
            # straight into the caller's buffer
            if conn.lent:
                conn.release_lent()
            want = len(view)
            if want > self._remaining:
                want = self._remaining
            got = await self._copy_then_fill(conn, view, want)
            if got < want:
                raise conn._lost_error(False)
            self._remaining -= got
            if not self._remaining:
                self._finish()
            return got
        except BaseException:
            self._fail()
            raise

    async def _copy_then_fill(self, conn: _Conn, view: memoryview, want: int) -> int:
        """Up to ``want`` bytes into ``view``: what is buffered already is copied, the
        rest is received straight into ``view``; fewer only when the stream ends."""
        got = conn.w - conn.r
        if got:
            if got > want:
                got = want
            r = conn.r
            view[:got] = conn.mv[r : r + got]
            conn.r = r + got
            conn.consumed()
            self._transport._copied += got
        if got < want:
            n = await conn.fill(view[got:want])
            self._transport._direct += n
            got += n
        return got

    async def _read_eof_into(self, conn: _Conn, view: memoryview) -> int:
        conn.release_lent()
        want = len(view)
        got = await self._copy_then_fill(conn, view, want)
        if got < want:  # the stream ended: that is the end of this body
            if conn.exc is not None and not isinstance(conn.exc, ssl_mod.SSLError):
                raise conn._lost_error(False)
            self._keep = False
            self._finish()
        return got

    async def _read_chunks_into(self, conn: _Conn, view: memoryview) -> int:
        want = len(view)
        got = 0
        while got < want:
            piece = await self._next_piece(conn)
            if piece is None:
                break
            k = len(piece)
            if k > want - got:
                k = want - got
                self._pending.appendleft(piece[k:])
                self._end_pending = False
            view[got : got + k] = piece[:k]
            got += k
            self._transport._copied += k
        if self._end_pending:
            self._finish()
        elif not self._pending:
            conn.release_lent()  # (pending pieces still point into the scratch buffer)
        return got

    async def _next_piece(self, conn: _Conn) -> memoryview | None:
        """The next piece of a chunked body (a view of the scratch buffer, lent until
        the next read), or None at its end. ``_end_pending`` is set once the last piece
        has been handed out."""
        pending = self._pending
        dec = self._decoder
        assert dec is not None
        if not pending:
            if self._end_pending:
                return None
            conn.release_lent()
            while True:
                if conn.w > conn.r:
                    pieces, used = dec.feed(conn.buf, conn.r, conn.w)
                    conn.r += used
                    if pieces:
                        conn.lent = True
                        pending.extend(pieces)
                        break
                    conn.consumed()
                    if dec.done:
                        self._end_pending = True
                        return None
                elif dec.done:
                    self._end_pending = True
                    return None
                if conn.eof or conn.lost:
                    raise conn._lost_error(False)
                await conn.wait()
        piece = pending.popleft()
        if not pending and dec.done:
            self._end_pending = True
        return piece

    async def read_chunk(self) -> bytes | memoryview:
        conn = self._conn
        if conn is None:
            if self._state == _DONE:
                return b""
            raise self._closed_error()
        try:
            framing = self._framing
            if framing == h11.BODY_CHUNKED:
                piece = await self._next_piece(conn)
                if piece is None:
                    self._finish()
                    return b""
                return piece
            conn.release_lent()
            if self._end_pending:
                self._finish()
                return b""
            if framing == h11.BODY_LENGTH:
                conn.window = SCRATCH_MAX  # streamed through the scratch buffer
                while conn.w == conn.r:
                    if conn.eof or conn.lost:
                        raise conn._lost_error(False)
                    await conn.wait()
                k = min(conn.w - conn.r, self._remaining)
                r = conn.r
                conn.r = r + k
                conn.lent = True
                self._remaining -= k
                if not self._remaining:
                    self._end_pending = True
                return conn.mv[r : r + k]
            # read to EOF
            while conn.w == conn.r:
                if conn.eof or conn.lost:
                    if conn.exc is not None and not isinstance(conn.exc, ssl_mod.SSLError):
                        raise conn._lost_error(False)
                    self._keep = False
                    self._finish()
                    return b""
                await conn.wait()
            r, w = conn.r, conn.w
            conn.r = w
            conn.lent = True
            return conn.mv[r:w]
        except BaseException:
            self._fail()
            raise


# --------------------------------------------------------------------------- transport


class _Waiter:
    __slots__ = ("fut", "key")

    def __init__(self, key: Key, fut: asyncio.Future[_Conn | None]) -> None:
        self.key = key
        self.fut = fut


class NativeTransport(Transport):
    """HTTP/1.1 client on asyncio ``BufferedProtocol`` connections (see the module doc).

    - ``limit``: connections open at once, all hosts together; ``limit_per_host`` per
      (scheme, host, port), 0 meaning ``limit``. Callers beyond the limits wait in FIFO
      order for a connection or a free slot.
    - ``keepalive_timeout``: seconds an idle connection stays pooled (0: no reuse).
    - ``timeouts``: :class:`~._base.Timeouts` (connect; read = the wait for the head and
      every gap between received bytes, and every stall of the request body write).
    - ``ssl``: ``True`` verifies certificates with ``ssl.create_default_context()``,
      ``False`` turns verification off, or pass an ``ssl.SSLContext``.

    Bound to the event loop it is first used on.
    """

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
        self._limit_per_host = limit_per_host or limit
        self._keepalive = keepalive_timeout
        self._timeouts = timeouts
        self._ssl_arg = ssl
        self._ssl_ctx: ssl_mod.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._idle: dict[Key, list[_Conn]] = {}
        self._n_idle = 0
        self._n_open = 0  # slots taken: connecting, busy and idle connections
        self._per_host: dict[Key, int] = {}
        self._conns: set[_Conn] = set()
        self._waiters: deque[_Waiter] = deque()
        self._waking = False
        self._sweep: asyncio.TimerHandle | None = None
        self._heads: dict[tuple[Any, ...], tuple[bytes, Key, str]] = {}
        self._alive = 0  # transports made and not yet lost (open sockets)
        self._opened = 0
        self._reuses = 0
        self._direct = 0
        self._copied = 0

    # ------------------------------------------------------------------ public

    def connections(self) -> dict[str, Any]:
        """``open`` (connections holding a slot), ``idle``, ``in_use``, ``waiting``
        (callers waiting for a slot), ``sockets`` (sockets not yet closed), ``opened`` and
        ``reused`` (counts since creation), ``body_direct_bytes`` (body bytes the kernel
        wrote straight into callers' buffers) and ``body_copied_bytes`` (copied there from
        the scratch buffers)."""
        return {
            "open": self._n_open,
            "idle": self._n_idle,
            "in_use": self._n_open - self._n_idle,
            "waiting": len(self._waiters),
            "sockets": self._alive,
            "opened": self._opened,
            "reused": self._reuses,
            "body_direct_bytes": self._direct,
            "body_copied_bytes": self._copied,
        }

    async def send(self, request: Request, *, deadline: float | None = None) -> NativeResponse:
        loop = self._loop
        if loop is None:
            loop = self._bind()
        elif loop is not asyncio.get_running_loop():
            raise RuntimeError("a NativeTransport is bound to the event loop it was first used on")
        if self._closed:
            raise TransportError("the transport is closed", retryable=False)
        method = request.method
        headers = request.headers
        try:
            cache_key = (method, request.url, headers if type(headers) is tuple else tuple(headers))
            entry = self._heads.get(cache_key)
        except TypeError:  # unhashable header values: build without the cache
            cache_key, entry = None, None
        if entry is None:
            entry = self._head_entry(method, request.url, headers, cache_key)
        prefix, key, _ = entry
        body = request.body
        if type(body) is bytes:
            nbody = len(body)
        else:
            body = memoryview(body)
            if body.ndim != 1 or body.format not in ("B", "b", "c"):
                body = body.cast("B")
            nbody = len(body)
        if nbody or method in _BODY_METHODS:
            head = prefix + b"Content-Length: %d\r\n\r\n" % nbody
        else:
            head = prefix + b"\r\n"
        if deadline is not None and loop.time() >= deadline:
            raise TransportError("timed out: the deadline passed before sending", kind="timeout")

        for attempt in (0, 1):
            conn = self._pop_idle(key) if key in self._idle else None
            if conn is None:
                conn = await self._acquire(key, deadline)
            conn.deadline = deadline
            conn.window = HEAD_WINDOW
            rx0 = conn.rx
            try:
                if nbody <= SMALL_BODY and not (conn.lost or conn.eof):
                    conn.transport.write(head + body if nbody else head)  # (the common case)
                else:
                    await conn.write_request(head, body, nbody)
                rh = await conn.read_head(method, rx0)
            except _Stale as e:
                self._drop(conn)
                if attempt:
                    raise TransportError(str(e)) from None
                continue
            except BaseException:
                self._drop(conn)
                raise
            return NativeResponse(self, conn, rh, request.url)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self._loop is None:
            self._closed = True
            return
        if not self._closed:
            self._closed = True
            err = TransportError("the transport is closed", retryable=False)
            while self._waiters:
                w = self._waiters.popleft()
                if not w.fut.done():
                    w.fut.set_exception(err)
            if self._sweep is not None:
                self._sweep.cancel()
                self._sweep = None
            for conn in list(self._conns):
                self._close_conn(conn)
            self._heads.clear()
        # sockets close on the loop's next iterations (connection_lost)
        for _ in range(1000):
            if self._alive <= 0:
                break
            await asyncio.sleep(0 if _ < 10 else 0.005)

    # ------------------------------------------------------------------ internals

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _tls(self) -> ssl_mod.SSLContext:
        """The TLS context, made on the first https connection (loading the CA store
        costs ~100 ms and ~1 MB: plain-http clients never pay it), and the default
        verified one shared by the whole process."""
        if self._ssl_ctx is None:
            if self._ssl_arg is True:
                self._ssl_ctx = default_tls_context()
            elif self._ssl_arg is False:
                ctx = ssl_mod.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl_mod.CERT_NONE
                self._ssl_ctx = ctx
            else:
                self._ssl_ctx = self._ssl_arg
        return self._ssl_ctx

    def _head_entry(
        self, method: str, url: URL, headers: Any, cache_key: tuple[Any, ...] | None
    ) -> tuple[bytes, Key, str]:
        prefix = h11.request_head_prefix(method, url, headers)
        scheme = url.scheme
        host = url.raw_host or ""
        port = url.port or _default_port(scheme)
        entry = (prefix, (scheme, host, port), host)
        if cache_key is not None:
            if len(self._heads) >= 1024:
                self._heads.clear()
            self._heads[cache_key] = entry
        return entry

    def _room(self, key: Key) -> bool:
        return self._n_open < self._limit and self._per_host.get(key, 0) < self._limit_per_host

    def _reserve(self, key: Key) -> None:
        self._n_open += 1
        self._per_host[key] = self._per_host.get(key, 0) + 1

    def _unreserve(self, key: Key) -> None:
        self._n_open -= 1
        n = self._per_host[key] - 1
        if n:
            self._per_host[key] = n
        else:
            del self._per_host[key]

    def _evict_idle_other(self, key: Key) -> bool:
        """Close the longest-idle connection to another host to free a slot for ``key``."""
        best: _Conn | None = None
        for k, conns in self._idle.items():
            if k != key and conns and (best is None or conns[0].idle_since < best.idle_since):
                best = conns[0]
        if best is None:
            return False
        self._close_conn(best)
        return True

    def _pop_idle(self, key: Key) -> _Conn | None:
        """The most recently pooled live connection for ``key`` (LIFO), if any; idle
        connections past ``keepalive_timeout`` met on the way are closed."""
        idle = self._idle.get(key)
        if idle:
            now = _monotonic()
            keepalive = self._keepalive
            while idle:
                conn = idle.pop()
                self._n_idle -= 1
                if now - conn.idle_since <= keepalive and not conn.eof and not conn.lost:
                    conn.state = _BUSY
                    conn.reused = True
                    self._reuses += 1
                    return conn
                conn.state = _BUSY  # not on the idle list any more
                self._close_conn(conn)
        return None

    async def _acquire(self, key: Key, deadline: float | None) -> _Conn:
        conn = self._pop_idle(key)
        if conn is not None:
            return conn
        # (waiters that could use a free slot were given it when it freed)
        if self._room(key) or (
            self._n_open >= self._limit
            and self._per_host.get(key, 0) < self._limit_per_host
            and self._evict_idle_other(key)
        ):
            self._reserve(key)
            return await self._connect(key, deadline)
        return await self._wait_slot(key, deadline)

    async def _wait_slot(self, key: Key, deadline: float | None) -> _Conn:
        fut: asyncio.Future[_Conn | None] = self._loop.create_future()  # type: ignore[union-attr]
        waiter = _Waiter(key, fut)
        self._waiters.append(waiter)
        try:
            if deadline is None:
                got = await fut
            else:
                async with asyncio.timeout_at(deadline):
                    got = await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()  # handed over just as we gave up: give it back
                if got is None:
                    self._unreserve(key)
                    self._wake_waiters()
                else:
                    self._release(got, True)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if not fut.done():
                    fut.cancel()
            if isinstance(e, TimeoutError):
                raise TransportError(
                    "timed out: the deadline passed waiting for a free connection", kind="timeout"
                ) from None
            raise
        if got is None:  # a slot was reserved for us
            return await self._connect(key, deadline)
        return got

    async def _connect(self, key: Key, deadline: float | None) -> _Conn:
        """Open a connection in a slot already reserved for ``key``."""
        loop = self._loop
        assert loop is not None
        conn = _Conn(self, key, loop)
        self._conns.add(conn)
        scheme, host, port = key
        tls = scheme == "https"
        connect = self._timeouts.connect
        when = None if connect is None else loop.time() + connect
        if deadline is not None and (when is None or deadline < when):
            when = deadline
        try:
            async with asyncio.timeout_at(when):
                await loop.create_connection(
                    lambda: conn,
                    host,
                    port,
                    ssl=self._tls() if tls else None,
                    server_hostname=host if tls else None,
                    ssl_handshake_timeout=(connect or None) if tls else None,
                )
        except BaseException as e:
            conn.state = _BUSY
            self._drop(conn)
            raise self._connect_error(e, host, port) from e
        if self._closed:
            self._drop(conn)
            raise TransportError("the transport is closed", retryable=False)
        conn.state = _BUSY
        self._opened += 1
        return conn

    @staticmethod
    def _connect_error(e: BaseException, host: str, port: int) -> BaseException:
        if isinstance(e, (ssl_mod.SSLError, ssl_mod.CertificateError)):
            return TransportError(
                f"TLS failure talking to {host}: {e}. Check the certificate, or pass an "
                "ssl.SSLContext; verification stays on by default",
                retryable=False,
                kind="tls",
            )
        if isinstance(e, TimeoutError):
            return TransportError(f"timed out connecting to {host}:{port}", kind="timeout")
        if isinstance(e, OSError):
            return TransportError(f"cannot connect to {host}:{port}: {e}")
        if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            return e
        if isinstance(e, TransportError):
            return e
        return TransportError(f"cannot connect to {host}:{port}: {type(e).__name__}: {e}")

    def _release(self, conn: _Conn, reusable: bool) -> None:
        """A response is done with ``conn``: pool it (or hand it over), else close it."""
        conn.deadline = None
        if (
            not reusable
            or self._closed
            or conn.state != _BUSY
            or conn.lost
            or conn.eof
            or self._keepalive <= 0
        ):
            self._drop(conn)
            return
        key = conn.key
        if self._waiters:
            for waiter in self._waiters:
                if waiter.key == key and not waiter.fut.done():
                    self._waiters.remove(waiter)
                    conn.reused = True
                    self._reuses += 1
                    waiter.fut.set_result(conn)
                    return
        conn.state = _IDLE
        conn.idle_since = _monotonic()
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = []
        idle.append(conn)
        self._n_idle += 1
        if self._sweep is None:
            self._sweep = self._loop.call_later(max(self._keepalive, 0.05), self._do_sweep)  # type: ignore[union-attr]
        if self._waiters:
            self._wake_waiters()

    def _close_conn(self, conn: _Conn) -> None:
        """Close ``conn`` and free its slot (without waking waiters)."""
        state = conn.state
        if state == _CLOSED:
            return
        if state == _IDLE:
            idle = self._idle.get(conn.key)
            if idle is not None:
                with contextlib.suppress(ValueError):
                    idle.remove(conn)
                    self._n_idle -= 1
                if not idle:
                    del self._idle[conn.key]
        conn.state = _CLOSED
        self._unreserve(conn.key)
        self._conns.discard(conn)
        conn.shut()

    def _drop(self, conn: _Conn) -> None:
        """Close ``conn``, free its slot and let a waiter have it."""
        if conn.state == _CLOSED:
            return
        self._close_conn(conn)
        if self._waiters:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._waking or self._closed:
            return
        self._waking = True
        try:
            waiters = self._waiters
            for waiter in list(waiters):
                if waiter.fut.done():
                    waiters.remove(waiter)
                    continue
                key = waiter.key
                idle = self._idle.get(key)
                if idle:
                    conn = idle.pop()
                    self._n_idle -= 1
                    if not idle:
                        del self._idle[key]
                    conn.state = _BUSY
                    conn.reused = True
                    self._reuses += 1
                    waiters.remove(waiter)
                    waiter.fut.set_result(conn)
                    continue
                if not self._room(key) and not (
                    self._n_open >= self._limit
                    and self._per_host.get(key, 0) < self._limit_per_host
                    and self._evict_idle_other(key)
                ):
                    continue
                self._reserve(key)
                waiters.remove(waiter)
                waiter.fut.set_result(None)
        finally:
            self._waking = False

    def _do_sweep(self) -> None:
        self._sweep = None
        if self._closed:
            return
        now = _monotonic()
        for conns in list(self._idle.values()):
            for conn in list(conns):
                if now - conn.idle_since > self._keepalive:
                    self._close_conn(conn)
        if self._n_idle:
            self._sweep = self._loop.call_later(max(self._keepalive / 2, 0.05), self._do_sweep)  # type: ignore[union-attr]
