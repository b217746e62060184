"""Chaos soak: many mixed encode/decode items through every entry point, against two
replicas with every fault on, one of them killed and restarted twice mid-run.

Every answer is compared with the fault-free answer (a checksum per item, computed
against a clean server first); the run must lose, duplicate, corrupt and reorder
nothing, and leave no connection, task, thread or file descriptor behind.

- ``test_soak_short`` (default suite): ~1,500 items, well under a minute.
- ``test_soak_long`` (``pytest -m soak tests/soak -s``): 20,000 items
  (``ASYNCVAE_SOAK_ITEMS`` overrides). ``ASYNCVAE_SOAK_REPORT=path.json`` writes the report.

The figures of the last long run are in ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import torch
from PIL import Image

import asyncvae
from asyncvae import Client, ItemError, Limits, Retry, Timeout
from asyncvae.server import Faults, LocalServer

PT_U8 = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}
MiB = 1 << 20

#: Per-request fault probabilities of both replicas (same for the in-process one and the CLI one).
FAULTS = {
    "fault_503": 0.02,
    "fault_429": 0.02,
    "fault_reset": 0.01,
    "fault_truncate": 0.01,
    "fault_stall": 0.005,
    "fault_bad_headers": 0.015,
    "fault_502_html": 0.01,
}
RETRY_AFTER = 0.05
STALL_SECONDS = 2.0
#: Read timeout below the stall, far above the queue wait of a loaded 2-core machine.
TIMEOUT = Timeout(connect=2.0, read=1.0)
#: Enough patience to outlast a replica restart (~4-10 s on a loaded machine) even for
#: the sync batches that talk to the restarted replica alone.
RETRY = Retry(
    attempts=400, backoff_base=0.01, backoff_max=0.25, max_retry_after=1.0, unavailable_patience=0
)

#: Input kinds: (op, maker(generator) -> input). Several shapes and dtypes of each op.
KINDS: list[tuple[str, Callable[[torch.Generator], Any]]] = [
    ("decode", lambda g: torch.randn(1, 4, 8, 8, generator=g).to(torch.float16)),
    ("decode", lambda g: torch.randn(2, 4, 8, 8, generator=g).to(torch.float16)),
    ("decode", lambda g: torch.randn(1, 4, 16, 16, generator=g).to(torch.bfloat16)),
    ("decode", lambda g: torch.randn(1, 4, 8, 16, generator=g)),  # float32
    (
        "decode",
        lambda g: torch.randn(1, 8, 8, 4, generator=g).to(torch.float16).permute(0, 3, 1, 2),
    ),  # non-contiguous
    ("encode", lambda g: (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1).to(torch.float16)),
    ("encode", lambda g: torch.rand(2, 3, 16, 32, generator=g) * 2 - 1),  # float32
    (
        "encode",
        lambda g: Image.fromarray(
            (torch.rand(24, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        ),
    ),
]
POOL = 12  # distinct inputs per kind


def checksum(t: Any) -> str:
    assert isinstance(t, torch.Tensor), f"not a tensor: {t!r}"
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(f"{list(t.shape)}|{t.dtype}|".encode() + raw, digest_size=16).hexdigest()


class Item:
    __slots__ = ("expected", "index", "kind", "op", "value")

    def __init__(self, index: int, kind: int, op: str, value: Any, expected: str):
        self.index, self.kind, self.op, self.value, self.expected = index, kind, op, value, expected


def make_items(n: int, clean_url: str) -> list[Item]:
    """``n`` items cycling through KINDS x POOL, with the expected checksum of each input
    computed against a fault-free server."""
    g = torch.Generator().manual_seed(1234)
    pool = [[make(g) for _ in range(POOL)] for _, make in KINDS]

    async def expected() -> list[list[str]]:
        out: list[list[str]] = []
        async with Client(clean_url, retry=Retry.none()) as c:
            for (op, _), inputs in zip(KINDS, pool, strict=True):
                if op == "decode":
                    out.append([checksum(await c.decode(x, **PT_U8)) for x in inputs])
                else:
                    out.append([checksum(await c.encode(x)) for x in inputs])
        return out

    sums = asyncio.run(expected())
    items = []
    for j in range(n):
        k = j % len(KINDS)
        p = (j // len(KINDS)) % POOL
        items.append(Item(j, k, KINDS[k][0], pool[k][p], sums[k][p]))
    return items


class Tally:
    """Counts outcomes; thread-safe (sync batches report from their own threads)."""

    def __init__(self, all_expected: set[str]):
        self.lock = threading.Lock()
        self.all_expected = all_expected
        self.c: Counter[str] = Counter()
        self.errors: list[str] = []
        self.progress = 0

    def check(self, items: list[Item], results: list[Any]) -> None:
        with self.lock:
            self.c["items"] += len(items)
            if len(results) > len(items):
                self.c["duplicated"] += len(results) - len(items)
            if len(results) < len(items):
                self.c["lost"] += len(items) - len(results)
            for it, r in zip(items, results, strict=False):
                self._one(it, r)
            self.progress += len(results)

    def one(self, it: Item, r: Any) -> None:
        with self.lock:
            self.c["items"] += 1
            self._one(it, r)
            self.progress += 1

    def _one(self, it: Item, r: Any) -> None:
        if isinstance(r, ItemError):
            self.c["lost"] += 1
            if len(self.errors) < 10:
                self.errors.append(f"item {it.index}: {r!r}")
            return
        s = checksum(r)
        if s == it.expected:
            self.c["ok"] += 1
        elif s in self.all_expected:
            self.c["reordered"] += 1  # another item's correct answer
        else:
            self.c["corrupted"] += 1


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


#: Thread pools that grow lazily and keep idle threads: the reference servers' replica
#: pools and asyncio's default executors (``asyncio.to_thread``); not leaks.
LAZY_POOLS = ("asyncvae-replica", "asyncio_")


def client_threads() -> int:
    """Threads of this process, less the lazily grown pools (see ``LAZY_POOLS``)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith(LAZY_POOLS))


