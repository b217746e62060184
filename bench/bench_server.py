"""Server-side dynamic batching, measured: ``python bench/bench_server.py``.

The built-in model with a batch-cost service model (``--delay-ms 10.6
--delay-per-item-ms 13.9``: 24.5 ms for one item, 121.8 ms for eight) on 8 replica
slots, driven by 64 concurrent *non-coalescing* clients (each a closed loop: one
``[1,4,8,8]`` float16 latent per request, its own random values, ``pt`` uint8 answer).
The same server runs with ``--max-batch 1`` (off, the default) and ``--max-batch 8``,
alternating, ``--rounds`` times each; the script prints items/s and latency for every
run, the medians and the ratio, and the server's batch-size histogram.

Ceilings from the service model alone: 8 / 24.5 ms = 327 items/s without batching,
8 x 8 / 121.8 ms = 525 items/s with full batches of 8 (1.61x). Client and server share
the machine's cores; on a busy 2-core box treat ±10% as noise.

Issue 13's target: >= 1.5x items/s with ``--max-batch 8`` than without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import urllib.parse
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402
import torch  # noqa: E402

from asyncvae import protocol as P  # noqa: E402

sys.path.insert(0, HERE)
from _serve import Server  # noqa: E402

SERVICE = ["--delay-ms", "10.6", "--delay-per-item-ms", "13.9", "--replicas", "8"]


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: one connection, one
    request at a time (a non-coalescing client that costs little CPU, so that on a
    small machine the figures measure the server, not the load generator)."""

    def __init__(self, url: str, path_query: str) -> None:
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.head = (
            f"POST {path_query} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {P.CONTENT_TYPE_TENSOR}\r\nAccept: {P.CONTENT_TYPE_TENSOR}\r\n"
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def drive(url: str, clients: int, warmup: float, duration: float, seed: int,
                kind: str = "raw") -> dict[str, Any]:
    """``clients`` closed loops for ``warmup + duration`` s; figures from the measured part."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bodies = [bytes(P.tensor_body(torch.randn(1, 4, 8, 8, generator=gen).half())) for _ in range(256)]
    params = [("image_format", "jpg"), ("output_type", "pt"), ("partial_postprocess", "True"),
              *[("shape", str(s)) for s in (1, 4, 8, 8)], ("dtype", "float16")]
    headers = {"Content-Type": P.CONTENT_TYPE_TENSOR, "Accept": P.CONTENT_TYPE_TENSOR}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start, stop = t0 + warmup, t0 + warmup + duration
    done: list[tuple[float, float]] = []  # (finish time, latency)
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def post_aiohttp(body: bytes) -> tuple[int, bytes]:
            async with session.post(url, params=params, data=body, headers=headers) as r:
                return r.status, await r.read()

        async def client() -> None:
            nonlocal errors
            raw = RawHTTP(url, "/?" + urllib.parse.urlencode(params))
            post = raw.post if kind == "raw" else post_aiohttp
            try:
                while loop.time() < stop:
                    body = bodies[rng.randrange(len(bodies))]
                    t = loop.time()
                    status, data = await post(body)
                    end = loop.time()
                    if status != 200 or len(data) != 64 * 64 * 3:
                        errors += 1
                    elif start <= end < stop:
                        done.append((end, end - t))
            finally:
                await raw.close()

        await asyncio.gather(*(client() for _ in range(clients)))
    lat = sorted(x for _, x in done)
    return {
        "items_per_s": len(done) / duration,
        "items": len(done),
        "errors": errors,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
    }


def run_one(max_batch: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    server = Server([*SERVICE, "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms)])
    try:
        res = asyncio.run(drive(server.url, args.clients, args.warmup, args.duration, seed, args.client))
        stats = server.stats()
    finally:
        server.stop()
    sizes = {int(k): v for k, v in stats["batch_sizes"].items()}
    n = sum(sizes.values())
    res["mean_batch"] = sum(k * v for k, v in sizes.items()) / n if n else 0.0
    res["batch_sizes"] = dict(sorted(sizes.items()))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent closed-loop clients (default: 64)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default: 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="runs per setting, alternating (default: 3)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="server --batch-wait-ms (default: 2)")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="raw: keep-alive HTTP/1.1 on asyncio streams (cheap); aiohttp: aiohttp.ClientSession "
                   "(costs the shared cores ~3x more CPU per request) (default: raw)")
    p.add_argument("--json", metavar="FILE", help="also write every figure here")
    args = p.parse_args(argv)
    print(f"server: asyncvae serve {' '.join(SERVICE)} [--max-batch 1|8 --batch-wait-ms "
          f"{args.batch_wait_ms:g}]; {args.clients} non-coalescing {args.client} clients, [1,4,8,8] fp16 → 64x64 uint8; "
          f"{args.warmup:g} s warm-up + {args.duration:g} s measured per run; cpus={os.cpu_count()}", flush=True)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 8: []}
    for r in range(args.rounds):
        for mb in (1, 8):
            res = run_one(mb, args, seed=r)
            runs[mb].append(res)
            print(f"round {r + 1} max-batch {mb}: {res['items_per_s']:.1f} items/s, p50 {res['p50_ms']:.1f} ms, "
                  f"p99 {res['p99_ms']:.1f} ms, errors {res['errors']}, mean batch {res['mean_batch']:.2f} "
                  f"{res['batch_sizes']}", flush=True)
    med = {mb: statistics.median(x["items_per_s"] for x in rs) for mb, rs in runs.items()}
    p50 = {mb: statistics.median(x["p50_ms"] for x in rs) for mb, rs in runs.items()}
    ratio = med[8] / med[1]
    print(f"median items/s: max-batch 1 {med[1]:.1f} (ceiling 327), max-batch 8 {med[8]:.1f} (ceiling 525); "
          f"median p50 {p50[1]:.1f} ms vs {p50[8]:.1f} ms")
    print(f"ratio (max-batch 8 / 1): {ratio:.2f}x — target >= 1.5x: {'PASS' if ratio >= 1.5 else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "median_items_per_s": med, "ratio": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
