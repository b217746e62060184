"""Engine v2 defects, each reproduced through the public API against the reference
server (or the raw-bytes server, or the in-memory transport) — hangs, leaks, silent
corruption, credential leaks and wrong failures — plus the README's promises."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import tracemalloc
from typing import Any

import pytest
import torch
from aiohttp import web
from PIL import Image

import asyncvae
from asyncvae import (
    Client,
    ClientClosedError,
    EndpointError,
    InputError,
    ItemError,
    Limits,
    ProtocolError,
    Retry,
    RetryExhausted,
    Timeout,
)
from asyncvae.server import Faults
from asyncvae.transport.memory import MemoryAnswer, MemoryTransport

PT = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}
FAST = Retry(attempts=50, backoff_base=0.005, backoff_max=0.02, unavailable_patience=0)


def lat(value: float = 0.0, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.float16)


async def collect(it: Any) -> list[Any]:
    return [x async for x in it]


async def within(seconds: float, aw: Any) -> Any:
    return await asyncio.wait_for(aw, seconds)


# --------------------------------------------------------------------------- hangs


async def test_aclose_ends_callers_waiting_for_a_slot(make_server):
    srv = make_server(delay_ms=2000)
    c = Client(srv.url, limits=Limits(max_concurrency=1))
    calls = [asyncio.ensure_future(c.decode(lat(), **PT)) for _ in range(4)]
    await asyncio.sleep(0.3)  # one in flight, three waiting for the slot
    await within(5, c.aclose())
    done = await within(5, asyncio.gather(*calls, return_exceptions=True))
    assert all(isinstance(r, ClientClosedError) for r in done), done


async def test_aclose_during_a_coalescing_wait_fails_every_pending_call(make_server):
    srv = make_server()
    c = Client(srv.url, limits=Limits(max_batch=8, max_batch_wait=30.0))
    calls = [asyncio.ensure_future(c.decode(lat(i), **PT)) for i in range(3)]
    await asyncio.sleep(0.2)  # a partial batch, waiting 30 s for more
    await within(5, c.aclose())
    done = await within(5, asyncio.gather(*calls, return_exceptions=True))
    assert all(isinstance(r, ClientClosedError) for r in done), done
    assert srv.stats()["requests"] == {}  # none of them was sent


async def test_aclose_ends_a_many_iterator_the_consumer_waits_on(make_server):
    srv = make_server(delay_ms=2000)
    c = Client(srv.url, limits=Limits(max_concurrency=2))
    it = c.decode_many([lat(i) for i in range(10)], **PT)
    consumer = asyncio.ensure_future(collect(it))
    await asyncio.sleep(0.3)
    await within(5, c.aclose())
    with pytest.raises(ClientClosedError):
        await within(5, consumer)


async def test_an_iterator_made_before_close_raises_once_iterated(server):
    c = Client(server.url)
    it = c.decode_many([lat()], **PT)
    await c.aclose()
    with pytest.raises(ClientClosedError):
        await collect(it)
    with pytest.raises(ClientClosedError):
        await c.decode(lat(), **PT)


async def test_a_raising_stats_listener_stops_nothing(server):
    async with Client(server.url, limits=Limits(max_concurrency=4)) as c:
        def broken(event: str, stats: Any) -> None:
            raise RuntimeError("progress bar crashed")

        c.stats.add_listener(broken)
        got = await within(60, collect(c.decode_many([lat(i) for i in range(40)], **PT)))
        assert all(isinstance(g, torch.Tensor) for g in got)
        assert (await within(10, c.decode(lat(), **PT))).shape == (1, 64, 64, 3)
        assert c.stats.listener_errors >= 41


async def test_nested_calls_inside_a_many_loop_do_not_deadlock(server):
    """``async for z in c.encode_many(x): await c.decode(z)`` with finished-but-unread
    encode results filling max_inflight_bytes."""
    images = [torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(40)]
    async with Client(server.url, limits=Limits(max_inflight_bytes=64 * 1024)) as c:
        out = []

        async def loop() -> None:
            async for z in c.encode_many(images):
                out.append(await c.decode(z, **PT))

        await within(60, loop())
    assert len(out) == 40 and all(o.shape == (1, 64, 64, 3) for o in out)


def test_shutdown_ends_sync_callers_in_other_threads(make_server):
    srv = make_server(delay_ms=3000)
    asyncvae.configure(limits=Limits(max_concurrency=1))
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(asyncvae.remote_decode(srv.url, lat(), **PT))
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        asyncvae.shutdown()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a sync caller hangs after shutdown()"
        assert len(results) == 4 and all(isinstance(r, ClientClosedError) for r in results), results
    finally:
        asyncvae.configure()
        asyncvae.shutdown()


def test_configure_applies_to_every_call_that_starts_after_it(make_server):
    srv = make_server(delay_ms=300)
    started = threading.Event()
    errors: list[BaseException] = []

    def busy() -> None:  # a call in flight while configure() runs in another thread
        started.set()
        try:
            asyncvae.remote_decode(srv.url, lat(), **PT)
        except BaseException as e:
            errors.append(e)

    asyncvae.configure()
    t = threading.Thread(target=busy)
    t.start()
    started.wait()
    time.sleep(0.1)
    try:
        asyncvae.configure(limits=Limits(max_response_bytes=1000))
        with pytest.raises(ProtocolError, match="max_response_bytes=1000"):
            asyncvae.remote_decode(srv.url, lat(), **PT)  # the new options, at once
        t.join(10)
        assert errors == []  # the call already running finished with its own options
    finally:
        asyncvae.configure()
        asyncvae.shutdown()


# --------------------------------------------------------------------------- leaks


async def test_a_raising_progress_callback_does_not_leak_the_byte_budget(server):
    answer = 64 * 64 * 3
    async with Client(server.url, limits=Limits(max_inflight_bytes=answer)) as c:
        def boom(got: int, total: int | None) -> None:
            raise RuntimeError("callback failed")

        for _ in range(3):
            with pytest.raises(RuntimeError, match="callback failed"):
                await within(10, c.decode(lat(), on_progress=boom, **PT))
        assert c.stats.inflight_bytes == 0
        assert (await within(10, c.decode(lat(), **PT))).shape == (1, 64, 64, 3)


async def test_ordered_many_forgets_what_it_handed_over():
    answer = MemoryAnswer.tensor(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    c = Client("http://vae.test/", transport=MemoryTransport(lambda r: answer, record=False))

    async def drain(n: int) -> int:
        tracemalloc.start()
        try:
            it = c.decode_many((lat() for _ in range(n)), copy_inputs=False, **PT)
            i = 0
            async for _ in it:
                i += 1
                if i == 1000:
                    gc.collect()
                    base = tracemalloc.get_traced_memory()[0]
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()

    async with c:
        grown = await drain(30_000)
    # 29,000 items after the baseline: one int each would be > 800 KB
    assert grown < 200_000, grown


async def test_a_result_the_consumer_dropped_is_freed_while_the_input_waits(server):
    """Idle runners must not keep their last result: with a video answer each, 64
    runners did (3.7 GB of answers the consumer had long dropped)."""
    import weakref

    more = asyncio.Event()

    async def items() -> Any:
        for _ in range(8):
            yield lat()
        await more.wait()  # every runner is idle now, waiting for input
        yield lat()

    refs = []
    async with Client(server.url, limits=Limits(max_concurrency=4)) as c:
        it = c.decode_many(items(), **PT)
        for _ in range(8):
            r = await within(30, it.__anext__())
            refs.append(weakref.ref(r))
            del r
        await asyncio.sleep(0.05)  # let every runner reach its wait
        alive = [i for i, w in enumerate(refs) if w() is not None]
        more.set()
        assert (await within(30, it.__anext__())).shape == (1, 64, 64, 3)
        await it.aclose()
    assert alive == [], f"results {alive} are still held after the consumer dropped them"


async def test_parked_results_and_answers_in_flight_share_max_inflight_bytes(server):
    """A stalled consumer: the finished results it has not taken and the answers
    still arriving stay within one ``max_inflight_bytes`` together (not one each)."""
    answer = 64 * 64 * 3
    async with Client(server.url, limits=Limits(max_inflight_bytes=4 * answer)) as c:
        it = c.decode_many((lat() for _ in range(100)), **PT)
        await within(30, it.__anext__())
        await asyncio.sleep(0.5)  # the consumer stalls; the engine may only fill the budget
        sent = c.stats.requests
        await it.aclose()
    assert sent <= 1 + 4 + 1, sent


async def test_one_answer_over_the_byte_window_does_not_serialise_the_rest(make_server):
    """An answer larger than ``max_inflight_bytes`` runs alone; the small items after
    it run side by side again (a running maximum of answer sizes once kept them to one
    at a time for the rest of the stream)."""
    srv = make_server(delay_ms=20, replicas=8)
    big, small = lat(shape=(1, 4, 32, 32)), lat()  # answers of 192 KiB and 12 KiB
    limits = Limits(max_inflight_bytes=100_000)
    async with Client(srv.url, limits=limits) as c:
        got = await within(60, collect(c.decode_many([big] + [small] * 24, **PT)))
        assert [g.shape[1] for g in got] == [256] + [64] * 24
        assert c.stats.peak_in_flight >= 4, c.stats.peak_in_flight


@pytest.mark.parametrize("source", ["generator", "async generator"])
async def test_read_ahead_is_bounded_by_bytes_as_well_as_items(server, source):
    """Inputs are copied when read, so reading ``max_queued`` (256) big items ahead
    would hold 256 copies: read-ahead also stops at ``max_inflight_bytes / 16``."""
    pulled = 0

    def sync_items() -> Any:
        nonlocal pulled
        for _ in range(300):
            pulled += 1
            yield lat(shape=(1, 4, 32, 32))  # an 8 KiB body each

    async def async_items() -> Any:
        for x in sync_items():
            yield x

    items = sync_items if source == "generator" else async_items

    limit = 64 * 8192  # read-ahead: 32 KiB, 4 bodies
    async with Client(server.url, limits=Limits(max_inflight_bytes=limit, max_concurrency=1)) as c:
        it = c.decode_many(items(), **PT)
        await within(30, it.__anext__())
        await asyncio.sleep(0.3)  # the consumer stalls
        await it.aclose()
    # taken: 1 handed + 3 (answers of 192 KiB in flight or parked, within 512 KiB);
    # read ahead: 4 bodies; the producer may hold one more
    assert pulled <= 1 + 3 + 4 + 1, pulled


# --------------------------------------------------------------------------- corruption


async def test_a_generator_that_reuses_its_buffer_sends_what_it_yielded(make_server):
    srv = make_server()

    def refill() -> Any:
        buf = lat()
        for i in range(20):
            buf.fill_(i / 4)
            yield buf

    async with Client(srv.url) as c:
        want = [await c.decode(lat(i / 4), **PT) for i in range(20)]
        got = await within(60, collect(c.decode_many(refill(), **PT)))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


async def test_a_retry_resends_the_snapshot_not_the_reused_buffer(make_server):
    clean, faulty = make_server(), make_server(seed=3, faults=Faults(fault_503=0.5))

    async def refill() -> Any:
        buf = lat()
        for i in range(20):
            buf.fill_(i / 4)
            yield buf
            await asyncio.sleep(0)

    async with Client(clean.url) as c:
        want = [await c.decode(lat(i / 4), **PT) for i in range(20)]
    async with Client(faulty.url, retry=FAST) as c:
        got = await within(60, collect(c.decode_many(refill(), **PT)))
        assert sum(c.stats.retries.values()) > 0
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


async def test_copy_inputs_false_sends_views(make_server):
    """The documented opt-out: no copy, so a reused buffer is the caller's promise to keep."""
    srv = make_server()
    t = lat(1.0)
    async with Client(srv.url) as c:
        got = await collect(c.decode_many([t, t], copy_inputs=False, **PT))
    assert torch.equal(got[0], got[1])


