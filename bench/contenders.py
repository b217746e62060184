"""One contender, one process: ``python bench/contenders.py NAME --url URL --scenario S2``.

It imports what it needs, builds the scenario's latents, makes ONE warm-up request
(so the pool, the loop thread and the server's cache are hot), takes its idle
baseline (RSS, CPU time), then runs closed-loop until ``--requests`` are done or
``--seconds`` have passed, whichever comes first, and prints ONE JSON line on stdout
(prefixed ``BENCHJSON``). Every contender does the full job: send the tensor, read
the answer, and turn the body into a uint8 tensor.

Measurements:
- wall: from the first request sent after the warm-up to the last answer handled.
- latency: per request, send → tensor in hand. For ``decode_many``/``remote_decode_batch``
  it is item intake (the iterator hands the latent to the client) → result, so it
  includes the wait in the client's own queue (Little's law: concurrency / rate).
- cpu: ``getrusage(RUSAGE_SELF)`` user+sys of this process (all its threads; for wrk,
  ``RUSAGE_CHILDREN``), divided by the requests that succeeded.
- peak RSS growth: the kernel's VmHWM after resetting it (``/proc/self/clear_refs`` 5)
  at the baseline, minus the baseline VmRSS; where that is unavailable, a 2 ms sampler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import S7_CALLERS, S7_SIDES, SCENARIOS, Scenario

warnings.filterwarnings("ignore", message="The given buffer is not writable")

#: name -> (letter in the issue, one-line description)
CONTENDERS: dict[str, tuple[str, str]] = {
    "diffusers_seq": ("a", "diffusers.utils.remote_decode, sequential (requests, new connection per call)"),
    "diffusers_threads8": ("b", "diffusers remote_decode from a ThreadPoolExecutor of 8"),
    "diffusers_threads32": ("b", "diffusers remote_decode from a ThreadPoolExecutor of 32"),
    "httpx_8": ("c", "httpx.AsyncClient, 8 tasks, body -> tensor like diffusers (bytearray copy)"),
    "httpx_64": ("c", "httpx.AsyncClient, 64 tasks, body -> tensor like diffusers"),
    "aiohttp_64": ("d", "minimal aiohttp loop, 64 tasks: URL built once, post bytes, read body, "
                        "torch.frombuffer (the floor)"),
    "wrk": ("e", "wrk -t1 -c64 POSTing the same request (server ceiling; body discarded)"),
    "asyncvae_sync_seq": ("f", "asyncvae.remote_decode (sync drop-in), sequential"),
    "asyncvae_many_default": ("g", "asyncvae Client.decode_many, default Limits()"),
    "asyncvae_many_tuned": ("g", "asyncvae Client.decode_many, Limits tuned per scenario"),
    "asyncvae_batch": ("h", "asyncvae.remote_decode_batch (sync, ordered)"),
    # S7 only
    "asyncvae_many_b1": ("g", "decode_many, Limits() (S7 baseline)"),
    "asyncvae_many_b8": ("g", "decode_many, Limits(max_batch=8) (S7 coalescing)"),
    "asyncvae_calls_b1": ("i", f"{S7_CALLERS} concurrent Client.decode() callers, Limits() (S7 baseline)"),
    "asyncvae_calls_b8": ("i", f"{S7_CALLERS} concurrent Client.decode() callers, Limits(max_batch=8)"),
}

ASYNC = {"httpx_8", "httpx_64", "aiohttp_64", "asyncvae_many_default", "asyncvae_many_tuned",
         "asyncvae_many_b1", "asyncvae_many_b8", "asyncvae_calls_b1", "asyncvae_calls_b8"}


# --------------------------------------------------------------------------- memory / cpu


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _rss() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak RSS over a window: VmHWM reset at start, or a sampling thread as fallback."""

    def __init__(self) -> None:
        self.base = _rss()
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = self.base
        self.method = "vmhwm"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _status_kb("VmHWM") is None:
                raise OSError
        except OSError:
            self.method = "sampled-2ms"
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss())

    def peak(self) -> int:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            return max(self._peak, _rss())
        return (_status_kb("VmHWM") or 0) * 1024


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- context


