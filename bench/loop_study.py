"""Why is one event loop faster than the other on large bodies? An instrumented probe.

``python bench/loop_study.py --url URL --scenario S3 --loop uvloop --read-bufsize 65536 --mode aiohttp``

One process, one configuration. It counts, per request: socket reads the protocol
got (``data_received`` calls and their mean size), ``pause_reading`` calls (the
StreamReader crossed its high-water mark of 2 x read_bufsize), chunks the body
reader handed out, and ``b"".join`` copies ``iter_any()``/``readany()`` made because
several chunks were waiting. Prints one ``BENCHJSON`` line with CPU ms/req and req/s.

Modes:
- ``aiohttp``: the minimal loop of contender (d) (``resp.read()``, ``torch.frombuffer``);
- ``aiohttp-chunks``: the same, but reading with ``readchunk()`` into a preallocated
  tensor (what asyncvae's transport would do without ``iter_any``'s joins);
- ``asyncvae``: ``Client.decode_many`` with ``--read-bufsize`` patched into
  ``transport.make_session`` (bench-only monkeypatch; the engine default is 1 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from typing import Any

import torch
from aiohttp import client_proto, streams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import Ctx

C: Counter[str] = Counter()


def instrument() -> None:
    rp = client_proto.ResponseHandler
    orig_dr, orig_pause = rp.data_received, rp.pause_reading

    def data_received(self: Any, data: bytes) -> None:
        C["reads"] += 1
        C["read_bytes"] += len(data)
        orig_dr(self, data)

    def pause_reading(self: Any) -> None:
        C["pauses"] += 1
        orig_pause(self)

    rp.data_received = data_received  # type: ignore[method-assign]
    rp.pause_reading = pause_reading  # type: ignore[method-assign]
    sr = streams.StreamReader
    orig_nowait = sr._read_nowait

    def _read_nowait(self: Any, n: int) -> bytes:
        if n == -1 and len(self._buffer) > 1:
            C["joins"] += 1
            C["joined_bytes"] += self._size
        return orig_nowait(self, n)

    sr._read_nowait = _read_nowait  # type: ignore[method-assign]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(ctx: Ctx, mode: str, tasks: int, bufsize: int) -> dict[str, Any]:
    import aiohttp

    if mode == "asyncvae":
        import functools

        import asyncvae
        from asyncvae import transport

        transport.make_session = functools.partial(transport.make_session, read_bufsize=bufsize)
        async with asyncvae.Client(ctx.url, limits=asyncvae.Limits(max_concurrency=tasks, max_queued=2 * tasks)) as c:
            await c.decode(ctx.latent, **ctx.opts)
            C.clear()
            c0, t0 = cpu(), time.perf_counter()
            n = 0
            async for _ in c.decode_many((ctx.latent for _ in range(ctx.n)), **ctx.opts):
                n += 1
            return {"n": n, "wall": time.perf_counter() - t0, "cpu": cpu() - c0}
    url = ctx.url + "?" + ctx.query
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=tasks), read_bufsize=bufsize,
                                     auto_decompress=False) as s:
        body = memoryview(ctx.latent.reshape(-1).view(torch.uint8).numpy())

        async def one() -> torch.Tensor:
            async with s.post(url, data=body, headers=ctx.headers) as r:
                if mode == "aiohttp":
                    return torch.frombuffer(await r.read(), dtype=torch.uint8)
                n = int(r.headers["Content-Length"])
                buf = torch.empty(n, dtype=torch.uint8)
                view, off = memoryview(buf.numpy()), 0
                while True:
                    chunk, _ = await r.content.readchunk()
                    if not chunk:
                        break
                    view[off:off + len(chunk)] = chunk
                    off += len(chunk)
                return buf

        await one()
        C.clear()
        left = [ctx.n]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                await one()

        c0, t0 = cpu(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        return {"n": ctx.n, "wall": time.perf_counter() - t0, "cpu": cpu() - c0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--scenario", default="S3")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--mode", choices=("aiohttp", "aiohttp-chunks", "asyncvae"), default="aiohttp")
    p.add_argument("--read-bufsize", type=int, default=1 << 16)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    a = p.parse_args()
    ns = argparse.Namespace(url=a.url, scenario=a.scenario, requests=a.requests, seconds=1e9, loop=a.loop,
                            digests=False)
    ctx = Ctx(ns)
    instrument()
    if a.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            res = r.run(run(ctx, a.mode, a.tasks, a.read_bufsize))
    else:
        res = asyncio.run(run(ctx, a.mode, a.tasks, a.read_bufsize))
    n = res["n"]
    out = {"mode": a.mode, "loop": a.loop, "read_bufsize": a.read_bufsize, "scenario": a.scenario, "tasks": a.tasks,
           "rps": n / res["wall"], "cpu_ms_per_req": 1000 * res["cpu"] / n,
           "reads_per_req": C["reads"] / n, "mean_read_kib": C["read_bytes"] / max(1, C["reads"]) / 1024,
           "pauses_per_req": C["pauses"] / n, "joins_per_req": C["joins"] / n,
           "joined_mib_per_req": C["joined_bytes"] / n / 2**20}
    print("BENCHJSON " + json.dumps(out), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
