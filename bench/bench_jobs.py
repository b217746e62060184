"""Benchmark: ``asyncvae encode`` end to end vs. the engine's raw request rate (issue 11).

Every job runs as the CLI does (``python -m asyncvae encode ... --json``, its own
process; the rate is the job's own ``processed / seconds``), against the reference
server in its own process. Scenarios, each a ratio taken in one run:

- ``A`` remote-like endpoint (``--delay-ms 25``, 4 replicas): job images/s over the raw
  ``Client.encode_many`` requests/s on the same preprocessed images, same concurrency
  (target >= 0.90);
- ``B`` the same endpoint, second run of an extended dataset: encode N images, add
  N/4, run again; new images/s of that run over the raw rate (target >= 0.95);
- ``C`` zero-latency endpoint: the job is bound by image decoding and resizing; its
  images/s over the same job on the code before issue 11 (``--baseline-src DIR``, a
  checkout of main before this branch; target >= 2.0), raw rate for reference;
- ``D`` peak RSS (job process and its workers, sampled) of a 1,000- and a 5,000-image
  job (target: within 10%).

Figures are medians of ``--rounds`` rounds. Client, server and preprocessing share the
machine's CPUs, so run it on a quiet machine::

    git archive 2f4aec9 | (mkdir -p /tmp/asyncvae-main && tar -x -C /tmp/asyncvae-main)
    python bench/bench_jobs.py --baseline-src /tmp/asyncvae-main            # ~5 min on 2 cores
    python bench/bench_jobs.py --quick --baseline-src /tmp/asyncvae-main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncvae  # noqa: E402
from asyncvae.jobs import list_inputs, load_image, parse_resolution, to_wire_tensor  # noqa: E402
from asyncvae.jobs.demo import make_image  # noqa: E402
from asyncvae.jobs.endpoint import make_client  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _serve import Server  # noqa: E402


def start_server(replicas: int, delay_ms: float) -> Server:
    return Server(["--replicas", str(replicas), "--delay-ms", str(delay_ms)])


def make_images(folder: Path, start: int, n: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
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


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_job(src: Path, folder: Path, out: Path, url: str, args: argparse.Namespace, *, overwrite: bool = True,
            extra: tuple[str, ...] = ()) -> dict:
    """One ``asyncvae encode`` process; returns its JSON summary plus ``peak_rss``."""
    cmd = [sys.executable, "-m", "asyncvae", "encode", str(folder), "--out", str(out), "--endpoint", url,
           "--resolution", args.resolution, "--concurrency", str(args.concurrency), "--shard-size",
           str(args.shard_size), "--json", "-q", *extra]
    if overwrite:
        cmd.append("--overwrite")
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.05)
    out_text, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}): {err[-2000:]}")
    summary = json.loads(out_text.strip().splitlines()[-1])
    summary["peak_rss"] = peak
    summary["rate"] = summary["processed"] / summary["seconds"] if summary["seconds"] else 0.0
    return summary


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images, one round, no 5,000-image RSS run")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--source-size", default="640x480", help="generated JPEG size WxH")
    ap.add_argument("--resolution", default="256")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-src", default=None, help="checkout of the code to compare scenario C against")
    ap.add_argument("--scenarios", default="ABCD")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 512, 1
    sw, sh = parse_resolution(args.source_size)
    res = parse_resolution(args.resolution)
    tmp = Path(tempfile.mkdtemp(prefix="asyncvae-bench-jobs-"))
    folder = tmp / "images"
    make_images(folder, 0, args.images, (sw, sh))
    tensors = [to_wire_tensor(load_image(i.path, res).pixels) for i in list_inputs(folder)]
    result: dict = {"images": args.images, "source_size": args.source_size, "resolution": args.resolution,
                    "concurrency": args.concurrency, "replicas": args.replicas, "rounds": args.rounds,
                    "cpus": len(os.sched_getaffinity(0))}
    try:
        if "A" in args.scenarios or "B" in args.scenarios:
            srv = start_server(args.replicas, 25.0)
            url = srv.url
            try:
                raws, jobs, ext = [], [], []
                for r in range(args.rounds):
                    raws.append(asyncio.run(raw_rate(url, tensors, args.concurrency)))
                    if "A" in args.scenarios:
                        jobs.append(run_job(ROOT, folder, tmp / "outA", url, args)["rate"])
                    if "B" in args.scenarios:
                        grow = tmp / f"grow{r}"
                        shutil.copytree(folder, grow)
                        run_job(ROOT, grow, tmp / f"outB{r}", url, args)
                        make_images(grow, args.images, args.images // 4, (sw, sh))
                        s = run_job(ROOT, grow, tmp / f"outB{r}", url, args, overwrite=False)
                        assert s["sent"] == args.images // 4, s
                        ext.append(s["sent"] / s["seconds"])
                        shutil.rmtree(grow)
                result["A_raw_requests_per_s"] = round(med(raws), 1)
                if jobs:
                    result["A_job_images_per_s"] = round(med(jobs), 1)
                    result["A_ratio"] = round(med(jobs) / med(raws), 3)
                if ext:
                    result["B_extended_new_images_per_s"] = round(med(ext), 1)
                    result["B_ratio"] = round(med(ext) / med(raws), 3)
            finally:
                srv.stop()
        if "C" in args.scenarios:
            srv = start_server(args.replicas, 0.0)
            url = srv.url
            try:
                raws, jobs, base = [], [], []
                for _ in range(args.rounds):
                    raws.append(asyncio.run(raw_rate(url, tensors, args.concurrency)))
                    jobs.append(run_job(ROOT, folder, tmp / "outC", url, args)["rate"])
                    if args.baseline_src:
                        base.append(run_job(Path(args.baseline_src), folder, tmp / "outC0", url, args)["rate"])
                result["C_raw_requests_per_s"] = round(med(raws), 1)
                result["C_job_images_per_s"] = round(med(jobs), 1)
                result["C_job_over_raw"] = round(med(jobs) / med(raws), 3)
                if base:
                    result["C_baseline_images_per_s"] = round(med(base), 1)
                    result["C_ratio_over_baseline"] = round(med(jobs) / med(base), 3)
            finally:
                srv.stop()
        if "D" in args.scenarios:
            srv = start_server(args.replicas, 0.0)
            url = srv.url
            try:
                small = tmp / "rss"
                sizes = (1000, 5000) if not args.quick else (500, 2000)
                make_images(small, 0, sizes[1], (256, 192))
                peaks = {}
                for n in sizes:
                    sub = tmp / f"rss{n}"
                    sub.mkdir()
                    for p in sorted(small.iterdir())[:n]:
                        os.link(p, sub / p.name)
                    rss_args = argparse.Namespace(**{**vars(args), "resolution": "128"})
                    peaks[n] = run_job(ROOT, sub, tmp / f"outD{n}", url, rss_args)["peak_rss"]
                result["D_peak_rss_mb"] = {str(n): round(v / 2**20, 1) for n, v in peaks.items()}
                result["D_ratio"] = round(peaks[sizes[1]] / peaks[sizes[0]], 3)
            finally:
                srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"images={args.images} {args.source_size} JPEG -> {args.resolution}, concurrency={args.concurrency}, "
          f"replicas={args.replicas}, {result['cpus']} CPUs, median of {args.rounds} round(s)")
    rows = [
        ("A raw encode_many, 25 ms endpoint", "A_raw_requests_per_s", "req/s", None),
        ("A encode job, 25 ms endpoint", "A_job_images_per_s", "img/s", None),
        ("A ratio job/raw (target >= 0.90)", "A_ratio", "", 0.90),
        ("B extended re-run, new images", "B_extended_new_images_per_s", "img/s", None),
        ("B ratio new/raw (target >= 0.95)", "B_ratio", "", 0.95),
        ("C raw encode_many, 0 ms endpoint", "C_raw_requests_per_s", "req/s", None),
        ("C encode job, 0 ms endpoint", "C_job_images_per_s", "img/s", None),
        ("C baseline job (before issue 11)", "C_baseline_images_per_s", "img/s", None),
        ("C ratio over baseline (target >= 2)", "C_ratio_over_baseline", "", 2.0),
        ("D peak RSS by images (MB)", "D_peak_rss_mb", "", None),
        ("D ratio large/small (target <= 1.10)", "D_ratio", "", -1.10),
    ]
    for label, key, unit, target in rows:
        if key not in result:
            continue
        v = result[key]
        verdict = ""
        if target is not None:
            ok = v >= target if target > 0 else v <= -target
            verdict = "PASS" if ok else "FAIL"
        print(f"{label:40s}: {v} {unit} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
