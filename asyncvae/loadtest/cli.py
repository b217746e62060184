"""``asyncvae loadtest``: honest latency of an endpoint at a fixed arrival rate.

Exit status: 0 when the run finished and every ``--threshold`` held, 3 when a
threshold failed, 1 on an error, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from .._argtypes import positive_float as _positive_float
from .._argtypes import positive_int as _positive_int
from ..errors import InputError
from .report import check_plot_available, parse_threshold, write_plot
from .runner import run
from .spec import OUTPUTS, PRESETS, FindMaxSpec, LoadSpec, parse_duration, parse_ramp, parse_warmup

__all__ = ["EXIT_THRESHOLD", "add_arguments", "main", "register", "spec_from_args"]

#: Exit status when a ``--threshold`` fails.
EXIT_THRESHOLD = 3

EPILOG = """\
examples:
  asyncvae loadtest http://127.0.0.1:8000/ --rate 100 --duration 10s
  asyncvae loadtest URL --preset sdxl --output jpg --ramp 10:5s,10-100:20s,100:10s
  asyncvae loadtest URL --concurrency 8 --requests 2000 --warmup 100
  asyncvae loadtest URL --find-max --slo-p99 250
  asyncvae loadtest URL --rate 50 --duration 30s --threshold 'p99<250ms' --threshold 'errors<1%' --json out.json

Open-loop latency counts from when each request was scheduled (coordinated-omission
corrected, like wrk2). Exit status 3 when a --threshold fails."""




def _wrap(fn: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = fn.__name__
    return parse


def _resolution(text: str) -> tuple[int, int]:
    """``1024`` (square) or ``WIDTHxHEIGHT`` → (height, width)."""
    t = text.lower().replace("*", "x")
    try:
        if "x" in t:
            w, h = (int(v) for v in t.split("x", 1))
        else:
            w = h = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad resolution {text!r}; use e.g. 1024 or 768x512 (WxH)") from None
    return h, w


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``loadtest`` options to ``p``."""
    p.add_argument("url", help="endpoint URL, e.g. http://127.0.0.1:8000/ or https://xxx.endpoints.huggingface.cloud/")
    g = p.add_argument_group("request (built once, sent every time)")
    g.add_argument("--op", choices=("decode", "encode"), default="decode", help="default: decode")
    g.add_argument("--preset", choices=tuple(PRESETS), default="sd",
                   help="latent shape/dtype/scaling of a model family (default: sd = [1,4,64,64] fp16)")
    g.add_argument("--resolution", type=_resolution, metavar="WxH",
                   help="image size in pixels (default: the preset's, e.g. 512 for sd)")
    g.add_argument("--frames", type=_positive_int, help="video frames, 4k+1 (hunyuan-video; default 61)")
    g.add_argument("--batch", type=_positive_int, default=1, help="latents per request (default: 1)")
    g.add_argument("--output", choices=OUTPUTS, default="pt-uint8",
                   help="decode answer: pt (float tensor), pt-uint8 (partial_postprocess), jpg, png, mp4 "
                        "(default: pt-uint8)")
    g.add_argument("--latent", metavar="FILE", help="send this .pt/.safetensors latent instead of random ones")
    g.add_argument("--scaling-factor", type=float, help="override the preset's scaling factor")
    g.add_argument("--shift-factor", type=float, help="override the preset's shift factor")
    g.add_argument("--seed", type=int, default=0, help="seed of the random latents and poisson arrivals")

    g = p.add_argument_group("load model (pick one)")
    m = g.add_mutually_exclusive_group(required=True)
    m.add_argument("--rate", type=_positive_float, metavar="R",
                   help="open loop: R requests per second, sent on schedule whatever is in flight")
    m.add_argument("--ramp", type=_wrap(parse_ramp), metavar="STAGES",
                   help="open loop with stages: RATE:DUR holds, FROM-TO:DUR ramps linearly, "
                        "e.g. 50:5s,50-200:20s,200:10s")
    m.add_argument("--concurrency", type=_positive_int, metavar="C",
                   help="closed loop: C requests always in flight (hides queueing delay; for comparison)")
    m.add_argument("--find-max", action="store_true",
                   help="search the highest rate whose p99 stays under --slo-p99 (needs --slo-p99)")
    g.add_argument("--arrival", choices=("uniform", "poisson"), default="uniform",
                   help="open-loop spacing: evenly spaced (default) or poisson")
    g.add_argument("--duration", type=_wrap(parse_duration), metavar="DUR",
                   help="measured run length, e.g. 30s, 2m (after the warm-up)")
    g.add_argument("--requests", type=_positive_int, metavar="N", help="measured requests to send")
    g.add_argument("--warmup", type=_wrap(parse_warmup), default=0.0, metavar="DUR|N",
                   help="warm-up before measuring: seconds with a unit (2s) or a request count (50)")

    g = p.add_argument_group("find-max")
    g.add_argument("--slo-p99", type=_positive_float, metavar="MS", help="p99 latency objective in ms")
    g.add_argument("--max-error-rate", type=float, default=0.01, metavar="F",
                   help="highest error fraction a passing step may have (default: 0.01)")
    g.add_argument("--start-rate", type=_positive_float, default=10.0, help="first step's rate (default: 10/s)")
    g.add_argument("--step-duration", type=_wrap(parse_duration), default=3.0, metavar="DUR",
                   help="measured length of each step (default: 3s)")
    g.add_argument("--precision", type=_positive_float, default=0.05,
                   help="stop bisecting when the bracket is this narrow, relative (default: 0.05)")

    g = p.add_argument_group("sending")
    g.add_argument("--workers", type=_positive_int, default=1,
                   help="generator processes, each with rate/N and its own event loop (default: 1)")
    g.add_argument("--max-inflight", type=_positive_int, default=10_000,
                   help="open-loop safety cap on requests in flight per worker (default: 10000)")
    g.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds per attempt (default: 60)")
    g.add_argument("--retries", type=int, default=0, metavar="N",
                   help="retry failed attempts N times (default 0: count what the endpoint really did)")
    g.add_argument("--token", help="bearer token (default: $HF_TOKEN); never printed")
    g.add_argument("--header", action="append", default=[], metavar="K:V", help="extra request header")
    g.add_argument("--late-ms", type=float, default=5.0,
                   help="a send this much after its scheduled time counts as late (default: 5)")

    g = p.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", help="no live progress line on stderr")
    g.add_argument("--json", metavar="FILE", help="write every figure as JSON ('-' for stdout)")
    g.add_argument("--plot", metavar="FILE.png", help="latency over time + percentile plot (needs matplotlib)")
    g.add_argument("--threshold", action="append", default=[], type=_wrap(parse_threshold), metavar="EXPR",
                   help="fail (exit 3) unless EXPR holds, e.g. 'p99<250ms', 'errors<1%%', 'rate>95'; repeatable")


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """The :class:`LoadSpec` of parsed ``loadtest`` arguments."""
    find_max = None
    if args.find_max:
        if args.slo_p99 is None:
            raise InputError("--find-max needs --slo-p99 MS (the p99 latency objective)")
        find_max = FindMaxSpec(
            slo_p99_ms=args.slo_p99, max_error_rate=args.max_error_rate, start_rate=args.start_rate,
            step_duration=args.step_duration, precision=args.precision,
        )
    elif args.slo_p99 is not None:
        raise InputError("--slo-p99 applies to --find-max (for a pass/fail check use --threshold 'p99<MS')")
    headers = []
    for h in args.header:
        k, sep, v = h.partition(":")
        if not sep or not k.strip():
            raise InputError(f"bad --header {h!r}; use NAME:VALUE")
        headers.append((k.strip(), v.strip()))
    if args.retries < 0:
        raise InputError("--retries must be >= 0")
    return LoadSpec(
        url=args.url, op=args.op, preset=args.preset, resolution=args.resolution, frames=args.frames,
        batch=args.batch, output=args.output, latent=args.latent, scaling_factor=args.scaling_factor,
        shift_factor=args.shift_factor, rate=args.rate, stages=args.ramp or (), concurrency=args.concurrency,
        find_max=find_max, arrival=args.arrival, seed=args.seed, duration=args.duration,
        requests=args.requests, warmup=args.warmup, workers=args.workers, max_inflight=args.max_inflight,
        timeout=args.timeout, retries=args.retries,
        token=args.token if args.token is not None else (os.environ.get("HF_TOKEN") or None),
        headers=tuple(headers), late_ms=args.late_ms,
    )