class Ctx:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sc: Scenario = SCENARIOS[args.scenario]
        self.url: str = args.url
        self.n: int = args.requests
        self.seconds: float = args.seconds
        self.opts = self.sc.decode_options()
        self.dtype = getattr(torch, self.sc.dtype)
        g = torch.Generator().manual_seed(1234)
        self.latent = torch.randn(self.sc.shape, generator=g).to(self.dtype)
        from asyncvae import protocol

        req = protocol.decode_request(self.latent, protocol.DecodeOptions(**self.opts))
        self.params = list(req.params)
        self.query = urlencode(self.params)
        self.headers = dict(req.headers)
        self.deadline = float("inf")
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.digests: list[str] = []
        self.extra: dict[str, Any] = {}

    def item(self, i: int) -> torch.Tensor:
        if not self.sc.distinct:
            return self.latent
        g = torch.Generator().manual_seed(10_000 + i)
        return torch.randn(self.sc.shape, generator=g).to(self.dtype)

    def body_bytes(self, t: torch.Tensor) -> bytes:
        """What diffusers does per call: a fresh bytes copy of the tensor."""
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    def more(self, i: int) -> bool:
        return i < self.n and time.perf_counter() < self.deadline

    def check(self, t: Any) -> bool:
        """Count a result: a uint8 tensor of the expected shape."""
        if isinstance(t, torch.Tensor) and tuple(t.shape) == self.sc.out_shape and t.dtype == torch.uint8:
            self.ok += 1
            if self.args.digests:
                self.digests.append(hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest())
            return True
        self.errors[f"bad_result:{type(t).__name__}:{tuple(getattr(t, 'shape', ()))}"] += 1
        return False

    def error(self, e: BaseException) -> None:
        self.errors[type(e).__name__] += 1

    # baseline / measurement window
    def begin(self) -> None:
        gc.collect()
        self.mem = PeakRSS()
        self.cpu0 = _cpu()
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.seconds

    def end(self) -> None:
        self.t1 = time.perf_counter()
        self.cpu1 = _cpu()
        self.peak = self.mem.peak()


def frombuffer_like_diffusers(content: bytes, headers: Any) -> torch.Tensor:
    shape = json.loads(headers["shape"])
    dt = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float32": torch.float32}[headers["dtype"]]
    return torch.frombuffer(bytearray(content), dtype=dt).reshape(shape)


# --------------------------------------------------------------------------- sync contenders


def _threaded(ctx: Ctx, call: Callable[[torch.Tensor], Any], workers: int) -> None:
    counter = itertools.count()
    lock = threading.Lock()

    def worker() -> None:
        while True:
            i = next(counter)
            if not ctx.more(i):
                return
            t = time.perf_counter()
            try:
                out = call(ctx.item(i))
            except Exception as e:
                with lock:
                    ctx.error(e)
                continue
            dt = time.perf_counter() - t
            with lock:
                if ctx.check(out):
                    ctx.latencies.append(dt)

    if workers == 1:
        worker()
        return
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_diffusers(ctx: Ctx, workers: int) -> None:
    from diffusers.utils import remote_decode

    def call(t: torch.Tensor) -> Any:
        return remote_decode(endpoint=ctx.url, tensor=t, **ctx.opts)

    call(ctx.latent)
    ctx.begin()
    _threaded(ctx, call, workers)
    ctx.end()


def run_asyncvae_sync(ctx: Ctx) -> None:
    import asyncvae

    def call(t: torch.Tensor) -> Any:
        return asyncvae.remote_decode(ctx.url, t, **ctx.opts)

    call(ctx.latent)
    ctx.begin()
    _threaded(ctx, call, 1)
    ctx.end()


def run_asyncvae_batch(ctx: Ctx) -> None:
    import asyncvae
    from asyncvae import sync

    asyncvae.remote_decode(ctx.url, ctx.latent, **ctx.opts)  # warm-up: loop thread + pool
    pulled: list[float] = []

    def items() -> Any:
        i = 0
        while ctx.more(i):
            pulled.append(time.perf_counter())
            yield ctx.item(i)
            i += 1

    box: dict[str, Any] = {}

    def go() -> None:
        try:
            box["out"] = asyncvae.remote_decode_batch(ctx.url, items(), **ctx.opts)
        except Exception as e:
            box["err"] = e

    ctx.begin()
    th = threading.Thread(target=go, daemon=True)
    th.start()
    client = _sync_client(sync, ctx.url)
    seen, last = -1, time.perf_counter()
    while th.is_alive():  # stall watchdog on the sync client's completions
        th.join(1.0)
        done = client.stats.completed + client.stats.failed
        if done != seen:
            seen, last = done, time.perf_counter()
        elif time.perf_counter() - last > ctx.args.stall_s:
            _stalled(ctx, client, len(pulled))
            break
    ctx.end()
    out = box.get("out", [])
    if "err" in box:
        ctx.error(box["err"])
    for r in out:
        if isinstance(r, asyncvae.ItemError):
            ctx.errors[type(r.error).__name__] += 1
        else:
            ctx.check(r)
    # per-item latency is only visible to the client: read its stats (bench-only peek)
    try:
        stats = _sync_client(sync, ctx.url).stats
        ctx.extra["latency_from"] = "client.stats (includes the warm-up request)"
        ctx.extra["p50_ms"] = stats.percentile_ms(50)
        ctx.extra["p99_ms"] = stats.percentile_ms(99)
        ctx.extra["client_stats"] = _stats_brief(stats)
    except Exception as e:
        ctx.extra["latency_from"] = f"unavailable ({e!r})"