# --------------------------------------------------------------------------- credentials


class Recorder:
    """A plain aiohttp app that records each request's headers and method, and
    redirects (``status`` to ``target``) or answers 400."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.target: str | None = None
        self.status = 307
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, dict(request.headers)))
        await request.read()
        if self.target is not None:
            return web.Response(status=self.status, headers={"Location": self.target})
        return web.json_response({"error": "nope"}, status=400)

    async def __aenter__(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


SECRETS = {"Authorization": "Basic c2VjcmV0", "Cookie": "session=s3cret", "X-Api-Key": "k3y"}


@pytest.mark.parametrize("transport", ["native", "aiohttp"])
async def test_credential_headers_never_follow_a_redirect_to_another_origin(transport):
    async with Recorder() as other, Recorder() as front:
        front.target = other.url + "v2"
        async with Client(front.url, headers=SECRETS, retry=Retry.none(), transport=transport) as c:
            with pytest.raises(EndpointError):
                await c.decode(lat(), **PT)
    assert all(front.seen[0][1].get(k) == v for k, v in SECRETS.items())
    assert not any(k in other.seen[0][1] for k in SECRETS), other.seen[0][1]


async def test_303_turns_into_a_get_and_a_bad_location_is_a_protocol_error():
    async with Recorder() as other, Recorder() as front:
        front.status, front.target = 303, other.url
        async with Client(front.url, retry=Retry.none()) as c:
            with pytest.raises(EndpointError):
                await c.decode(lat(), **PT)
        assert other.seen[0][0] == "GET"
        front.status, front.target = 302, "http://[::1"
        async with Client(front.url, retry=Retry.none()) as c:
            with pytest.raises(ProtocolError, match="malformed Location"):
                await c.decode(lat(), **PT)


# --------------------------------------------------------------------------- wrong failures


async def test_one_bad_input_fails_alone(server):
    cmyk = Image.new("CMYK", (16, 16), (10, 20, 30, 40))
    floaty = Image.new("F", (16, 16), 0.5)
    images = [Image.new("RGB", (16, 16), (200, 0, 0)), cmyk, floaty, Image.new("RGB", (16, 16))]
    async with Client(server.url) as c:
        got = await collect(c.encode_many(images))
        assert [type(g).__name__ for g in got] == ["Tensor", "Tensor", "ItemError", "Tensor"]
        assert isinstance(got[2].error, InputError) and "mode 'F'" in str(got[2].error)
        sparse = lat().to_sparse()
        got = await collect(c.decode_many([lat(), sparse, lat()], **PT))
        assert [type(g).__name__ for g in got] == ["Tensor", "ItemError", "Tensor"]
        assert "to_dense" in str(got[1].error)


async def test_an_input_iterable_that_raises_ends_after_every_earlier_item(server):
    def gen() -> Any:
        for i in range(5):
            yield lat(i)
        raise OSError("disk went away")

    async with Client(server.url) as c:
        for on_error in ("yield", "raise"):
            got: list[Any] = []
            with pytest.raises(OSError, match="disk went away"):
                async for r in c.decode_many(gen(), on_error=on_error, **PT):
                    got.append(r)
            assert [type(g).__name__ for g in got] == ["Tensor"] * 5  # none lost before it


async def test_total_timeout_spent_waiting_for_a_slot_sends_nothing(make_server):
    srv = make_server(delay_ms=600)
    async with Client(srv.url, limits=Limits(max_concurrency=1), timeout=Timeout(total=0.3),
                      retry=Retry.none()) as c:
        done = await within(10, asyncio.gather(*(c.decode(lat(), **PT) for _ in range(3)),
                                               return_exceptions=True))
        assert all(isinstance(r, RetryExhausted) and r.reason == "deadline passed" for r in done)
        assert srv.stats()["requests"]["decode"] == 1  # only the one that got the slot went out
        # the endpoint was not rested for our own deadline: the next call goes at once
    async with Client(srv.url) as c:
        t0 = time.monotonic()
        await c.decode(lat(), **PT)
        assert time.monotonic() - t0 < 5


async def test_waiting_for_budget_room_does_not_eat_the_attempt_timeout(make_server):
    srv = make_server(delay_ms=400, replicas=6)
    answer = 64 * 64 * 3
    lim = Limits(max_concurrency=6, max_inflight_bytes=answer)  # room for one answer at a time
    async with Client(srv.url, limits=lim, timeout=Timeout(attempt=1.0), retry=FAST) as c:
        got = await within(60, collect(c.decode_many([lat(i) for i in range(6)], **PT)))
    assert all(isinstance(g, torch.Tensor) for g in got), got
    assert srv.stats()["requests"]["decode"] == 6  # nothing computed twice


async def test_an_error_body_in_two_segments_is_read_whole(raw_server):
    body = json.dumps({"error": "x" * 3000, "detail": "the end"}).encode()
    raw = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
    raw_server.set(raw, split=len(raw) - len(body) + 100, pause=0.2)
    async with Client(raw_server.url, retry=Retry.none()) as c:
        with pytest.raises(EndpointError) as ei:
            await c.decode(lat(), **PT)
    assert ei.value.args[0]["detail"] == "the end"  # diffusers' args[0] contract: the whole JSON


async def test_plain_http_never_loads_the_tls_context(server):
    """Loading the CA store costs ~100 ms (once ate a short Timeout.total before any
    request went out): it waits for the first https connection."""
    from asyncvae.transport._base import default_tls_context

    default_tls_context.cache_clear()
    async with Client(server.url) as c:
        assert (await within(30, c.decode(lat(), **PT))).shape == (1, 64, 64, 3)
    assert default_tls_context.cache_info().currsize == 0


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_mp4_answer_costs_its_size_once(raw_server, framing):
    """The bytes handed back are the buffer the body was received into, not a copy of
    it (a bytearray turned into bytes at the end held every body twice)."""
    body = bytes(range(256)) * (16 << 12)  # 16 MiB
    head = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nConnection: close\r\n"
    if framing == "length":
        raw = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    else:
        step = 1 << 20
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (step, body[i : i + step]) for i in range(0, len(body), step)) + b"0\r\n\r\n"
    raw_server.set(raw)
    video = lat(shape=(1, 4, 2, 8, 8))
    async with Client(raw_server.url, retry=Retry.none()) as c:
        await c.decode(video, output_type="mp4", return_type="mp4")  # warm: imports, pools
        tracemalloc.start()
        try:
            got = await within(60, c.decode(video, output_type="mp4", return_type="mp4"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert got == body, "the body came back changed"
    assert peak < 1.25 * len(body) + (2 << 20), peak / len(body)


async def test_retry_after_zero_does_not_hammer(make_server):
    srv = make_server(faults=Faults(fault_429=1.0, retry_after=0))
    retry = Retry(attempts=10_000, backoff_base=0.5, backoff_max=10)
    async with Client(srv.url, retry=retry, timeout=Timeout(total=2.0)) as c:
        done = await within(20, asyncio.gather(*(c.decode(lat(), **PT) for _ in range(8)),
                                               return_exceptions=True))
    assert all(isinstance(r, RetryExhausted) for r in done), done
    # each wait is at least half the backoff cap (0.25, 0.5, 1 s, ...): at most 4 attempts
    # fit in 2 s — where waiting Retry-After (0) alone makes every caller loop flat out
    assert max(r.attempts for r in done) <= 4, [r.attempts for r in done]


async def test_retry_after_rests_the_endpoint_for_every_caller(make_server):
    srv = make_server(faults=Faults(fault_429=1.0, retry_after=1.5))
    async with Client(srv.url, retry=Retry(attempts=3)) as c:
        first = asyncio.ensure_future(c.decode(lat(), **PT))
        while not srv.stats()["responses"].get("429"):
            await asyncio.sleep(0.01)
        srv.set_faults(Faults())
        t0 = time.monotonic()
        second = await within(10, c.decode(lat(), **PT))  # arrives during the rest: waits it out
        waited = time.monotonic() - t0
        await within(10, first)
    assert second.shape == (1, 64, 64, 3)
    assert waited >= 1.0
    assert srv.stats()["responses"]["429"] == 1


async def test_large_request_work_runs_off_the_event_loop(server, monkeypatch):
    from asyncvae import protocol

    threads: list[str] = []
    real = protocol.pil_to_png

    def spy(image: Any, *a: Any, **kw: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real(image, *a, **kw)

    monkeypatch.setattr(protocol, "pil_to_png", spy)
    loop_thread = threading.current_thread().name
    pulled: list[str] = []

    def images() -> Any:
        for _ in range(3):
            pulled.append(threading.current_thread().name)
            yield Image.new("RGB", (512, 512), (1, 2, 3))

    async with Client(server.url) as c:
        await c.encode(Image.new("RGB", (512, 512)))
        await collect(c.encode_many(images()))
    assert threads and loop_thread not in threads  # PNG encoding in worker threads
    assert pulled and loop_thread not in pulled  # the sync generator read by a helper thread


# --------------------------------------------------------------------------- README promises


async def test_coalescing_fills_batches_from_concurrent_callers(make_server):
    srv = make_server(delay_ms=20, delay_per_item_ms=2)
    async with Client(srv.url, limits=Limits(max_batch=8)) as c:
        want = [await c.decode(lat(i / 8), **PT) for i in range(64)]
        c.stats.batches = c.stats.coalesced = 0
        requests0 = c.stats.requests
        got = await within(60, asyncio.gather(*(c.decode(lat(i / 8), **PT) for i in range(64))))
        sent = c.stats.requests - requests0
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert sent <= 64 / 6, (sent, c.stats.coalesced)  # batches of ~8, not of 1-2


async def test_coalescing_only_joins_the_same_shape_dtype_and_options():
    seen: list[tuple[str, ...]] = []

    def handler(req: Any) -> MemoryAnswer:
        q = req.url.query
        shape = [int(s) for s in q.getall("shape")]
        seen.append((q["dtype"], q.get("scaling_factor", "-"), *q.getall("shape")))
        return MemoryAnswer.tensor(torch.zeros(shape[0], shape[2] * 8, shape[3] * 8, 3, dtype=torch.uint8))

    c = Client("http://vae.test/", limits=Limits(max_batch=8), transport=MemoryTransport(handler))
    async with c:
        calls = [c.decode(lat(), scaling_factor=0.18, **PT) for _ in range(3)]
        calls += [c.decode(lat(), scaling_factor=0.13, **PT) for _ in range(2)]
        calls += [c.decode(lat().float(), scaling_factor=0.18, **PT) for _ in range(2)]
        calls += [c.decode(lat(shape=(1, 4, 16, 8)), scaling_factor=0.18, **PT)]
        got = await asyncio.gather(*calls)
    assert sorted(seen) == sorted([
        ("float16", "0.18", "3", "4", "8", "8"),
        ("float16", "0.13", "2", "4", "8", "8"),
        ("float32", "0.18", "2", "4", "8", "8"),
        ("float16", "0.18", "1", "4", "16", "8"),
    ])
    assert [g.shape[0] for g in got] == [1] * 8


async def test_per_host_connection_limit_and_keep_alive(make_server):
    from asyncvae.transport.native import NativeTransport

    srv = make_server(delay_ms=50, replicas=8)
    lim = Limits(max_concurrency=16, max_connections_per_host=2)
    async with Client(srv.url, limits=lim) as c:
        await collect(c.decode_many([lat() for _ in range(40)], **PT))
        assert srv.stats()["max_in_flight"] <= 2
    transport = NativeTransport(limit=4)
    async with Client(srv.url, limits=Limits(max_concurrency=4), transport=transport) as c:
        await collect(c.decode_many([lat() for _ in range(40)], **PT))
        # 40 requests over at most 4 kept-alive connections
        assert transport.connections()["opened"] <= 4


async def test_client_headers_and_scale_up_timeout_are_sent():
    async with Recorder() as rec:
        retry = Retry.none().replace(scale_up_timeout=90)
        async with Client(rec.url, headers={"X-Trace": "abc"}, retry=retry, token=False) as c:
            with pytest.raises(EndpointError):
                await c.decode(lat(), **PT)
    headers = rec.seen[0][1]
    assert headers["X-Trace"] == "abc" and headers["X-Scale-Up-Timeout"] == "90"
    assert "Authorization" not in headers


async def test_503_patience_outlasts_attempts(make_server):
    srv = make_server(faults=Faults(fault_503=1.0))
    retry = Retry(attempts=2, backoff_base=0.05, backoff_max=0.1, unavailable_patience=1.0)
    async with Client(srv.url, retry=retry) as c:
        t0 = time.monotonic()
        with pytest.raises(RetryExhausted, match="unavailable for 1 s"):
            await within(20, c.decode(lat(), **PT))
    assert time.monotonic() - t0 >= 1.0
    assert srv.stats()["responses"]["503"] > 2


async def test_max_retry_after_caps_the_wait(make_server):
    srv = make_server(faults=Faults(fault_429=1.0, retry_after=60))
    async with Client(srv.url, retry=Retry(attempts=2, max_retry_after=0.3)) as c:
        t0 = time.monotonic()
        with pytest.raises(RetryExhausted):
            await within(20, c.decode(lat(), **PT))
        [wait] = c.stats.retry_waits
    assert 0.3 <= wait <= 0.4 and time.monotonic() - t0 < 10


async def test_backoff_is_jittered(make_server):
    srv = make_server(faults=Faults(fault_502_html=1.0))
    async with Client(srv.url, retry=Retry(attempts=4, backoff_base=0.05)) as c:
        await asyncio.gather(*(c.decode(lat(), **PT) for _ in range(8)), return_exceptions=True)
        waits = c.stats.retry_waits
    assert len(waits) == 24 and len({round(w, 6) for w in waits}) > 20
    assert all(w <= 0.05 * 4 for w in waits)


async def test_total_deadline_bounds_a_call_with_retries(make_server):
    srv = make_server(faults=Faults(fault_502_html=1.0))
    async with Client(srv.url, retry=Retry(attempts=1000, backoff_base=0.05),
                      timeout=Timeout(total=0.5)) as c:
        t0 = time.monotonic()
        with pytest.raises(RetryExhausted) as ei:
            await c.decode(lat(), **PT)
    assert ei.value.reason == "deadline passed" and ei.value.status == 502
    assert time.monotonic() - t0 < 3


async def test_items_never_lost_or_reordered_when_some_fail(make_server):
    srv = make_server()
    items: list[Any] = [lat(i / 10) for i in range(30)]
    items[7] = "not a tensor"
    items[19] = lat().to(torch.int32)
    async with Client(srv.url, limits=Limits(max_concurrency=5)) as c:
        got = await collect(c.decode_many(items, **PT))
        pairs = await collect(c.decode_many(items, ordered=False, **PT))
    assert [i for i, g in enumerate(got) if isinstance(g, ItemError)] == [7, 19]
    assert sorted(i for i, _ in pairs) == list(range(30))