class ProgressLine:
    """A one-line live status on a stream (rewritten in place on a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_print = -1e9
        self.width = 0

    def __call__(self, s: dict[str, Any]) -> None:
        el = s.get("elapsed", 0.0)
        if not self.tty and el - self.last_print < 5.0:
            return
        self.last_print = el
        tgt = f" target {s['target']:.1f}/s" if s.get("target") else ""
        phase = f"{s['phase']} " if s.get("phase") else ""
        line = (
            f"{phase}[{el:6.1f}s]{tgt} sent {s['sent']} ok {s['ok']} err {s['failed']} "
            f"in-flight {s['in_flight']} late {s['late']} p50 {s['p50_us'] / 1000:.1f}ms "
            f"p99 {s['p99_us'] / 1000:.1f}ms"
        )
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def main(args: argparse.Namespace) -> int:
    """Run ``asyncvae loadtest``; returns the exit status."""
    spec = spec_from_args(args)
    if args.plot:
        check_plot_available()  # fail before the load, not after
    progress = None if args.quiet else ProgressLine(sys.stderr)
    try:
        report = run(spec, thresholds=args.threshold, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if args.json == "-":
        print(report.to_json())
    else:
        print(report.text())
        if args.json:
            report.write_json(args.json)
    if args.plot:
        write_plot(report, args.plot)
    return 0 if report.passed else EXIT_THRESHOLD


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``loadtest`` subcommand to the ``asyncvae`` CLI."""
    p = subparsers.add_parser(
        "loadtest",
        help="measure an endpoint's throughput and tail latency at a fixed rate",
        description=(
            "Load-test a remote VAE endpoint. Open loop (--rate/--ramp) sends on a fixed schedule "
            "and measures latency from each request's scheduled time, so queueing delay is not "
            "hidden (coordinated omission); closed loop (--concurrency) is there for comparison."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)
    return p
