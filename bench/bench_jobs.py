"""Benchmark: ``asyncvae encode`` end to end vs. the engine's raw request rate.

Both run in the same process, against the same reference server (its own process,
``python -m asyncvae serve``, unless ``--endpoint`` is given), with the same
concurrency, on the same images:

- raw: ``Client.encode_many`` over tensors preprocessed beforehand (in memory):
  requests/s the engine sustains;
- job: ``encode_dataset`` from the JPEG files on disk: listing, decoding, resizing,
  float16 conversion, requests, shard writes — images/s.

The ratio job/raw says how much of the engine's rate the job keeps (target >= 0.70).
By default the server models a remote GPU endpoint (4 replicas, 25 ms service time
spent sleeping, not on this machine's CPUs). With ``--delay-ms 0`` the local server
burns the same cores the job needs for JPEG decoding and resizing, so the ratio
then measures preprocessing cost vs. a near-free model, not the job's overhead.

    python bench/bench_jobs.py --quick
    python bench/bench_jobs.py --images 2000 --resolution 512 --delay-ms 20 --replicas 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncvae.jobs._common import make_client  # noqa: E402

import asyncvae  # noqa: E402
from asyncvae.jobs import (  # noqa: E402
    encode_dataset_async,
    list_inputs,
    load_image,
    parse_resolution,
    to_wire_tensor,
)
from asyncvae.jobs.demo import make_image  # noqa: E402

LISTENING = "asyncvae serve: listening on "


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "asyncvae", "serve", "--port", "0", "--replicas", str(args.replicas),
           "--delay-ms", str(args.delay_ms)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(LISTENING):
            url = line[len(LISTENING):].strip()
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, url
    raise RuntimeError("server did not start")


def make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"img_{i:05d}.jpg"
        if not p.exists():
            make_image(i, size).save(p, quality=90)


async def raw_rate(url: str, tensors: list, concurrency: int) -> float:
    async with make_client(url, concurrency=concurrency) as client:
        async for _ in client.encode_many(tensors[: min(32, len(tensors))]):
            pass  # warm the pool
        t0 = time.perf_counter()
        n = 0
        async for r in client.encode_many(tensors):
            assert not isinstance(r, asyncvae.ItemError), r
            n += 1
        return n / (time.perf_counter() - t0)


async def job_rate(url: str, folder: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    t0 = time.perf_counter()
    s = await encode_dataset_async(
        folder, out, endpoint=url, resolution=args.resolution, concurrency=args.concurrency,
        shard_size=args.shard_size, overwrite=True, quiet=True, workers=args.workers,
    )
    wall = time.perf_counter() - t0
    assert s.failures == 0 and s.ok == args.images, s
    return s.processed / wall, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 images, one round")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--source-size", default="640x480", help="generated JPEG size WxH")
    ap.add_argument("--resolution", default="256")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--delay-ms", type=float, default=25.0,
                    help="server service time per request, spent sleeping like a remote GPU endpoint "
                    "(default: 25; 0 makes the local server compete for this machine's CPUs)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--endpoint", default=None, help="use this endpoint instead of starting a server")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 256, 1
    sw, sh = parse_resolution(args.source_size)
    res = parse_resolution(args.resolution)

    tmp = Path(tempfile.mkdtemp(prefix="asyncvae-bench-jobs-"))
    folder = tmp / "images"
    make_images(folder, args.images, (sw, sh))
    items = list_inputs(folder)
    tensors = [to_wire_tensor(load_image(i.path, res).pixels) for i in items]

    proc = None
    url = args.endpoint
    if url is None:
        proc, url = start_server(args)
    try:
        raws, jobs = [], []
        for r in range(args.rounds):
            raws.append(asyncio.run(raw_rate(url, tensors, args.concurrency)))
            jobs.append(asyncio.run(job_rate(url, folder, tmp / f"out{r}", args))[0])
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    raw, job = max(raws), max(jobs)
    result = {
        "images": args.images, "source_size": args.source_size, "resolution": args.resolution,
        "concurrency": args.concurrency, "replicas": args.replicas, "delay_ms": args.delay_ms,
        "cpus": os.cpu_count(), "raw_requests_per_s": round(raw, 1), "job_images_per_s": round(job, 1),
        "ratio": round(job / raw, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"images={args.images} {args.source_size} JPEG -> {args.resolution}, concurrency={args.concurrency}, "
              f"server replicas={args.replicas} delay={args.delay_ms}ms, {os.cpu_count()} CPUs")
        print(f"engine raw encode_many : {raw:8.1f} requests/s   (rounds: {', '.join(f'{x:.0f}' for x in raws)})")
        print(f"encode job end to end  : {job:8.1f} images/s     (rounds: {', '.join(f'{x:.0f}' for x in jobs)})")
        print(f"ratio job/raw          : {job / raw:8.2f}   (target >= 0.70)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
