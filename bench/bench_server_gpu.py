"""Dynamic batching on a GPU with a real VAE architecture: ``python bench/bench_server_gpu.py``.

Builds an ``AutoencoderKL`` with the SD (or Flux) architecture from its config with
random weights (no download), saves it with ``save_pretrained``, then for
``--max-batch 1`` (off) and ``--max-batch N`` (on), alternating ``--rounds`` times:
starts ``asyncvae serve --model DIR --device cuda --dtype fp16``, waits for
``GET /ready``, and drives it with ``asyncvae loadtest --concurrency C`` (closed loop,
non-coalescing: one latent per request). Prints images/s and latency of every run,
the medians and the ratio.

Issue 13's target: >= 1.4x images/s with batching than without (SD 512² decode).
Needs a CUDA GPU, torch with CUDA and diffusers; it was written on a CPU-only machine
and has not been run there (see the report of issue 13).

    python bench/bench_server_gpu.py                         # SD decode 512², fp16, batch 8
    python bench/bench_server_gpu.py --arch flux --resolution 1024 --max-batch 4
    python bench/bench_server_gpu.py --op encode --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LISTENING = "asyncvae serve: listening on "

#: AutoencoderKL architectures (the published configs, minus the weights).
ARCHS: dict[str, dict[str, Any]] = {
    "sd": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    ),
    "flux": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ),
}
#: A smoke test of this script's plumbing on a CPU (not a measurement):
#: --arch tiny --device cpu --dtype fp32 --resolution 128 --duration 2 --rounds 1
ARCHS["tiny"] = dict(
    latent_channels=4, block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, sample_size=64,
)
PRESET = {"sd": "sd", "flux": "flux", "tiny": "sd"}


def build_model(arch: str, folder: str) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**ARCHS[arch]).save_pretrained(folder)


def serve(args: argparse.Namespace, folder: str, max_batch: int) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "asyncvae", "serve", "--port", "0", "--model", folder,
           "--device", args.device, "--dtype", args.dtype, "--replicas", str(args.replicas),
           "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(LISTENING):
            url = line[len(LISTENING):].strip()
            break
    else:
        raise RuntimeError(f"server did not start: {' '.join(cmd)}")
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(url + "ready", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except urllib.error.HTTPError as e:
            if e.code != 503 or json.load(e).get("status") == "failed":
                raise RuntimeError(f"model failed to load: {e}") from None
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the server never became ready")
        time.sleep(0.5)


def loadtest(args: argparse.Namespace, url: str, out: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "asyncvae", "loadtest", url, "--op", args.op,
           "--preset", PRESET[args.arch], "--resolution", f"{args.resolution}x{args.resolution}",
           "--concurrency", str(args.concurrency), "--duration", f"{args.duration}s",
           "--warmup", f"{args.warmup}s", "--quiet", "--json", out]
    if args.op == "decode":
        cmd += ["--output", "pt-uint8"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    with open(out) as f:
        return dict(json.load(f))


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "stats", timeout=10) as r:
        return dict(json.load(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd", help="AutoencoderKL architecture (default: sd)")
    p.add_argument("--op", choices=("decode", "encode"), default="decode")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (default: 512)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32 (default: fp16)")
    p.add_argument("--replicas", type=int, default=2, help="replica slots (default: 2)")
    p.add_argument("--max-batch", type=int, default=8, help="batching setting compared with 1 (default: 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="(default: 5)")
    p.add_argument("--concurrency", type=int, default=64, help="loadtest closed-loop clients (default: 64)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default: 20)")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per run (default: 5)")
    p.add_argument("--rounds", type=int, default=2, help="runs per setting, alternating (default: 2)")
    p.add_argument("--json", metavar="FILE", help="also write every figure here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, f"vae-{args.arch}")
        build_model(args.arch, folder)
        print(f"{args.arch} AutoencoderKL (random init) {args.op} {args.resolution}², {args.dtype} on {args.device}, "
              f"{args.replicas} slot(s), {args.concurrency} clients, {args.duration:g} s per run", flush=True)
        runs: dict[int, list[dict[str, Any]]] = {1: [], args.max_batch: []}
        for r in range(args.rounds):
            for mb in (1, args.max_batch):
                proc, url = serve(args, folder, mb)
                try:
                    data = loadtest(args, url, os.path.join(tmp, f"lt-{mb}-{r}.json"))
                    sizes = stats(url)["batch_sizes"]
                finally:
                    proc.terminate()
                    proc.wait(60)
                res = {"images_per_s": data["rate"]["ok"],
                       "p50_ms": data["latency_ms"]["p50"], "p99_ms": data["latency_ms"]["p99"],
                       "error_rate": data["error_rate"], "batch_sizes": sizes}
                runs[mb].append(res)
                print(f"round {r + 1} max-batch {mb}: {res['images_per_s']:.1f} images/s, p50 {res['p50_ms']:.1f} ms, "
                      f"p99 {res['p99_ms']:.1f} ms, errors {res['error_rate']:.2%}, batches {sizes}", flush=True)
        med = {mb: statistics.median(x["images_per_s"] for x in rs) for mb, rs in runs.items()}
        ratio = med[args.max_batch] / med[1]
        print(f"median images/s: max-batch 1 {med[1]:.1f}, max-batch {args.max_batch} {med[args.max_batch]:.1f}")
        print(f"ratio: {ratio:.2f}x — target >= 1.4x: {'PASS' if ratio >= 1.4 else 'FAIL'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "runs": runs, "median_images_per_s": med, "ratio": ratio}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
