"""Transport benchmark: client CPU per request and throughput of the transports below
the seam, against the floor the engine must beat.

::

    python bench/bench_transport.py                    # S1, S2, S4; 3 repeats
    python bench/bench_transport.py --scenarios S1 --repeats 5 --seconds 4
    python bench/bench_transport.py --json out.json    # also write every run

Contenders, each under the default asyncio loop and under uvloop, each in its own
process (clean CPU and peak-RSS accounting), interleaved, repeated:

- ``floor``: the minimal aiohttp loop — one ``ClientSession`` (``TCPConnector(limit=64)``,
  ``auto_decompress=False``), the URL built once as ``yarl.URL(..., encoded=True)``,
  ``session.post`` + ``resp.read()`` + ``torch.frombuffer``;
- ``aiohttp``: :class:`~asyncvae.transport.aiohttp.AiohttpTransport` — ``send`` +
  ``read_into`` a ``numpy.empty(shape, uint8)`` wrapped by ``torch.from_numpy``
  (``readchunk`` + copy);
- ``native``: :class:`~asyncvae.transport.native.NativeTransport` — ``send`` +
  ``read_into`` (the kernel writes the body straight into the buffer).

Every contender does the same job per request: send the latent, check the status,
read ``shape`` from the headers, and hold the answer as a uint8 tensor. Closed loop:
64 tasks (S4: 4, its answers are 56 MiB), after a warm-up that opens the pool. Against
``python -m asyncvae serve --cache --replicas 8`` in a subprocess (the server shares
the machine's cores; CPU figures are the client process's own ``getrusage``).
Figures: medians over the repeats, and ratios to the floor on the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _serve import Server  # noqa: E402

CONTENDERS = ("floor", "aiohttp", "native")
LOOPS = ("asyncio", "uvloop")
#: scenario -> (tasks, request cap)
PLAN = {"S1": (64, 4000), "S2": (64, 2000), "S3": (16, 400), "S4": (4, 24)}
SERVER_ARGS = ("--cache", "--replicas", "8")
MiB = 1 << 20


# --------------------------------------------------------------------------- worker


def _query(sc: Any) -> str:
    """The decode query of PROTOCOL.md for the scenario (as the engine would send it)."""
    parts = [("image_format", "jpg"), ("output_type", "pt"), ("partial_postprocess", "True")]
    parts += [("shape", str(d)) for d in sc.shape]
    parts += [("dtype", sc.dtype), ("scaling_factor", str(sc.scaling_factor))]
    return "&".join(f"{k}={v}" for k, v in parts)


def _trim() -> None:
    """``malloc_trim(0)`` where glibc has it: the peak-RSS baseline then excludes memory
    the warm-up freed but the allocator kept (else the measured run reuses it and the
    growth reads as zero)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    import numpy as np
    import torch
    from contenders import PeakRSS, _cpu
    from scenarios import SCENARIOS
    from yarl import URL

    sc = SCENARIOS[args.scenario]
    tasks, _ = PLAN[args.scenario]
    g = torch.Generator().manual_seed(1234)
    latent = torch.randn(sc.shape, generator=g).to(getattr(torch, sc.dtype)).contiguous()
    body = memoryview(latent.reshape(-1).view(torch.uint8).numpy())
    url = URL(args.url.rstrip("/") + "/?" + _query(sc), encoded=True)
    headers = (("Content-Type", "tensor/binary"), ("Accept", "tensor/binary"))
    out_shape = tuple(sc.out_shape)
    res: dict[str, Any] = {"contender": args.contender, "loop": args.loop, "scenario": args.scenario,
                           "tasks": tasks}

    async def closed_loop(call: Any) -> None:
        # warm-up: open the pool (every task's connection), fill the server's cache
        await asyncio.gather(*(call() for _ in range(tasks)))
        for _ in range(3):  # let the loop drop its last references to the warm-up answers
            await asyncio.sleep(0)
        gc.collect()
        _trim()  # hand freed heap back to the OS, or the run reuses it unseen
        mem = PeakRSS()
        cpu0 = _cpu()
        t0 = time.perf_counter()
        stop = t0 + args.seconds
        counter = itertools.count()
        ok = 0

        async def loop_() -> None:
            nonlocal ok
            while next(counter) < args.requests and time.perf_counter() < stop:
                t = await call()
                if t.shape != out_shape or t.dtype != torch.uint8:
                    raise AssertionError(f"bad answer {t.shape} {t.dtype}")
                ok += 1
                del t

        await asyncio.gather(*(loop_() for _ in range(tasks)))
        wall = time.perf_counter() - t0
        cpu = _cpu() - cpu0
        res.update(requests=ok, wall_s=wall, rps=ok / wall, cpu_ms_per_req=1000 * cpu / max(ok, 1),
                   cpu_util=cpu / wall, peak_rss_growth_mib=(mem.peak() - mem.base) / MiB,
                   rss_method=mem.method)

    async def run_floor() -> None:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=64)
        hdrs = dict(headers)
        async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
            async def call() -> torch.Tensor:
                async with session.post(url, data=body, headers=hdrs) as r:
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                    data = await r.read()
                    shape = json.loads(r.headers["shape"])
                return torch.frombuffer(data, dtype=torch.uint8).reshape(shape)

            await closed_loop(call)

    async def run_transport(kind: str) -> None:
        from asyncvae.transport import Request

        if kind == "native":
            from asyncvae.transport.native import NativeTransport as T
        else:
            from asyncvae.transport.aiohttp import AiohttpTransport as T  # type: ignore[assignment]
        t = T(limit=64)
        req = Request("POST", url, headers, body)
        try:
            async def call() -> torch.Tensor:
                async with await t.send(req) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                    shape = json.loads(resp.headers["shape"])
                    arr = np.empty(shape, np.uint8)
                    if await resp.read_into(memoryview(arr).cast("B")) != resp.content_length:
                        raise RuntimeError("short body")
                return torch.from_numpy(arr)

            await closed_loop(call)
            res["pool"] = t.connections()
        finally:
            await t.aclose()

    coro = run_floor() if args.contender == "floor" else run_transport(args.contender)
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)
    return res


