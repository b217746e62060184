"""The transport seam's contract (``asyncvae/transport/_base.py``), checked against every
implementation: ``NativeTransport`` and ``AiohttpTransport``, each under the default
asyncio loop and under uvloop, against real servers on 127.0.0.1:

- the project's reference server (``make_server``) for normal answers, small and large;
- :class:`RawServer`, an ``asyncio.start_server`` on its own loop thread whose handler
  writes arbitrary bytes: chunked and read-to-EOF bodies, Content-Length lies both ways,
  early close and reset, stalls and slow drips (read timeout, deadline), answers before
  the request body was read, keep-alive reuse (accepted connections are counted),
  ``Connection: close``, HTTP/1.0, garbage and EOF while idle, ``100 Continue``, HEAD
  and 204;
- a TLS server with a ``trustme`` CA: verification on by default (kind ``tls``), a
  context that trusts the CA, and ``ssl=False``.

After every test the transport is closed and must report no open connection, and no
client socket to the test server may be left in this process. Timing: only generous
timeouts (the box is a loaded 2-core VM); nothing asserts how fast anything was.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import pytest
from yarl import URL

from asyncvae import InputError, ProtocolError, TransportError
from asyncvae.transport import Request, Response, Timeouts, Transport
from asyncvae.transport.aiohttp import AiohttpTransport
from asyncvae.transport.native import SCRATCH_MAX, NativeTransport

uvloop = pytest.importorskip("uvloop")

IMPLS = {"native": NativeTransport, "aiohttp": AiohttpTransport}
KINDS = [("native", "asyncio"), ("native", "uvloop"), ("aiohttp", "asyncio"), ("aiohttp", "uvloop")]
TEST_TIMEOUT = 60.0


@pytest.fixture(params=KINDS, ids=[f"{i}-{lp}" for i, lp in KINDS])
def kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


@pytest.fixture(params=[k for k in KINDS if k[0] == "native"], ids=["native-asyncio", "native-uvloop"])
def native(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


def client_sockets(port: int) -> int:
    """TCP sockets of this process connected to ``port`` (the client side)."""
    proc = psutil.Process()
    conns = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    return sum(1 for c in conns(kind="tcp") if c.raddr and c.raddr.port == port)


def run(
    kind: tuple[str, str],
    fn: Callable[[Transport], Awaitable[Any]],
    *,
    ports: tuple[int, ...] = (),
    **kw: Any,
) -> Any:
    """Run ``fn(transport)`` on a fresh loop of the given kind, then close the transport
    and check that nothing stays open."""
    impl, loop_kind = kind
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop

    async def main() -> Any:
        t = IMPLS[impl](**kw)
        try:
            return await asyncio.wait_for(fn(t), TEST_TIMEOUT)
        finally:
            await t.aclose()
            assert t.connections()["open"] == 0
            for port in ports:
                for _ in range(200):  # aiohttp closes its sockets a few iterations later
                    if not client_sockets(port):
                        break
                    await asyncio.sleep(0.01)
                assert client_sockets(port) == 0, f"client sockets to :{port} left open"

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait (polling) until ``cond()``; fail after a generous timeout."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- the raw server


@dataclass
class Req:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def answer(
    status: int = 200,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    reason: str = "OK",
    version: str = "1.1",
    length: bool = True,
) -> bytes:
    lines = [f"HTTP/{version} {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


class RawConn:
    """The server side of one connection."""

    def __init__(self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer

    async def read_head(self) -> Req | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        req = Req(method, target, headers, b"")
        self.server.requests.append(req)
        return req

    async def read_request(self) -> Req | None:
        req = await self.read_head()
        if req is not None:
            n = int(req.header("Content-Length") or 0)
            try:
                req.body = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
        return req

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def until_closed(self) -> None:
        """Wait for the client to close the connection (reads and drops what comes)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.server.saw_close.set()

    def reset(self) -> None:
        """Close with a RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        import socket
        import struct

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[RawConn], Awaitable[None]]


class RawServer:
    """``asyncio.start_server`` on its own loop thread; ``handler(conn)`` runs per
    connection. Counts accepted connections and the most open at once."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.requests: list[Req] = []
        self.saw_close = threading.Event()
        self.release = threading.Event()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_ctx else 'http'}://127.0.0.1:{self.port}/"

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            await self.handler(RawConn(self, reader, writer))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError, ssl.SSLError):
            pass
        finally:
            self.open -= 1
            writer.transport.abort()
            self._tasks.discard(task)

    async def wait_release(self) -> None:
        await asyncio.to_thread(self.release.wait, TEST_TIMEOUT)

    def start(self) -> RawServer:
        ready = threading.Event()

        async def boot() -> None:
            self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0, ssl=self.ssl_ctx)
            self.port = self._server.sockets[0].getsockname()[1]

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(boot())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="raw-server")
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        self.release.set()

        async def down() -> None:
            assert self._server is not None
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def raw() -> Any:
    made: list[RawServer] = []

    def make(handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> RawServer:
        srv = RawServer(handler, ssl_ctx).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


def keepalive(respond: Callable[[Req], bytes]) -> Handler:
    """A handler that answers every request on the connection with ``respond(req)``."""

    async def handler(c: RawConn) -> None:
        while (req := await c.read_request()) is not None:
            c.write(respond(req))
            await c.drain()

    return handler


def post(url: str, body: bytes | memoryview = b"x", headers: tuple[tuple[str, str], ...] = (), method: str = "POST") -> Request:
    return Request(method, URL(url, encoded=True), headers, body)


async def fetch(t: Transport, req: Request, **kw: Any) -> tuple[Response, bytes]:
    async with await t.send(req, **kw) as resp:
        return resp, await resp.read(1 << 30)


# --------------------------------------------------------------------------- reference server

DECODE_QUERY = (
    "?image_format=jpg&output_type=pt&partial_postprocess=True"
    "&shape=1&shape=4&shape={h}&shape={w}&dtype=float16"
)
TENSOR_HEADERS = (("Content-Type", "tensor/binary"), ("Accept", "tensor/binary"))


def decode_request(base: str, h: int, w: int) -> Request:
    latent = np.random.default_rng(h * 1000 + w).standard_normal((1, 4, h, w)).astype(np.float16)
    return Request("POST", URL(base + DECODE_QUERY.format(h=h, w=w), encoded=True), TENSOR_HEADERS,
                   memoryview(latent).cast("B"))


def test_reference_server_answers(kind: tuple[str, str], make_server: Any) -> None:
    srv = make_server()
    port = int(srv.url.rstrip("/").rsplit(":", 1)[1])

    async def go(t: Transport) -> None:
        for h, w in [(8, 8), (128, 128)]:  # 12 KiB and 3 MiB uint8 answers
            req = decode_request(srv.url, h, w)
            async with await t.send(req) as resp:
                assert resp.status == 200
                assert resp.headers["shape"] == f"[1, {h * 8}, {w * 8}, 3]"
                n = resp.content_length
                assert n == h * w * 64 * 3
                buf = np.empty(n, np.uint8)
                assert await resp.read_into(memoryview(buf)) == n
                assert await resp.read_into(memoryview(bytearray(4))) == 0  # after the end
                assert await resp.read_chunk() == b""
            _, again = await fetch(t, req)
            assert again == buf.tobytes()
            # read_into in steps, into a view of another item format
            async with await t.send(req) as resp:
                out = np.empty(n // 2, np.float16)
                view = memoryview(out)
                assert await resp.read_into(view[: len(out) // 3]) == (len(out) // 3) * 2
                assert await resp.read_into(view[len(out) // 3 :]) == n - (len(out) // 3) * 2
                assert out.view(np.uint8).tobytes() == buf.tobytes()
        # sequential requests ride one kept-alive connection
        assert t.connections()["open"] == 1 and t.connections()["idle"] == 1

        async def one() -> None:
            _, body = await fetch(t, decode_request(srv.url, 8, 8))
            assert len(body) == 12288

        await asyncio.gather(*(one() for _ in range(64)))
        assert t.connections()["open"] <= 16  # limit_per_host

    run(kind, go, ports=(port,), limit_per_host=16)


# --------------------------------------------------------------------------- what goes out


def test_sends_exactly_the_given_headers(kind: tuple[str, str], raw: Any) -> None:
    srv = raw(keepalive(lambda req: answer(200, b"ok")))

    async def go(t: Transport) -> None:
        hdrs = (("Content-Type", "tensor/binary"), ("Accept", "tensor/binary"), ("X-Custom", "v 1"))
        url = srv.url + "decode?shape=1&shape=4&a=%2F%20b"
        resp, body = await fetch(t, post(url, memoryview(b"abc"), hdrs))
        assert (resp.status, resp.reason, body) == (200, "OK", b"ok")
        req = srv.requests[-1]
        assert (req.method, req.target, req.body) == ("POST", "/decode?shape=1&shape=4&a=%2F%20b", b"abc")
        got = {k.lower(): v for k, v in req.headers}
        assert len(got) == len(req.headers)  # no duplicates
        assert got == {
            "host": f"127.0.0.1:{srv.port}",
            "content-type": "tensor/binary",
            "accept": "tensor/binary",
            "x-custom": "v 1",
            "content-length": "3",
        }
        await fetch(t, post(srv.url, b"", method="GET"))
        assert {k.lower() for k, _ in srv.requests[-1].headers} == {"host"}
        await fetch(t, post(srv.url, b""))
        assert srv.requests[-1].header("Content-Length") == "0"
        # a body of another item format goes out as its bytes
        arr = np.arange(6, dtype=np.float32).reshape(2, 3)
        await fetch(t, post(srv.url, memoryview(arr)))
        assert srv.requests[-1].body == arr.tobytes()
        # a given Host replaces the derived one
        await fetch(t, post(srv.url, b"x", (("Host", "vae.example"),)))
        assert [v for k, v in srv.requests[-1].headers if k.lower() == "host"] == ["vae.example"]

    run(kind, go, ports=(srv.port,))


@pytest.mark.parametrize(
    "headers",
    [
        (("X-A", "a\r\nX-Injected: 1"),),
        (("Bad Name", "x"),),
        (("Content-Length", "1"),),
        (("Transfer-Encoding", "chunked"),),
    ],
)
def test_headers_that_break_framing_are_refused(kind: tuple[str, str], raw: Any, headers: Any) -> None:
    srv = raw(keepalive(lambda req: answer(200)))

    async def go(t: Transport) -> None:
        with pytest.raises(InputError):
            await t.send(post(srv.url, b"x", headers))

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 0 or not srv.requests


# --------------------------------------------------------------------------- keep-alive


def test_keepalive_reuse(kind: tuple[str, str], raw: Any) -> None:
    srv = raw(keepalive(lambda req: answer(200, req.body[::-1])))

    async def go(t: Transport) -> None:
        for i in range(5):
            _resp, body = await fetch(t, post(srv.url, b"abc%d" % i))
            assert body == (b"abc%d" % i)[::-1]
        assert t.connections()["idle"] == 1
        async with await t.send(post(srv.url, b"xyz")) as resp:
            buf = bytearray(100)  # more room than the body: read_into says how much came
            assert await resp.read_into(memoryview(buf)) == 3 and buf[:3] == b"zyx"

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 1


def test_idle_connections_expire(kind: tuple[str, str], raw: Any) -> None:
    srv = raw(keepalive(lambda req: answer(200, b"ok")))

    async def go(t: Transport) -> None:
        await fetch(t, post(srv.url))
        assert t.connections()["idle"] == 1
        await until(lambda: t.connections()["idle"] == 0)  # closed by the sweep
        await fetch(t, post(srv.url))
        await asyncio.sleep(0.5)  # past keepalive_timeout: not reused even if not swept yet
        await fetch(t, post(srv.url))

    run(kind, go, ports=(srv.port,), keepalive_timeout=0.2)
    assert srv.accepted == 3


@pytest.mark.parametrize(
    "raw_answer",
    [
        answer(200, b"bye", (("Connection", "close"),)),
        answer(200, b"bye", version="1.0"),
        answer(200, b"bye", (("Connection", "keep-alive, close"),)),
    ],
    ids=["connection-close", "http-1.0", "close-token"],
)
def test_not_reused_when_the_server_says_so(kind: tuple[str, str], raw: Any, raw_answer: bytes) -> None:
    # the server keeps the socket open: only the client's decision counts
    srv = raw(keepalive(lambda req: raw_answer))

    async def go(t: Transport) -> None:
        for _ in range(3):
            _resp, body = await fetch(t, post(srv.url))
            assert body == b"bye"

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 3


def test_unread_body_closes_the_connection(kind: tuple[str, str], raw: Any) -> None:
    srv = raw(keepalive(lambda req: answer(200, b"z" * (8 << 20))))  # more than any read buffer

    async def go(t: Transport) -> None:
        async with await t.send(post(srv.url)) as resp:
            buf = bytearray(10)
            assert await resp.read_into(memoryview(buf)) == 10
        async with await t.send(post(srv.url)) as resp:
            pass  # not read at all
        resp, body = await fetch(t, post(srv.url))
        assert len(body) == 8 << 20
        resp = await t.send(post(srv.url))
        resp.close()
        with pytest.raises(TransportError):  # reading a response closed before its end
            await resp.read_into(memoryview(bytearray(10)))

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 3  # the first two were closed; the third was read whole and reused


@pytest.mark.parametrize("path", ["garbage", "eof"])
def test_garbage_or_eof_while_idle_drops_the_connection(kind: tuple[str, str], raw: Any, path: str) -> None:
    """Bytes (here: a whole unsolicited answer) or EOF on an idle pooled connection: the
    connection is dropped, and the next request gets a fresh one and its own answer."""
    if kind[0] == "aiohttp" and path == "garbage":
        pytest.xfail("aiohttp buffers bytes received on an idle pooled connection and hands "
                     "them to the next request as its answer")
    sent = threading.Event()

    async def handler(c: RawConn) -> None:
        req = await c.read_request()
        if req is None:
            return
        c.write(answer(200, b"one"))
        await c.drain()
        await asyncio.sleep(0.05)
        if req.target == "/garbage":
            c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            await c.drain()
            sent.set()
            await c.until_closed()
        else:  # close without telling (keep-alive was implied)
            sent.set()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        sent.clear()
        _, body = await fetch(t, post(srv.url + path))
        assert body == b"one"
        await asyncio.to_thread(sent.wait, 20)
        if kind[0] == "native":
            await until(lambda: t.connections()["idle"] == 0)
        else:
            await asyncio.sleep(0.3)
        _, body = await fetch(t, post(srv.url + path))
        assert body == b"one"  # a fresh connection, not the stale answer

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 2


def test_stale_connection_race_is_retried_once(native: tuple[str, str], raw: Any) -> None:
    """The server closes right after each answer without saying so; the client reuses
    the connection at once, before it has seen the EOF: NativeTransport sends again on a
    new connection (aiohttp does that for idempotent methods only)."""

    async def handler(c: RawConn) -> None:
        if await c.read_request() is not None:
            c.write(answer(200, b"ok"))
            await c.drain()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        for _ in range(10):
            _, body = await fetch(t, post(srv.url))
            assert body == b"ok"

    run(native, go, ports=(srv.port,))


# --------------------------------------------------------------------------- body framing


def test_chunked_body(kind: tuple[str, str], raw: Any) -> None:
    payload = [b"hello ", b"x" * 70_000, b"", b" world"]

    async def handler(c: RawConn) -> None:
        while await c.read_request() is not None:
            c.write(answer(200, headers=(("Transfer-Encoding", "chunked"),), length=False))
            wire = chunked(*[p for p in payload if p], trailer=b"X-Trailer: t\r\n")
            for i in range(0, len(wire), 7000):  # in pieces, with gaps
                c.write(wire[i : i + 7000])
                await c.drain()
                await asyncio.sleep(0.001)

    srv = raw(handler)
    whole = b"".join(payload)

    async def go(t: Transport) -> None:
        resp, body = await fetch(t, post(srv.url))
        assert resp.content_length is None and body == whole
        async with await t.send(post(srv.url)) as resp:
            buf = bytearray(len(whole) + 10)
            assert await resp.read_into(memoryview(buf)[:100]) == 100
            assert await resp.read_into(memoryview(buf)[100:]) == len(whole) - 100
            assert bytes(buf[: len(whole)]) == whole
        async with await t.send(post(srv.url)) as resp:
            parts = []
            while chunk := await resp.read_chunk():
                parts.append(bytes(chunk))
            assert b"".join(parts) == whole

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 1  # chunked bodies read to their end keep the connection


@pytest.mark.parametrize("framing", ["length", "chunked", "eof"])
def test_slow_reader_of_a_large_body_gets_every_byte_in_order(kind: tuple[str, str], raw: Any, framing: str) -> None:
    """A 3 MiB body read in small pieces by a reader that dawdles: the client's buffers
    fill up, reading pauses and resumes, pieces handed out stay valid until the next
    read. Every 4-byte counter must arrive once, in order."""
    payload = np.arange(3 << 18, dtype="<u4").tobytes()  # 3 MiB of counters

    async def handler(c: RawConn) -> None:
        while await c.read_request() is not None:
            if framing == "length":
                c.write(answer(200, payload))
            elif framing == "eof":
                c.write(answer(200, length=False) + payload)
            else:
                c.write(answer(200, headers=(("Transfer-Encoding", "chunked"),), length=False))
                c.write(chunked(*[payload[i : i + 100_003] for i in range(0, len(payload), 100_003)]))
            await c.drain()
            if framing == "eof":
                return

    srv = raw(handler)

    async def go(t: Transport) -> None:
        async with await t.send(post(srv.url)) as resp:  # read_chunk, holding each piece a while
            parts = []
            while chunk := await resp.read_chunk():
                await asyncio.sleep(0.001)
                parts.append(bytes(chunk))  # still valid: no read in between
            assert b"".join(parts) == payload
        async with await t.send(post(srv.url)) as resp:  # read_into, in odd-sized steps
            out = bytearray(len(payload) + 7)
            got = 0
            while n := await resp.read_into(memoryview(out)[got : got + 77_777]):
                got += n
                if got % 7 == 0:
                    await asyncio.sleep(0.001)
            assert got == len(payload) and out[:got] == payload

    run(kind, go, ports=(srv.port,), timeouts=Timeouts(read=30))


def test_chunked_wins_over_content_length(kind: tuple[str, str], raw: Any) -> None:
    srv = raw(keepalive(lambda req: answer(
        200, chunked(b"hello"), (("Content-Length", "3"), ("Transfer-Encoding", "chunked")), length=False
    )))

    async def go(t: Transport) -> None:
        if kind[0] == "aiohttp":  # aiohttp refuses such an answer outright: also allowed
            with pytest.raises(ProtocolError):
                await fetch(t, post(srv.url))
            return
        for _ in range(2):
            resp, body = await fetch(t, post(srv.url))
            assert body == b"hello" and resp.content_length is None

    run(kind, go, ports=(srv.port,))
    if kind[0] == "native":
        assert srv.accepted == 2  # (a smuggling smell: not reused)


def test_read_to_eof_body(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        if await c.read_request() is not None:
            c.write(answer(200, length=False))
            for i in range(20):
                c.write(b"%04d" % i * 1000)
                await c.drain()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        want = b"".join(b"%04d" % i * 1000 for i in range(20))
        resp, body = await fetch(t, post(srv.url))
        assert resp.content_length is None and body == want
        async with await t.send(post(srv.url)) as resp:
            buf = bytearray(len(want) + 100)
            assert await resp.read_into(memoryview(buf)) == len(want)
            assert bytes(buf[: len(want)]) == want

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 2


def test_body_shorter_than_content_length_is_cut_short(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        if await c.read_request() is not None:
            c.write(answer(200, length=False, headers=(("Content-Length", "100000"),)) + b"a" * 5000)
            await c.drain()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        for how in ("read", "read_into", "read_chunk"):
            async with await t.send(post(srv.url)) as resp:
                with pytest.raises(ProtocolError) as ei:
                    if how == "read":
                        await resp.read(1 << 20)
                    elif how == "read_into":
                        await resp.read_into(memoryview(bytearray(100_000)))
                    else:
                        while await resp.read_chunk():
                            pass
                assert ei.value.retryable and "cut short" in str(ei.value)

    run(kind, go, ports=(srv.port,))


def test_body_longer_than_content_length(kind: tuple[str, str], raw: Any) -> None:
    """Bytes after the declared body, arriving with it: the framing lied, so the answer
    is a retryable ProtocolError, never data (aiohttp reads them as the next answer's
    status line and refuses). The next request gets a fresh connection."""
    srv = raw(keepalive(lambda req: answer(200, length=False, headers=(("Content-Length", "3"),)) + b"abcJUNK"))

    async def go(t: Transport) -> None:
        for how in ("read", "read_into", "read_chunk"):
            with pytest.raises(ProtocolError) as ei:
                async with await t.send(post(srv.url)) as resp:
                    if how == "read":
                        await resp.read(100)
                    elif how == "read_into":
                        await resp.read_into(memoryview(bytearray(3)))
                        await resp.read_into(memoryview(bytearray(3)))
                    else:
                        while await resp.read_chunk():
                            pass
            assert ei.value.retryable

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 3


def test_100_continue_is_skipped(kind: tuple[str, str], raw: Any) -> None:
    srv = raw(keepalive(lambda req: b"HTTP/1.1 100 Continue\r\n\r\n" + answer(201, b"made", reason="Created")))

    async def go(t: Transport) -> None:
        for _ in range(2):
            resp, body = await fetch(t, post(srv.url))
            assert (resp.status, resp.reason, body) == (201, "Created", b"made")

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 1


def test_bodyless_answers(kind: tuple[str, str], raw: Any) -> None:
    def respond(req: Req) -> bytes:
        if req.method == "HEAD":
            return answer(200, headers=(("Content-Length", "99"),), length=False)
        return answer(204, reason="No Content", length=False)

    srv = raw(keepalive(respond))

    async def go(t: Transport) -> None:
        for method in ("HEAD", "POST", "HEAD"):
            resp, body = await fetch(t, post(srv.url, method=method))
            assert body == b"" and resp.content_length == 0
            assert resp.status == (200 if method == "HEAD" else 204)

    run(kind, go, ports=(srv.port,))
    assert srv.accepted == 1


@pytest.mark.parametrize(
    "raw_answer",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    ],
    ids=["status", "garbage", "conflicting-length", "bad-chunk", "negative-length"],
)
def test_malformed_answers_are_retryable_protocol_errors(kind: tuple[str, str], raw: Any, raw_answer: bytes) -> None:
    srv = raw(keepalive(lambda req: raw_answer))

    async def go(t: Transport) -> None:
        with pytest.raises(ProtocolError) as ei:
            resp, _ = await fetch(t, post(srv.url))
            _ = resp.content_length
        assert ei.value.retryable

    run(kind, go, ports=(srv.port,))


# --------------------------------------------------------------------------- failures before the head


def test_server_closes_or_resets_before_answering(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        req = await c.read_request()
        if req is not None and req.target == "/reset":
            c.reset()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        for path in ("close", "reset"):
            with pytest.raises(TransportError) as ei:
                await fetch(t, post(srv.url + path))
            assert ei.value.kind == "connection" and ei.value.retryable

    run(kind, go, ports=(srv.port,))


def test_connection_refused(kind: tuple[str, str]) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    async def go(t: Transport) -> None:
        with pytest.raises(TransportError) as ei:
            await t.send(post(f"http://127.0.0.1:{port}/"))
        assert ei.value.kind == "connection" and ei.value.retryable
        assert t.connections()["open"] == 0

    run(kind, go)


# --------------------------------------------------------------------------- timeouts


def test_read_timeout_waiting_for_the_head(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        await c.read_request()
        await c.until_closed()  # never answers

    srv = raw(handler)

    async def go(t: Transport) -> None:
        t0 = time.monotonic()
        with pytest.raises(TransportError) as ei:
            await t.send(post(srv.url))
        assert ei.value.kind == "timeout" and ei.value.retryable
        assert time.monotonic() - t0 < 30
        assert t.connections()["open"] == 0
        await asyncio.to_thread(srv.saw_close.wait, 20)  # the connection was closed
        assert srv.saw_close.is_set()

    run(kind, go, ports=(srv.port,), timeouts=Timeouts(read=0.3))


def test_read_timeout_mid_body(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        if await c.read_request() is not None:
            c.write(answer(200, length=False, headers=(("Content-Length", "10000"),)) + b"x" * 100)
            await c.drain()
            await c.until_closed()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        for how in ("read_into", "read_chunk"):
            async with await t.send(post(srv.url)) as resp:
                with pytest.raises(TransportError) as ei:
                    if how == "read_into":
                        await resp.read_into(memoryview(bytearray(10000)))
                    else:
                        while await resp.read_chunk():
                            pass
                assert ei.value.kind == "timeout"

    run(kind, go, ports=(srv.port,), timeouts=Timeouts(read=0.3))


def test_read_timeout_is_per_gap_not_per_body(kind: tuple[str, str], raw: Any) -> None:
    """A body that drips for longer than the read timeout, never pausing that long,
    arrives whole: the read timer is re-armed by every received byte."""
    pieces, gap, read = 16, 0.1, 1.0  # 1.6 s of body, gaps 10x under the timeout

    async def handler(c: RawConn) -> None:
        while (req := await c.read_request()) is not None:
            if req.target == "/chunked":
                c.write(answer(200, headers=(("Transfer-Encoding", "chunked"),), length=False))
            else:
                c.write(answer(200, length=False, headers=(("Content-Length", str(pieces * 1000)),)))
            for i in range(pieces):
                await asyncio.sleep(gap)
                data = b"%03d" % i + b"." * 997
                c.write(chunked(data)[: -5] if req.target == "/chunked" else data)
                await c.drain()
            if req.target == "/chunked":
                c.write(b"0\r\n\r\n")

    srv = raw(handler)

    async def go(t: Transport) -> None:
        want = b"".join(b"%03d" % i + b"." * 997 for i in range(pieces))
        async with await t.send(post(srv.url)) as resp:
            buf = bytearray(len(want))
            assert await resp.read_into(memoryview(buf)) == len(want)
            assert buf == want
        _, body = await fetch(t, post(srv.url))
        assert body == want
        _, body = await fetch(t, post(srv.url + "chunked"))
        assert body == want

    run(kind, go, ports=(srv.port,), timeouts=Timeouts(read=read))


def test_deadline_bounds_the_whole_exchange(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        if await c.read_request() is not None:
            c.write(answer(200, length=False, headers=(("Content-Length", "100000000"),)))
            with contextlib.suppress(ConnectionError):
                while True:  # drips forever, never stalls long enough for the read timeout
                    c.write(b"x")
                    await c.writer.drain()
                    await asyncio.sleep(0.02)

    srv = raw(handler)

    async def go(t: Transport) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TransportError) as ei:
            async with await t.send(post(srv.url), deadline=loop.time() + 0.5) as resp:
                while await resp.read_chunk():
                    pass
        assert ei.value.kind == "timeout"
        assert loop.time() - t0 < 30
        with pytest.raises(TransportError) as ei:  # already past
            await t.send(post(srv.url), deadline=loop.time() - 1)
        assert ei.value.kind == "timeout"

    run(kind, go, ports=(srv.port,), timeouts=Timeouts(read=30))


# --------------------------------------------------------------------------- request bodies


def test_large_request_body_and_early_answers(kind: tuple[str, str], raw: Any) -> None:
    big = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)

    async def handler(c: RawConn) -> None:
        while (req := await c.read_head()) is not None:
            if req.target == "/echo":  # reads it all
                n = int(req.header("Content-Length") or 0)
                data = await c.reader.readexactly(n)
                c.write(answer(200, str(len(data)).encode() + b":" + bytes(data[-3:])))
                await c.drain()
            elif req.target == "/413":  # answers at once, does not read, closes
                c.write(answer(413, b'{"error": "too big"}', (("Connection", "close"),), reason="Too Large"))
                await c.drain()
                await asyncio.sleep(0.2)
                return
            else:  # 429: answers, keeps the connection open, never reads the body
                c.write(answer(429, b"slow down", (("Retry-After", "1"),), reason="Too Many"))
                await c.drain()
                await asyncio.sleep(TEST_TIMEOUT)
                return

    srv = raw(handler)

    async def go(t: Transport) -> None:
        resp, body = await fetch(t, post(srv.url + "echo", memoryview(big)))
        assert body == b"%d:" % len(big) + big[-3:].tobytes()
        for path, status in (("413", 413), ("429", 429)):
            t0 = time.monotonic()
            try:
                resp, body = await fetch(t, post(srv.url + path, memoryview(big)))
            except TransportError as e:  # the kernel may drop the answer with a RST
                assert e.kind == "connection"
                continue
            assert resp.status == status
            assert body in (b'{"error": "too big"}', b"slow down")
            assert time.monotonic() - t0 < TEST_TIMEOUT / 2  # not stuck writing the body
        resp, body = await fetch(t, post(srv.url + "echo", memoryview(big)))
        assert body == b"%d:" % len(big) + big[-3:].tobytes()

    run(kind, go, ports=(srv.port,))
    assert srv.accepted >= 3  # no connection reused after an early answer


# --------------------------------------------------------------------------- pool limits and cancellation


def _holding_server(raw: Any) -> RawServer:
    """Answers each request only once ``srv.release`` is set."""

    async def handler(c: RawConn) -> None:
        while await c.read_request() is not None:
            await c.server.wait_release()
            c.write(answer(200, b"done"))
            await c.drain()

    return raw(handler)


def test_limit_and_limit_per_host(kind: tuple[str, str], raw: Any) -> None:
    a, b = _holding_server(raw), _holding_server(raw)

    async def go(t: Transport) -> None:
        tasks = [asyncio.create_task(fetch(t, post(s.url))) for s in (a, b) for _ in range(4)]
        await until(lambda: len(a.requests) + len(b.requests) == 3)
        await asyncio.sleep(0.2)
        assert len(a.requests) + len(b.requests) == 3  # limit=3 in total
        assert len(a.requests) <= 2 and len(b.requests) <= 2  # limit_per_host=2
        a.release.set()
        b.release.set()
        for task in tasks:
            _, body = await task
            assert body == b"done"

    run(kind, go, ports=(a.port, b.port), limit=3, limit_per_host=2)
    assert a.max_open <= 2 and b.max_open <= 2 and a.max_open + b.max_open <= 4


def test_slot_waiters_are_cancel_safe(kind: tuple[str, str], raw: Any) -> None:
    srv = _holding_server(raw)

    async def go(t: Transport) -> None:
        first = asyncio.create_task(fetch(t, post(srv.url)))
        await until(lambda: len(srv.requests) == 1)
        waiting = [asyncio.create_task(fetch(t, post(srv.url))) for _ in range(3)]
        await asyncio.sleep(0.1)
        waiting[0].cancel()
        waiting[2].cancel()
        with pytest.raises(TransportError) as ei:  # a deadline while waiting for a slot
            loop = asyncio.get_running_loop()
            await t.send(post(srv.url), deadline=loop.time() + 0.2)
        assert ei.value.kind == "timeout"
        srv.release.set()
        assert (await first)[1] == b"done"
        assert (await waiting[1])[1] == b"done"
        for w in (waiting[0], waiting[2]):
            with pytest.raises(asyncio.CancelledError):
                await w
        for _ in range(3):  # no slot leaked
            assert (await fetch(t, post(srv.url)))[1] == b"done"
        assert t.connections()["open"] == 1

    run(kind, go, ports=(srv.port,), limit=1)


def test_a_slot_handed_over_to_a_cancelled_waiter_is_given_back(kind: tuple[str, str], raw: Any) -> None:
    """limit=1: the connection is handed to the waiting caller at the very moment that
    caller is cancelled (same loop step); it must come back to the pool, not leak."""
    srv = raw(keepalive(lambda req: answer(200, b"ok")))

    async def go(t: Transport) -> None:
        resp = await t.send(post(srv.url))
        waiter = asyncio.create_task(t.send(post(srv.url)))
        await asyncio.sleep(0.2)  # the waiter queues; the first body arrives meanwhile
        assert await resp.read(100) == b"ok"  # done: the connection goes to the waiter
        resp.close()
        waiter.cancel()  # before the waiter ran again
        with contextlib.suppress(asyncio.CancelledError):
            (await waiter).close()
        for _ in range(3):
            assert (await fetch(t, post(srv.url)))[1] == b"ok"
        assert t.connections()["open"] == 1

    run(kind, go, ports=(srv.port,), limit=1, timeouts=Timeouts(read=10))


def test_cancellation_closes_the_connection(kind: tuple[str, str], raw: Any) -> None:
    async def handler(c: RawConn) -> None:
        req = await c.read_request()
        if req is None:
            return
        if req.target == "/body":
            c.write(answer(200, length=False, headers=(("Content-Length", "1000000"),)) + b"x" * 1000)
            await c.drain()
        await c.until_closed()

    srv = raw(handler)

    async def go(t: Transport) -> None:
        task = asyncio.create_task(t.send(post(srv.url + "head")))
        await until(lambda: len(srv.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert t.connections()["open"] == 0
        await asyncio.to_thread(srv.saw_close.wait, 20)
        assert srv.saw_close.is_set()
        srv.saw_close.clear()

        resp = await t.send(post(srv.url + "body"))
        task = asyncio.create_task(resp.read_into(memoryview(bytearray(1_000_000))))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        resp.close()
        assert t.connections()["open"] == 0
        await asyncio.to_thread(srv.saw_close.wait, 20)
        assert srv.saw_close.is_set()

    run(kind, go, ports=(srv.port,))


def test_aclose_ends_everything(kind: tuple[str, str], raw: Any) -> None:
    srv = _holding_server(raw)
    fds_before = psutil.Process().num_fds()

    async def go(t: Transport) -> None:
        busy = asyncio.create_task(fetch(t, post(srv.url)))
        await until(lambda: len(srv.requests) == 1)
        waiter = asyncio.create_task(fetch(t, post(srv.url)))
        await asyncio.sleep(0.1)
        await t.aclose()
        for task in (busy, waiter):
            with pytest.raises((TransportError, ProtocolError)):
                await task
        with pytest.raises(TransportError) as ei:
            await t.send(post(srv.url))
        assert not ei.value.retryable
        await t.aclose()  # idempotent
        assert t.connections()["open"] == 0

    run(kind, go, ports=(srv.port,), limit=1)
    srv.release.set()
    assert psutil.Process().num_fds() <= fds_before + 2  # (the server's own sockets settle)


# --------------------------------------------------------------------------- native only: zero copy


def test_native_reads_sized_bodies_straight_into_the_callers_buffer(native: tuple[str, str], raw: Any) -> None:
    size = 8 << 20
    payload = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8).tobytes()
    srv = raw(keepalive(lambda req: answer(200, payload)))

    async def go(t: Transport) -> None:
        before = t.connections()
        async with await t.send(post(srv.url)) as resp:
            buf = np.empty(size, np.uint8)
            assert await resp.read_into(memoryview(buf)) == size
            assert buf.tobytes() == payload
        after = t.connections()
        direct = after["body_direct_bytes"] - before["body_direct_bytes"]
        copied = after["body_copied_bytes"] - before["body_copied_bytes"]
        assert direct + copied == size
        assert copied <= SCRATCH_MAX  # only what came before the read started
        assert t.connections()["idle"] == 1

    run(native, go, ports=(srv.port,))


# --------------------------------------------------------------------------- TLS


@dataclass
class TLS:
    ca: Any
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        self.client_ctx = ssl.create_default_context()
        self.ca.configure_trust(self.client_ctx)


@pytest.fixture(scope="module")
def tls() -> TLS:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    return TLS(ca, server_ctx)


def test_tls_verification(kind: tuple[str, str], raw: Any, tls: TLS) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    srv = raw(keepalive(lambda req: answer(200, payload)), ssl_ctx=tls.server_ctx)
    assert srv.url.startswith("https://")

    async def verified(t: Transport) -> None:
        with pytest.raises(TransportError) as ei:
            await t.send(post(srv.url))
        assert ei.value.kind == "tls" and not ei.value.retryable

    async def trusted(t: Transport) -> None:
        for _ in range(3):
            async with await t.send(post(srv.url)) as resp:
                buf = bytearray(len(payload))
                assert await resp.read_into(memoryview(buf)) == len(payload)
                assert buf == payload
        assert t.connections()["open"] == 1
        if kind[0] == "native":  # decrypted straight into the caller's buffer too
            assert t.connections()["body_direct_bytes"] > 0

    run(kind, verified, ports=(srv.port,))  # ssl=True: the default, verified
    run(kind, trusted, ports=(srv.port,), ssl=tls.client_ctx)
    run(kind, trusted, ports=(srv.port,), ssl=False)


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("kw", [{"ssl": "yes"}, {"limit": 0}, {"limit_per_host": -1}])
def test_bad_arguments_are_input_errors(impl: str, kw: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        IMPLS[impl](**kw)


def test_native_is_bound_to_its_first_loop(raw: Any) -> None:
    srv = raw(keepalive(lambda req: answer(200, b"ok")))
    t = NativeTransport()
    assert asyncio.run(fetch(t, post(srv.url)))[1] == b"ok"
    with pytest.raises(RuntimeError, match="bound to the event loop"):
        asyncio.run(t.send(post(srv.url)))


@pytest.mark.parametrize("cls", [NativeTransport, AiohttpTransport], ids=["native", "aiohttp"])
@pytest.mark.parametrize(
    ("kw", "says"),
    [({"limit": 0}, "limit must be >= 1"), ({"limit_per_host": -1}, "limit_per_host must be >= 0"),
     ({"ssl": "yes"}, "ssl must be True, False or an ssl.SSLContext")],
)
def test_bad_pool_arguments_are_refused_by_every_transport(cls: type, kw: dict[str, Any], says: str) -> None:
    with pytest.raises(InputError, match=says):
        cls(**kw)


@pytest.mark.parametrize("cls", [NativeTransport, AiohttpTransport], ids=["native", "aiohttp"])
def test_ssl_true_verifies_certificates_and_hostnames(cls: type) -> None:
    from asyncvae.transport._base import default_tls_context

    cls()  # nothing is loaded before the first https connection
    ctx = default_tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
