"""Benchmark: does ``asyncvae loadtest`` tell the truth about a known endpoint?

Starts ``python -m asyncvae serve --delay-ms 20 --replicas 4`` (its own process;
``--cache`` and small images so that the server's compute doesn't blur the 20 ms
service time), whose capacity is 4 / 20 ms = 200 requests/s, then checks:

1. open loop at 100/s for 10 s: the achieved rate is within 2% of 100/s and
   p50 ≈ 20 ms ± 3 ms;
2. open loop at 400/s (twice the capacity): latency grows over the run (the queue
   builds up); the answered rate is printed for information;
3. ``--find-max --slo-p99 100``: lands within 15% of 200/s.

Prints PASS/FAIL lines (benchmark checks, not test assertions; a busy machine can
fail them) and exits 0 either way unless ``--strict``.

    python bench/bench_loadtest.py
    python bench/bench_loadtest.py --quick --json bench_loadtest.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncvae.loadtest import FindMaxSpec, LoadSpec, Report, run  # noqa: E402

LISTENING = "asyncvae serve: listening on "


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    """Start the reference server; returns the process and its URL."""
    cmd = [sys.executable, "-m", "asyncvae", "serve", "--port", "0", "--replicas", str(args.replicas),
           "--delay-ms", str(args.delay_ms)]
    if not args.no_cache:
        cmd.append("--cache")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not found and line.startswith(LISTENING):
                found.append(line[len(LISTENING):].strip())
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    ready.wait(120)
    if not found:
        proc.kill()
        raise SystemExit(f"server did not start: {' '.join(cmd)}")
    return proc, found[0]


def check(name: str, ok: bool, detail: str, results: list[dict[str, Any]]) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    results.append({"check": name, "ok": ok, "detail": detail})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", help="use this running endpoint instead of starting one")
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--no-cache", action="store_true", help="let the server compute every answer")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds at 100/s (default 10)")
    p.add_argument("--overload-duration", type=float, default=6.0, help="seconds at 400/s (default 6)")
    p.add_argument("--slo-p99", type=float, default=100.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="shorter runs (4 s / 3 s / 2 s steps)")
    p.add_argument("--json", help="write all reports and checks here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.overload_duration = 4.0, 3.0

    capacity = args.replicas * 1000.0 / args.delay_ms
    proc = None
    url = args.endpoint
    if url is None:
        proc, url = start_server(args)
    res = (args.resolution, args.resolution)
    results: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    t_all = time.perf_counter()
    print(f"endpoint {url}  (delay {args.delay_ms:g} ms × {args.replicas} replicas: capacity ≈ {capacity:.0f}/s; "
          f"cpus {os.cpu_count()})", flush=True)
    try:
        # 1. at half the capacity
        rep: Report = run(LoadSpec(url, rate=100, duration=args.duration, warmup=1.0, resolution=res,
                                   workers=args.workers))
        print(rep.text() + "\n", flush=True)
        reports["rate100"] = rep.data
        d = rep.data
        check("rate 100/s achieved within 2%", abs(rep.achieved_rate - 100) <= 2.0,
              f"answered {rep.achieved_rate:.2f}/s (sent {d['rate']['sent']:.2f}/s), errors {d['requests']['failed']}",
              results)
        check(f"p50 ≈ {args.delay_ms:g} ms ± 3 ms", abs(rep.p50_ms - args.delay_ms) <= 3.0,
              f"p50 {rep.p50_ms:.2f} ms, p99 {rep.p99_ms:.2f} ms, service p50 {d['service_ms']['p50']:.2f} ms, "
              f"late sends {d['schedule']['late']}", results)

        # 2. at twice the capacity
        rep = run(LoadSpec(url, rate=2 * capacity, duration=args.overload_duration, warmup=0.0, resolution=res,
                           workers=args.workers, interval=0.5))
        print(rep.text() + "\n", flush=True)
        reports["overload"] = rep.data
        d = rep.data
        tl = [iv for iv in d["timeline"] if iv["p50_ms"] is not None]
        q = d["queueing"]
        check(f"rate {2 * capacity:.0f}/s: queueing delay grows", bool(q["growing"]),
              f"p50 {q['first_p50_ms'] or 0:.0f} ms early → {q['last_p50_ms'] or 0:.0f} ms late; timeline p50s "
              + ", ".join(f"{iv['p50_ms']:.0f}" for iv in tl), results)
        print(f"INFO  overloaded endpoint answered {d['rate']['ok']:.1f}/s (nominal capacity {capacity:.0f}/s; "
              f"the rest is the server's own overhead on this machine)", flush=True)

        # 3. find-max
        fm = FindMaxSpec(slo_p99_ms=args.slo_p99, start_rate=25.0,
                         step_duration=2.0 if args.quick else 3.0, precision=0.04)
        rep = run(LoadSpec(url, find_max=fm, resolution=res, workers=args.workers))
        print(rep.text() + "\n", flush=True)
        reports["find_max"] = rep.data
        mr = rep.max_rate or 0.0
        check(f"find-max (p99 < {args.slo_p99:g} ms) within 15% of {capacity:.0f}/s",
              abs(mr - capacity) <= 0.15 * capacity,
              f"max rate {mr:.1f}/s after {len(rep.data['find_max']['steps'])} steps", results)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"total {time.perf_counter() - t_all:.0f} s; {sum(r['ok'] for r in results)}/{len(results)} checks passed")
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": results, "reports": reports}, indent=2))
    return 1 if args.strict and not all(r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