def rss() -> int:
    return psutil.Process().memory_info().rss


def connections_to(ports: set[int]) -> list[Any]:
    return [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port in ports]


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True, name="soak-rss")
        self.peak = rss()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.02):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return self.peak


def chunks(seq: list[Item], size: int) -> list[list[Item]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


async def run_soak(
    n: int, make_server: Callable[..., LocalServer], serve_subprocess: Callable[..., Any]
) -> dict[str, Any]:
    clean = make_server(replicas=2)
    items = await asyncio.to_thread(make_items, n, clean.url)
    tally = Tally({it.expected for it in items})

    a = make_server(
        replicas=2,
        seed=11,
        faults=Faults(**FAULTS, retry_after=RETRY_AFTER, stall_seconds=STALL_SECONDS, chunked=True),
    )
    cli = [
        "--replicas",
        "2",
        "--seed",
        "12",
        "--retry-after",
        str(RETRY_AFTER),
        "--fault-stall",
        f"{FAULTS['fault_stall']}:{STALL_SECONDS}",
    ]
    for k, p in FAULTS.items():
        if k != "fault_stall":
            cli += ["--" + k.replace("_", "-"), str(p)]
    b = serve_subprocess(*cli)
    ports = {clean.port, a.port, b.port}

    # the async part: ~60% of the items through one Client over both replicas,
    # decode_many and encode_many at once; the rest through the sync batch functions
    async_items = [it for it in items if it.index % 5 < 3]
    sync_items = [it for it in items if it.index % 5 >= 3]
    n_threads = 4
    per_thread = [sync_items[t::n_threads] for t in range(n_threads)]

    # warm up what is created once per process (the sync loop's uvloop/libuv globals,
    # the default executor's thread), then take the baseline with the sync loop stopped
    asyncvae.remote_decode(clean.url, items[0].value, **PT_U8) if items[0].op == "decode" else None
    asyncvae.configure()
    gc.collect()
    await asyncio.sleep(0.2)
    base_fds = fd_targets()
    base_threads = {t.ident: t.name for t in threading.enumerate()}
    base = {
        "fd": fd_count(),
        "rss": rss(),
        "threads": client_threads(),
        "conns": len(connections_to(ports)),
    }
    tasks_before = asyncio.all_tasks()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()

    restarts: list[float] = []
    stop_ctl = threading.Event()

    def controller() -> None:  # kill -9 and restart the subprocess replica twice mid-run
        for frac in (0.25, 0.55):
            while tally.progress < frac * n and not stop_ctl.is_set():
                time.sleep(0.02)
            if stop_ctl.is_set():
                return
            t = time.perf_counter()
            b.restart()
            restarts.append(round(time.perf_counter() - t, 2))

    ctl = threading.Thread(target=controller, name="soak-controller", daemon=True)
    ctl.start()

    asyncvae.configure(retry=RETRY, timeout=TIMEOUT, limits=Limits(max_concurrency=4))
    sync_stats: list[dict[str, int]] = []
    sync_errors: list[BaseException] = []

    def sync_worker(t: int) -> None:
        url = a.url if t % 2 == 0 else b.url
        try:
            for chunk in chunks(per_thread[t], 40):
                dec = [it for it in chunk if it.op == "decode"]
                enc = [it for it in chunk if it.op == "encode"]
                tally.check(
                    dec, asyncvae.remote_decode_batch(url, [it.value for it in dec], **PT_U8)
                )
                tally.check(enc, asyncvae.remote_encode_batch(url, [it.value for it in enc]))
        except BaseException as e:  # pragma: no cover - reported below
            sync_errors.append(e)

    threads = [
        threading.Thread(target=sync_worker, args=(t,), name=f"soak-sync-{t}")
        for t in range(n_threads)
    ]
    for th in threads:
        th.start()

    client = Client([a.url, b.url], retry=RETRY, timeout=TIMEOUT, limits=Limits(max_concurrency=8))
    try:

        async def consume(op: str) -> None:
            mine = [it for it in async_items if it.op == op]
            many = (
                client.decode_many(iter([it.value for it in mine]), **PT_U8)
                if op == "decode"
                else (client.encode_many(iter([it.value for it in mine])))
            )
            got = 0
            async for r in many:
                if got < len(mine):
                    tally.one(mine[got], r)
                else:
                    tally.c["duplicated"] += 1
                got += 1
            if got < len(mine):
                tally.c["lost"] += len(mine) - got

        await asyncio.gather(consume("decode"), consume("encode"))
        await asyncio.to_thread(lambda: [th.join() for th in threads])
        stop_ctl.set()
        await asyncio.to_thread(ctl.join)
        elapsed = time.perf_counter() - t0
        retries = Counter(client.stats.retries)
        runner = asyncvae.sync._runner
        for sc in list(runner.clients.values()) if runner else []:
            retries.update(sc.stats.retries)
            sync_stats.append(sc.stats.retries)
        requests = client.stats.requests + sum(
            sc.stats.requests for sc in (list(runner.clients.values()) if runner else [])
        )
    finally:
        await client.aclose()
        asyncvae.configure()  # restores the defaults
        await asyncio.to_thread(asyncvae.shutdown)  # closes the sync clients and their loop
    peak = sampler.stop()

    # what is left behind: poll briefly while the servers close their side
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gc.collect()
        if (
            fd_count() <= base["fd"]
            and not connections_to(ports)
            and client_threads() <= base["threads"]
        ):
            break
        await asyncio.sleep(0.1)
    leftover_tasks = [
        t
        for t in asyncio.all_tasks() - tasks_before
        if not t.done() and t is not asyncio.current_task()
    ]
    server_faults = a.stats()["faults"]
    c = tally.c
    report = {
        "items": c["items"],
        "ok": c["ok"],
        "lost": c["lost"],
        "duplicated": c["duplicated"],
        "corrupted": c["corrupted"],
        "reordered": c["reordered"],
        "requests": requests,
        "retries": dict(sorted(retries.items())),
        "retries_total": sum(retries.values()),
        "faults_injected_in_process_replica": dict(sorted(server_faults.items())),
        "restarts_s": restarts,
        "seconds": round(elapsed, 1),
        "items_per_s": round(c["items"] / elapsed, 1),
        "rss_baseline_mib": round(base["rss"] / MiB, 1),
        "rss_peak_mib": round(peak / MiB, 1),
        "rss_end_mib": round(rss() / MiB, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fd_baseline": base["fd"],
        "fd_end": fd_count(),
        "threads_baseline": base["threads"],
        "threads_end": client_threads(),
        "open_connections_end": len(connections_to(ports)),
        "fds_new": sorted(v for k, v in fd_targets().items() if base_fds.get(k) != v),
        "threads_new": sorted(t.name for t in threading.enumerate() if t.ident not in base_threads),
        "leaked_tasks": [repr(t) for t in leftover_tasks],
        "errors": tally.errors + [repr(e) for e in sync_errors],
    }
    print("\nSOAK REPORT " + json.dumps(report, indent=1))
    if os.environ.get("ASYNCVAE_SOAK_REPORT"):
        with open(os.environ["ASYNCVAE_SOAK_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    return report


def check(report: dict[str, Any], n: int, *, rss_slack_mib: float) -> None:
    assert report["items"] == n, report
    assert report["ok"] == n, report["errors"]
    for k in ("lost", "duplicated", "corrupted", "reordered"):
        assert report[k] == 0, (k, report)
    assert not report["errors"], report["errors"]
    assert len(report["restarts_s"]) == 2, report
    # every fault kind was met and retried (stalls show up as read timeouts)
    r = report["retries"]
    for cause in ("http_503", "http_429", "http_502", "protocol", "timeout", "connection"):
        assert r.get(cause, 0) > 0, (cause, r)
    assert report["open_connections_end"] == 0, report
    assert report["leaked_tasks"] == [], report
    assert report["fd_end"] <= report["fd_baseline"], report
    assert report["threads_end"] <= report["threads_baseline"], report
    assert report["rss_end_mib"] - report["rss_baseline_mib"] < rss_slack_mib, report


async def test_soak_short(make_server, serve_subprocess):
    n = int(os.environ.get("ASYNCVAE_SOAK_SHORT_ITEMS", "1500"))
    report = await run_soak(n, make_server, serve_subprocess)
    check(report, n, rss_slack_mib=64)


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_soak_long(make_server, serve_subprocess):
    n = int(os.environ.get("ASYNCVAE_SOAK_ITEMS", "20000"))
    report = await run_soak(n, make_server, serve_subprocess)
    check(report, n, rss_slack_mib=128)