def _sync_client(sync: Any, url: str) -> Any:
    """The sync front door's cached client of ``url`` (a bench-only peek)."""
    return next(c for (_, u), c in sync._get_runner().clients.items() if u == url)


def _stats_brief(stats: Any) -> dict[str, Any]:
    s = stats.snapshot()
    return {k: s[k] for k in ("requests", "batches", "coalesced", "retries", "errors", "peak_in_flight",
                              "peak_inflight_bytes")}


# --------------------------------------------------------------------------- async contenders


async def _closed_loop(ctx: Ctx, tasks: int, call: Callable[[torch.Tensor], Any]) -> None:
    counter = itertools.count()

    async def worker() -> None:
        while True:
            i = next(counter)
            if not ctx.more(i):
                return
            t = time.perf_counter()
            try:
                out = await call(ctx.item(i))
            except Exception as e:
                ctx.error(e)
                continue
            dt = time.perf_counter() - t
            if ctx.check(out):
                ctx.latencies.append(dt)

    await asyncio.gather(*(worker() for _ in range(tasks)))


async def run_httpx(ctx: Ctx, tasks: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        async def call(t: torch.Tensor) -> torch.Tensor:
            r = await client.post(ctx.url, params=ctx.params, content=ctx.body_bytes(t), headers=ctx.headers)
            r.raise_for_status()
            return frombuffer_like_diffusers(r.content, r.headers)

        await call(ctx.latent)
        ctx.begin()
        await _closed_loop(ctx, tasks, call)
        ctx.end()


async def run_aiohttp(ctx: Ctx, tasks: int) -> None:
    import aiohttp
    import yarl

    conn = aiohttp.TCPConnector(limit=tasks)
    # built once, already encoded: aiohttp neither parses nor re-encodes the query per request
    url = yarl.URL(ctx.url + ("&" if "?" in ctx.url else "?") + ctx.query, encoded=True)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                     read_bufsize=ctx.args.read_bufsize) as session:
        async def call(t: torch.Tensor) -> torch.Tensor:
            body = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            async with session.post(url, data=body, headers=ctx.headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                data = await r.read()
                shape = json.loads(r.headers["shape"])
            return torch.frombuffer(data, dtype=torch.uint8).reshape(shape)

        await call(ctx.latent)
        ctx.begin()
        await _closed_loop(ctx, tasks, call)
        ctx.end()


async def run_decode_many(ctx: Ctx, limits_kw: dict[str, Any]) -> None:
    import asyncvae

    ctx.extra["limits"] = limits_kw
    limits = asyncvae.Limits(**limits_kw)
    async with asyncvae.Client(ctx.url, limits=limits) as client:
        await client.decode(ctx.latent, **ctx.opts)
        pulled: list[float] = []

        def items() -> Any:
            i = 0
            while ctx.more(i):
                pulled.append(time.perf_counter())
                yield ctx.item(i)
                i += 1

        last = [0.0]

        async def consume() -> None:
            i = 0
            async for r in client.decode_many(items(), **ctx.opts):
                now = last[0] = time.perf_counter()
                if isinstance(r, asyncvae.ItemError):
                    ctx.errors[type(r.error).__name__] += 1
                elif ctx.check(r):
                    ctx.latencies.append(now - pulled[i])
                del r
                i += 1

        ctx.begin()
        last[0] = ctx.t0
        task = asyncio.ensure_future(consume())
        while not task.done():  # stall watchdog: a hung engine is a finding, not a hung bench
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and time.perf_counter() - last[0] > ctx.args.stall_s:
                _stalled(ctx, client, len(pulled))
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not task.cancelled():
            task.result()
        ctx.end()
        ctx.extra["client_stats"] = _stats_brief(client.stats)


async def run_decode_calls(ctx: Ctx, limits_kw: dict[str, Any], callers: int) -> None:
    """``callers`` tasks each awaiting ``Client.decode()`` in turn (what an async web app
    does): the client sees concurrent single calls, not an iterator."""
    import asyncvae

    ctx.extra["limits"] = limits_kw
    ctx.extra["callers"] = callers
    async with asyncvae.Client(ctx.url, limits=asyncvae.Limits(**limits_kw)) as client:
        await client.decode(ctx.latent, **ctx.opts)
        results: dict[int, Any] = {}
        counter = itertools.count()

        async def caller() -> None:
            while True:
                i = next(counter)
                if not ctx.more(i):
                    return
                t = time.perf_counter()
                try:
                    out = await client.decode(ctx.item(i), **ctx.opts)
                except Exception as e:
                    ctx.error(e)
                    continue
                ctx.latencies.append(time.perf_counter() - t)
                results[i] = out

        ctx.begin()
        await asyncio.gather(*(caller() for _ in range(callers)))
        ctx.end()
        for i in sorted(results):  # in input order, so digests line up with the other side
            ctx.check(results[i])
        ctx.extra["client_stats"] = _stats_brief(client.stats)


def _stalled(ctx: Ctx, client: Any, pulled: int) -> None:
    """Record where the client stood when it stopped making progress."""
    st = client.stats
    budget = getattr(client, "_budget", None)
    ctx.errors["stalled"] += 1
    ctx.extra["stalled"] = {
        "after_s": ctx.args.stall_s, "results": ctx.ok, "items_pulled": pulled, "completed": st.completed,
        "in_flight": st.in_flight, "queued": st.queued, "inflight_bytes": st.inflight_bytes,
        "budget_used": getattr(budget, "used", None), "budget_limit": getattr(budget, "limit", None),
    }
    print(f"[bench] {ctx.args.name}: no result for {ctx.args.stall_s} s: {ctx.extra['stalled']}", file=sys.stderr)


def run_async(ctx: Ctx, coro: Any) -> None:
    if ctx.args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


# --------------------------------------------------------------------------- wrk


WRK_LUA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk_post.lua")


def run_wrk(ctx: Ctx) -> None:
    exe = shutil.which("wrk")
    if exe is None:
        raise SkipContender("wrk not installed (apt-get install -y wrk)")
    from urllib.parse import urlsplit

    u = urlsplit(ctx.url)
    path = (u.path or "/") + "?" + ctx.query
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(ctx.body_bytes(ctx.latent))
        body_file = f.name
    try:
        secs = max(1, round(ctx.seconds))
        cmd = [exe, "-t1", f"-c{ctx.args.wrk_connections}", f"-d{secs}s", "--timeout", "60s",
               "-s", WRK_LUA, f"{u.scheme}://{u.netloc}/", "--", body_file, path]
        cpu0 = _cpu(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 90)
        t1 = time.perf_counter()
        cpu1 = _cpu(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(body_file)
    m = re.search(r"^WRKJSON (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed (rc {p.returncode}): {p.stderr.strip() or p.stdout.strip()}"[:500])
    w = json.loads(m.group(1))
    errs = {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}
    ctx.ok = w["requests"] - w["status"] - w["read"] - w["timeout"]
    ctx.errors.update(errs)
    ctx.t0, ctx.t1 = 0.0, w["duration_us"] / 1e6
    ctx.cpu0, ctx.cpu1 = cpu0, cpu1
    ctx.mem = None  # type: ignore[assignment]
    ctx.extra.update(p50_ms=w["p50_us"] / 1000, p99_ms=w["p99_us"] / 1000, wall_incl_start_s=t1 - t0,
                     note="wrk: time-bound (-d), not request-bound; rss n/a; cpu = wrk process")


class SkipContender(Exception):
    pass


# --------------------------------------------------------------------------- single large call (RSS)


def run_single_peak(ctx: Ctx, name: str) -> dict[str, Any]:
    """RSS growth of ONE decode of the scenario's latents (after a small warm-up call)."""
    small = torch.randn((1, 4, 8, 8)).to(torch.float16)
    if name == "diffusers_seq":
        from diffusers.utils import remote_decode as call
    else:
        import asyncvae

        call = asyncvae.remote_decode
    call(ctx.url, small, output_type="pt", partial_postprocess=True, return_type="pt")
    gc.collect()
    mem = PeakRSS()
    out = call(ctx.url, ctx.latent, **ctx.opts)
    peak = mem.peak()
    ok = isinstance(out, torch.Tensor) and tuple(out.shape) == ctx.sc.out_shape
    return {"contender": name, "scenario": ctx.sc.name, "mode": "single_peak", "ok": int(ok),
            "response_bytes": ctx.sc.out_nbytes, "rss_peak_growth_bytes": peak - mem.base,
            "rss_base_bytes": mem.base, "rss_method": mem.method,
            "growth_over_response": (peak - mem.base) / ctx.sc.out_nbytes}


# --------------------------------------------------------------------------- main


def measure(ctx: Ctx, name: str) -> None:
    if name == "diffusers_seq":
        run_diffusers(ctx, 1)
    elif name.startswith("diffusers_threads"):
        run_diffusers(ctx, int(name.removeprefix("diffusers_threads")))
    elif name.startswith("httpx_"):
        run_async(ctx, run_httpx(ctx, int(name.removeprefix("httpx_"))))
    elif name == "aiohttp_64":
        run_async(ctx, run_aiohttp(ctx, 64))
    elif name == "wrk":
        run_wrk(ctx)
    elif name == "asyncvae_sync_seq":
        run_asyncvae_sync(ctx)
    elif name == "asyncvae_batch":
        run_asyncvae_batch(ctx)
    elif name == "asyncvae_many_default":
        run_async(ctx, run_decode_many(ctx, {}))
    elif name == "asyncvae_many_tuned":
        run_async(ctx, run_decode_many(ctx, dict(ctx.sc.tuned)))
    elif name.startswith("asyncvae_calls_"):
        run_async(ctx, run_decode_calls(ctx, dict(S7_SIDES[name]), S7_CALLERS))
    elif name in S7_SIDES:
        run_async(ctx, run_decode_many(ctx, dict(S7_SIDES[name])))
    else:
        raise SystemExit(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")


def summarize(ctx: Ctx, name: str) -> dict[str, Any]:
    wall = max(1e-9, ctx.t1 - ctx.t0)
    lat = sorted(ctx.latencies)

    def pct(q: float) -> float | None:
        if not lat:
            return None
        return 1000 * lat[min(len(lat) - 1, round(q / 100 * (len(lat) - 1)))]

    n_err = sum(ctx.errors.values())
    res: dict[str, Any] = {
        "contender": name,
        "scenario": ctx.sc.name,
        "loop": ctx.args.loop if name in ASYNC else ("uvloop-thread" if name.startswith("asyncvae") else "-"),
        "ok": ctx.ok,
        "errors": n_err,
        "error_kinds": dict(ctx.errors),
        "wall_s": wall,
        "rps": ctx.ok / wall,
        "mb_s": ctx.ok * ctx.sc.out_nbytes / wall / 1e6,
        "p50_ms": ctx.extra.pop("p50_ms", pct(50)),
        "p99_ms": ctx.extra.pop("p99_ms", pct(99)),
        "cpu_ms_per_req": 1000 * (ctx.cpu1 - ctx.cpu0) / max(1, ctx.ok),
        "cpu_util": (ctx.cpu1 - ctx.cpu0) / wall,
    }
    if getattr(ctx, "mem", None) is not None:
        res.update(rss_base_bytes=ctx.mem.base, rss_peak_growth_bytes=ctx.peak - ctx.mem.base,
                   rss_method=ctx.mem.method)
    if ctx.digests:
        res["digests"] = ctx.digests
    res.update(ctx.extra)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"one of: {', '.join(CONTENDERS)}")
    p.add_argument("--url", required=True)
    p.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    p.add_argument("--requests", type=int, default=1000, help="request cap")
    p.add_argument("--seconds", type=float, default=5.0, help="time budget after the warm-up")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (async contenders)")
    p.add_argument("--digests", action="store_true", help="emit a digest per result (S7 verification)")
    p.add_argument("--single-peak", action="store_true", help="RSS growth of one call (sync contenders)")
    p.add_argument("--read-bufsize", type=int, default=2**16, help="aiohttp_64's read_bufsize (aiohttp default 64 KiB)")
    p.add_argument("--wrk-connections", type=int, default=64)
    p.add_argument("--stall-s", type=float, default=45.0,
                   help="asyncvae contenders: give up after this long without a result (reported as 'stalled')")
    args = p.parse_args(argv)
    ctx = Ctx(args)
    try:
        if args.single_peak:
            res = run_single_peak(ctx, args.name)
        else:
            measure(ctx, args.name)
            res = summarize(ctx, args.name)
    except SkipContender as e:
        res = {"contender": args.name, "scenario": args.scenario, "skipped": str(e)}
    print("BENCHJSON " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (atexit loop shutdown) so timing ends here


if __name__ == "__main__":
    sys.exit(main())
