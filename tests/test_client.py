"""The engine (asyncvae.Client) against the real reference server over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import psutil
import pytest
import torch

import asyncvae
from asyncvae import Client, Limits, Retry, Timeout
from asyncvae.server import Faults

PT_U8 = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}
FAST_RETRY = Retry(attempts=20, backoff_base=0.005, backoff_max=0.05, unavailable_patience=0)


def latents(n: int, shape: tuple[int, ...] = (1, 4, 8, 8), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(torch.float16) for _ in range(n)]


async def collect(it) -> list:
    return [x async for x in it]


def open_connections() -> int:
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED)


async def test_decode_and_encode_roundtrip(server):
    async with Client(server.url) as c:
        img = await c.decode(latents(1)[0], **PT_U8)
        assert img.shape == (1, 64, 64, 3) and img.dtype == torch.uint8
        pil = await c.decode(latents(1)[0])
        assert pil.size == (64, 64) and pil.format == "jpeg"
        lat = await c.encode(torch.zeros(1, 3, 64, 64))
        assert lat.shape == (1, 4, 8, 8)
        assert c.stats.completed == 3 and c.stats.requests == 3


async def test_decode_many_chaos_complete_ordered_and_correct(make_server):
    """2,000 decodes with every fault on come back complete, in order, each equal to the fault-free result."""
    items = latents(2000)
    clean = make_server()
    async with Client(clean.url) as c:
        expected = await collect(c.decode_many(items, **PT_U8))
    faulty = make_server(
        seed=7,
        faults=Faults(
            fault_503=0.03, fault_429=0.03, retry_after=0.0, fault_reset=0.02, fault_truncate=0.02,
            fault_stall=0.01, stall_seconds=2.5, fault_bad_headers=0.02, fault_502_html=0.02, chunked=True,
        ),
    )
    # 16 in flight against one replica keeps its queue wait well under the read timeout
    # even on a loaded 2-core machine, so timeouts come from the stall fault alone
    lim = Limits(max_concurrency=16)
    async with Client(faulty.url, retry=FAST_RETRY, timeout=Timeout(read=1.0), limits=lim) as c:
        got = await collect(c.decode_many(items, **PT_U8))
        stats = c.stats
    assert len(got) == len(items)
    assert all(isinstance(g, torch.Tensor) for g in got), [g for g in got if not isinstance(g, torch.Tensor)][:3]
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=False))
    causes = set(stats.retries)
    assert {"http_503", "http_429", "http_502", "protocol", "timeout"} <= causes, stats.retries
    injected = faulty.stats()["faults"]
    assert sum(stats.retries.values()) >= sum(injected.values()) - injected.get("fault_stall", 0)


async def test_retry_after_is_honoured(make_server):
    srv = make_server(faults=Faults(fault_429=1.0, retry_after=1.0))
    async with Client(srv.url, retry=Retry(attempts=2)) as c:
        t0 = time.monotonic()
        with pytest.raises(asyncvae.RetryExhausted) as ei:
            await c.decode(latents(1)[0], **PT_U8)
        elapsed = time.monotonic() - t0
    # the wait the policy chose: at least Retry-After, plus jitter of at most half the
    # first backoff cap (0.2 s / 2), not the backoff alone
    [wait] = c.stats.retry_waits
    assert 1.0 <= wait <= 1.1
    assert 0.95 <= elapsed < 5.0
    assert isinstance(ei.value.last, asyncvae.EndpointError) and ei.value.last.status == 429
    assert ei.value.status == 429 and ei.value.attempts == 2


async def test_retries_stop_at_budget_naming_last_cause(make_server):
    srv = make_server(faults=Faults(fault_502_html=1.0))
    async with Client(srv.url, retry=Retry(attempts=3, backoff_base=0.001)) as c:
        with pytest.raises(asyncvae.RetryExhausted) as ei:
            await c.decode(latents(1)[0], **PT_U8)
    e = ei.value
    assert e.attempts == 3 and e.status == 502
    assert isinstance(e, RuntimeError)
    assert "502" in str(e) and "Bad Gateway" in str(e)
    assert srv.stats()["responses"]["502"] == 3


async def test_4xx_is_not_retried(server):
    # packed latents whose height/width disagree with their length: the server answers 400 once
    async with Client(server.url, retry=Retry(attempts=5)) as c:
        with pytest.raises(asyncvae.EndpointError) as ei:
            await c.decode(torch.zeros(1, 16, 64, dtype=torch.float16), height=128, width=128, **PT_U8)
    assert ei.value.status == 400
    assert isinstance(ei.value.args[0], dict) and "error" in ei.value.args[0]
    assert c.stats.requests == 1 and not c.stats.retries


async def test_server_killed_and_restarted_costs_retries_not_items(serve_subprocess):
    sp = serve_subprocess("--delay-ms", "5", "--replicas", "2")
    items = latents(300, seed=3)
    retry = Retry(attempts=400, backoff_base=0.05, backoff_max=0.25)  # outlasts a restart on a busy machine
    async with Client(sp.url, retry=retry, limits=Limits(max_concurrency=8)) as c:
        expected = [await c.decode(x, **PT_U8) for x in items[:5]]
        results: list = []

        async def consume():
            async for r in c.decode_many(items, **PT_U8):
                results.append(r)

        task = asyncio.create_task(consume())
        while len(results) < 60:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(sp.restart)
        await asyncio.wait_for(task, 120)
    assert len(results) == 300
    assert all(isinstance(r, torch.Tensor) for r in results), [r for r in results if not isinstance(r, torch.Tensor)][:3]
    assert all(torch.equal(r, e) for r, e in zip(results[:5], expected, strict=False))
    assert sum(c.stats.retries.values()) > 0


async def test_two_endpoints_one_down_every_item_succeeds(server):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    s.close()  # nothing listens there: connection refused
    items = latents(200)
    lim = Limits(max_concurrency=8)
    async with Client([dead, server.url], retry=Retry(attempts=4, backoff_base=0.001), limits=lim) as c:
        got = await collect(c.decode_many(items, **PT_U8))
        assert all(isinstance(g, torch.Tensor) for g in got)
        # the dead replica was rested after a few failures, not tried for every item
        assert c.stats.retries["connection"] < 20


async def test_memory_bounded_when_consumer_never_reads(make_server):
    srv = make_server()
    lim = Limits(max_concurrency=4, max_queued=8, max_inflight_bytes=64 * 1024, max_reorder=16)
    pulled = 0

    def source():
        nonlocal pulled
        for x in latents(10_000, shape=(1, 4, 16, 16)):
            pulled += 1
            yield x

    async with Client(srv.url, limits=lim) as c:
        it = c.decode_many(source(), **PT_U8)  # 128x128x3 = 48 KiB per result
        first = await it.__anext__()
        assert first.shape == (1, 128, 128, 3)
        await asyncio.sleep(1.0)  # the consumer stops reading
        s = c.stats
        assert s.peak_queued <= lim.max_queued
        assert s.peak_inflight_bytes <= lim.max_inflight_bytes
        assert pulled <= lim.max_reorder + 2
        assert s.completed <= lim.max_reorder + 1
        await it.aclose()


async def test_cancellation_leaves_no_tasks_or_connections(make_server):
    srv = make_server(delay_ms=50, replicas=2)
    before = open_connections()
    tasks_before = asyncio.all_tasks()
    c = Client(srv.url, limits=Limits(max_concurrency=8))
    it = c.decode_many(latents(100), **PT_U8)
    await it.__anext__()
    await it.aclose()  # the consumer goes away: its requests stop
    single = asyncio.create_task(c.decode(latents(1)[0], **PT_U8))
    await asyncio.sleep(0.05)
    single.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await single
    assert c.stats.queued == 0
    await asyncio.sleep(0.2)
    assert c.stats.in_flight == 0
    await c.aclose()
    await asyncio.sleep(0.1)
    gc.collect()
    leftover = [t for t in asyncio.all_tasks() - tasks_before if not t.done()]
    assert leftover == []
    assert open_connections() <= before


async def test_unordered_yields_index_pairs(server):
    items = latents(50)
    async with Client(server.url) as c:
        expected = await collect(c.decode_many(items, **PT_U8))
        pairs = await collect(c.decode_many(items, ordered=False, **PT_U8))
    assert sorted(i for i, _ in pairs) == list(range(50))
    assert all(torch.equal(r, expected[i]) for i, r in pairs)


async def test_failed_item_keeps_its_place(server):
    items = latents(10)
    items[4] = torch.zeros(1, 4, 8, 8, dtype=torch.float64)  # rejected before sending
    async with Client(server.url) as c:
        got = await collect(c.decode_many(items, **PT_U8))
        assert isinstance(got[4], asyncvae.ItemError) and got[4].index == 4
        assert isinstance(got[4].error, asyncvae.InputError)
        assert all(isinstance(g, torch.Tensor) for i, g in enumerate(got) if i != 4)
        with pytest.raises(asyncvae.InputError):
            await collect(c.decode_many(items, on_error="raise", **PT_U8))


async def test_async_iterable_input_is_read_lazily(server):
    async def gen():
        for x in latents(20):
            yield x

    async with Client(server.url) as c:
        got = await collect(c.decode_many(gen(), **PT_U8))
    assert len(got) == 20


async def test_coalescing_sends_batches_with_equal_results(make_server):
    srv = make_server(delay_ms=20, replicas=1)
    items = latents(32)
    async with Client(srv.url) as c:
        plain = await collect(c.decode_many(items, **PT_U8))
    lim = Limits(max_batch=8, max_batch_wait=0.05, max_concurrency=4)
    async with Client(srv.url, limits=lim) as c:
        merged = await collect(c.decode_many(items, **PT_U8))
        assert c.stats.batches >= 4 and c.stats.requests < 32
    assert all(torch.equal(a, b) for a, b in zip(plain, merged, strict=False))


async def test_streaming_progress_and_size_limit(server):
    lat = torch.randn(1, 4, 64, 64, dtype=torch.float16)
    seen: list[tuple[int, int | None]] = []
    async with Client(server.url) as c:
        out = await c.decode(lat, output_type="pt", return_type="pt", on_progress=lambda n, t: seen.append((n, t)))
    assert out.shape == (1, 3, 512, 512)
    assert seen[-1] == (out.numel() * 2, out.numel() * 2)
    async with Client(server.url, limits=Limits(max_response_bytes=1000)) as c:
        with pytest.raises(asyncvae.ProtocolError, match="max_response_bytes"):
            await c.decode(lat, output_type="pt", return_type="pt")


def test_config_values_are_immutable_and_checked():
    r = Retry()
    with pytest.raises(AttributeError):
        r.attempts = 3  # type: ignore[misc]
    assert r.replace(attempts=3).attempts == 3 and r.attempts == 5
    with pytest.raises(asyncvae.InputError):
        Limits(max_concurrency=0)
    with pytest.raises(asyncvae.InputError):
        Retry(attempts=0)
    with pytest.raises(asyncvae.InputError):
        Timeout(read=-1)
    assert Retry(jitter="none").backoff(3) == pytest.approx(0.8)
    assert Retry(backoff_max=1.0, jitter="none").backoff(10) == 1.0


async def test_unknown_option_is_an_input_error(server):
    async with Client(server.url) as c:
        with pytest.raises(asyncvae.InputError, match="unknown decode option"):
            await c.decode(latents(1)[0], outputtype="pt")


async def test_ordered_iteration_never_deadlocks_on_a_small_byte_budget(make_server):
    """Finished results waiting behind a slow head hold the whole budget: the head item
    must still get room (it alone can release them), so every item arrives."""
    srv = make_server(replicas=4, seed=1, faults=Faults(fault_stall=0.1, stall_seconds=0.3))  # slow heads
    answer = 256 * 256 * 3  # [1,4,32,32] -> uint8 [1,256,256,3], 192 KiB
    lim = Limits(max_concurrency=16, max_inflight_bytes=4 * answer, max_reorder=64)
    items = latents(120, shape=(1, 4, 32, 32))
    async with Client(srv.url, limits=lim) as c:
        got = await asyncio.wait_for(collect(c.decode_many(items, **PT_U8)), 60)
        assert all(isinstance(g, torch.Tensor) for g in got)
        # bounded: the budget plus the one head item allowed to overdraw it
        assert c.stats.peak_inflight_bytes <= lim.max_inflight_bytes + answer


async def test_results_are_not_kept_alive_by_idle_workers(server):
    import weakref

    async with Client(server.url, limits=Limits(max_concurrency=8)) as c:
        refs = []
        async for r in c.decode_many(latents(20), **PT_U8):
            refs.append(weakref.ref(r))
            del r
        await asyncio.sleep(0.05)
        gc.collect()
        alive = sum(ref() is not None for ref in refs)
    assert alive == 0