# --------------------------------------------------------------------------- orchestrator


def run_one(url: str, contender: str, loop: str, scenario: str, requests: int, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", contender, "--loop", loop,
           "--scenario", scenario, "--url", url, "--requests", str(requests), "--seconds", str(seconds)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON "):])
    return {"contender": contender, "loop": loop, "scenario": scenario, "error": (p.stderr or p.stdout)[-800:]}


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def report(results: list[dict[str, Any]], scenarios: list[str]) -> str:
    out = []
    for s in scenarios:
        tasks = PLAN[s][0]
        out.append(f"\n{s} ({tasks} tasks)   medians over repeats; ratios vs the floor on the same loop")
        out.append(f"{'contender':<10} {'loop':<8} {'req/s':>8} {'cpu ms/req':>11} {'cpu x floor':>11} "
                   f"{'req/s x floor':>13} {'peak RSS +MiB':>13} {'runs':>5}")
        for loop in LOOPS:
            floor = [r for r in results if r["scenario"] == s and r["loop"] == loop and r["contender"] == "floor"
                     and "rps" in r]
            f_rps, f_cpu = _med(floor, "rps"), _med(floor, "cpu_ms_per_req")
            for c in CONTENDERS:
                rows = [r for r in results if r["scenario"] == s and r["loop"] == loop and r["contender"] == c]
                ok = [r for r in rows if "rps" in r]
                if not ok:
                    err = rows[0].get("error", "?").strip().splitlines()[-1:] if rows else ["no runs"]
                    out.append(f"{c:<10} {loop:<8} FAILED: {err}")
                    continue
                rps, cpu, rss = _med(ok, "rps"), _med(ok, "cpu_ms_per_req"), _med(ok, "peak_rss_growth_mib")
                cr = f"{cpu / f_cpu:.2f}" if f_cpu and cpu else "-"
                rr = f"{rps / f_rps:.2f}" if f_rps and rps else "-"
                out.append(f"{c:<10} {loop:<8} {rps:>8.0f} {cpu:>11.3f} {cr:>11} {rr:>13} {rss:>13.1f} {len(ok):>5}")
    # per-run ratios within a repeat (same minute, same machine load): the fairest view
    out.append("\nCPU ms/request ratio to the floor, per repeat (same loop, same repeat):")
    for s in scenarios:
        for loop in LOOPS:
            for c in ("aiohttp", "native"):
                ratios = []
                for rep in sorted({r["repeat"] for r in results}):
                    f = [r for r in results if (r["scenario"], r["loop"], r["contender"], r["repeat"]) == (s, loop, "floor", rep) and "rps" in r]
                    x = [r for r in results if (r["scenario"], r["loop"], r["contender"], r["repeat"]) == (s, loop, c, rep) and "rps" in r]
                    if f and x:
                        ratios.append(x[0]["cpu_ms_per_req"] / f[0]["cpu_ms_per_req"])
                if ratios:
                    out.append(f"  {s} {loop:<8} {c:<8} " + " ".join(f"{q:.2f}" for q in ratios)
                               + f"   median {statistics.median(ratios):.2f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--loop", choices=LOOPS, default="asyncio", help=argparse.SUPPRESS)
    ap.add_argument("--scenario", default="S1", help=argparse.SUPPRESS)
    ap.add_argument("--url", default="", help="use this server instead of starting one")
    ap.add_argument("--requests", type=int, default=0, help="request cap per run (default per scenario)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time cap per run (S4: 3x)")
    ap.add_argument("--scenarios", default="S1,S2,S4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--json", default="", help="write every run's figures here")
    args = ap.parse_args()

    if args.worker:
        args.contender = args.worker
        if not args.requests:
            args.requests = PLAN[args.scenario][1]
        print("BENCHJSON " + json.dumps(worker(args)), flush=True)
        return

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    contenders = [c for c in args.contenders.split(",") if c]
    loops = [lp for lp in args.loops.split(",") if lp]
    server = None if args.url else Server(SERVER_ARGS)
    url = args.url or server.url  # type: ignore[union-attr]
    print(f"server {url} ({' '.join(SERVER_ARGS)}); {os.cpu_count()} CPUs; repeats {args.repeats}", flush=True)
    results: list[dict[str, Any]] = []
    try:
        cells = [(c, lp) for lp in loops for c in contenders]
        for rep in range(args.repeats):
            for s in scenarios:
                seconds = args.seconds * (3 if s == "S4" else 1)
                requests = args.requests or PLAN[s][1]
                order = cells[rep % len(cells):] + cells[: rep % len(cells)]  # rotate the start
                for c, lp in order:
                    r = run_one(url, c, lp, s, requests, seconds)
                    r["repeat"] = rep
                    results.append(r)
                    if "rps" in r:
                        print(f"  rep {rep} {s} {c:<8} {lp:<8} {r['rps']:8.0f} req/s  "
                              f"{r['cpu_ms_per_req']:.3f} ms CPU/req  peak RSS +{r['peak_rss_growth_mib']:.0f} MiB",
                              flush=True)
                    else:
                        print(f"  rep {rep} {s} {c} {lp} FAILED: {r.get('error', '')[-300:]}", flush=True)
    finally:
        if server is not None:
            server.stop()
    print(report(results, scenarios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
