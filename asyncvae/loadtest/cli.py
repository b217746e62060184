"""``asyncvae loadtest``: honest latency of an endpoint at a fixed arrival rate, and
``asyncvae loadtest merge`` to combine runs from several machines.

Exit status: 0 when the run finished and every ``--threshold`` held, 3 when a
threshold failed, 130 when the run was interrupted (Ctrl-C; the report and
``--json`` are still written, marked interrupted), 1 on an error, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .._argtypes import positive_float as _positive_float
from .._argtypes import positive_int as _positive_int
from .._resolution import parse_resolution
from ..config import Retry
from ..errors import InputError
from .merge import load_report, merge_reports
from .plot import check_plot_available, write_plot
from .progress import ProgressBar
from .report import Report, parse_threshold
from .runner import run
from .spec import (
    OUTPUTS,
    PRESETS,
    RESOLUTION_MULTIPLE,
    FindMaxSpec,
    LoadSpec,
    Warmup,
    load_mix,
    parse_duration,
    parse_ramp,
    parse_start_at,
    parse_warmup,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_THRESHOLD", "EXIT_USAGE", "add_arguments", "main", "register", "spec_from_args"]

#: Exit status when a ``--threshold`` fails.
EXIT_THRESHOLD = 3
#: Exit status of a run stopped by Ctrl-C (its report is still written).
EXIT_INTERRUPTED = 130
#: Exit status of bad usage.
EXIT_USAGE = 2

EPILOG = """\
examples:
  asyncvae loadtest http://127.0.0.1:8000/ --rate 100 --duration 10s --warmup 2s
  asyncvae loadtest URL --preset sdxl --output jpg --ramp 10:5s,10-100:20s,100:10s
  asyncvae loadtest URL --concurrency 8 --requests 2000 --warmup 100req
  asyncvae loadtest URL --find-max --slo-p99 250
  asyncvae loadtest URL --rate 50 --duration 30s --threshold 'p99<250ms' --threshold 'errors<1%' --json out.json
  asyncvae loadtest URL --mix mix.toml --rate 20 --duration 1h --interval 10s --hlog run.hlog --hgrm run.hgrm

several machines (same command on each, then merge the JSON files):
  asyncvae loadtest URL --rate 500 --duration 5m --start-at 14:30:00 --json host-a.json
  asyncvae loadtest merge host-a.json host-b.json --json all.json --hgrm all.hgrm

Open-loop latency counts from when each request was scheduled (coordinated-omission
corrected, like wrk2). Exit status: 0 ok, 3 a --threshold failed, 130 interrupted
(report still written), 1 error, 2 bad usage."""


def _wrap(fn: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            return fn(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = fn.__name__
    return parse


def _resolution(text: str) -> Any:
    return parse_resolution(text, multiple=RESOLUTION_MULTIPLE)


def _request_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request (built once, sent every time)")
    g.add_argument("--op", choices=("decode", "encode"), default="decode", help="default: decode")
    g.add_argument("--preset", choices=tuple(PRESETS), default="sd",
                   help="latent shape/dtype/scaling of a model family (default: sd = [1,4,64,64] fp16)")
    g.add_argument("--resolution", type=_wrap(_resolution), metavar="WxH",
                   help="image size in pixels, width x height, or one number for a square "
                        "(default: the preset's, e.g. 512 for sd)")
    g.add_argument("--frames", type=_positive_int, help="video frames, 4k+1 (hunyuan-video; default 61)")
    g.add_argument("--batch", type=_positive_int, default=1, help="latents per request (default: 1)")
    g.add_argument("--output", choices=OUTPUTS, default="pt-uint8",
                   help="decode answer: pt (float tensor), pt-uint8 (partial_postprocess), jpg, png, mp4 "
                        "(default: pt-uint8)")
    g.add_argument("--latent", metavar="FILE", help="send this .pt/.safetensors latent instead of random ones")
    g.add_argument("--scaling-factor", type=float, help="override the preset's scaling factor")
    g.add_argument("--shift-factor", type=float, help="override the preset's shift factor")
    g.add_argument("--mix", metavar="FILE", type=_wrap(load_mix),
                   help="several kinds of request with weights, from a TOML ([[request]] tables) or JSON file; "
                        "keys: weight, name, op, preset, resolution, batch, frames, output, latent, "
                        "scaling_factor, shift_factor (replaces the request flags above)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random latents and poisson arrivals")


def _load_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load model (pick one)")
    m = g.add_mutually_exclusive_group()
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
                   help="measured run length, e.g. 30s, 2m (after the warm-up); cuts a --ramp short")
    g.add_argument("--requests", type=_positive_int, metavar="N", help="measured requests to send")
    g.add_argument("--warmup", type=_wrap(parse_warmup), default=Warmup(), metavar="DUR|Nreq",
                   help="warm-up before measuring, left out of every figure: a duration (2s, 500ms) or a "
                        "request count (50req); an open-loop warm-up replays the start of the schedule")
    g.add_argument("--start-at", type=_wrap(parse_start_at), metavar="TIME",
                   help="start the schedule at this wall-clock time, so runs on several machines line up "
                        "for `loadtest merge`: 14:30:00 (local, today), 2025-06-01T14:30:00Z, Unix seconds, "
                        "or +30s")


def _find_max_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("find-max")
    g.add_argument("--slo-p99", type=_positive_float, metavar="MS", help="p99 latency objective in ms")
    g.add_argument("--max-error-rate", type=float, default=0.01, metavar="F",
                   help="highest error fraction a passing step may have (default: 0.01)")
    g.add_argument("--start-rate", type=_positive_float, default=10.0, help="first step's rate (default: 10/s)")
    g.add_argument("--step-duration", type=_wrap(parse_duration), default=3.0, metavar="DUR",
                   help="shortest measured length of a step (default: 3s; longer for --min-samples and for "
                        "3 SLOs)")
    g.add_argument("--min-samples", type=_positive_int, default=100, metavar="N",
                   help="a step lasts long enough for N answers at its rate (default: 100)")
    g.add_argument("--precision", type=_positive_float, default=0.05,
                   help="stop bisecting when the bracket is this narrow, relative (default: 0.05)")
    g.add_argument("--no-confirm", action="store_true",
                   help="run each step once (default: twice, passing and failing alike, a third time when they "
                        "disagree)")
    g.add_argument("--final-duration", type=_wrap(parse_duration), metavar="DUR",
                   help="length of the final confirmation run at the found rate (default: 3 steps)")


def _sending_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sending")
    g.add_argument("--workers", type=_positive_int, default=1,
                   help="generator processes, each with rate/N and its own event loop (default: 1)")
    g.add_argument("--max-inflight", type=_positive_int, default=10_000,
                   help="open-loop cap on requests in flight per worker (default: 10000; also capped by the "
                        "file-descriptor limit, which is raised to its hard limit first); sends over it wait, "
                        "are counted as capped and still measured from their schedule")
    g.add_argument("--timeout", type=_positive_float, default=60.0,
                   help="seconds per attempt (default: 60); a timeout's age counts as a latency lower bound")
    g.add_argument("--retries", type=int, default=0, metavar="N",
                   help="retry failed attempts N times with the client's policy, asyncvae.Retry(attempts=N+1): "
                        "backoff, Retry-After, 503 patience (default 0: count what the endpoint really did)")
    g.add_argument("--unavailable-patience", type=float, metavar="S",
                   help="with --retries: keep retrying 503 answers this many seconds beyond N (default: "
                        "Retry's 120; 0 treats 503 like any other status)")
    g.add_argument("--token", help="bearer token (default: $HF_TOKEN); never printed")
    g.add_argument("--header", action="append", default=[], metavar="K:V", help="extra request header")
    g.add_argument("--late-ms", type=float, default=5.0,
                   help="a send this much after its scheduled time counts as late (default: 5)")


def _output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output (also for `merge`)")
    g.add_argument("--quiet", "-q", action="store_true", help="no live progress line on stderr")
    g.add_argument("--json", metavar="FILE", help="write every figure as JSON ('-' for stdout); `merge` reads these")
    g.add_argument("--hgrm", metavar="FILE", help="latency percentile distribution in HdrHistogram's .hgrm format "
                                                  "(FILE: from the schedule; FILE stem + .service.hgrm: from the send)")
    g.add_argument("--hlog", metavar="FILE", help="per-interval histograms as an HdrHistogram interval log (.hlog, "
                                                  "for HistogramLogAnalyzer), tagged latency and service")
    g.add_argument("--interval", type=_wrap(parse_duration), default=1.0, metavar="DUR",
                   help="timeline interval (default: 1s); use 10s or 1m for runs of hours")
    g.add_argument("--plot", metavar="FILE.png", help="latency over time (corrected and uncorrected), sent/ok/errors "
                                                      "per interval, and percentiles (needs matplotlib)")
    g.add_argument("--threshold", action="append", default=[], type=_wrap(parse_threshold), metavar="EXPR",
                   help="fail (exit 3) unless EXPR holds, e.g. 'p99<250ms', 'errors<1%%', 'rate>95'; repeatable; "
                        "a latency threshold fails when there is no data")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``loadtest`` options to ``p``."""
    p.add_argument("target", nargs="+", metavar="URL",
                   help="endpoint URL, e.g. http://127.0.0.1:8000/ — or `merge A.json B.json ...` to combine "
                        "--json reports of runs on several machines into one")
    _request_arguments(p)
    _load_arguments(p)
    _find_max_arguments(p)
    _sending_arguments(p)
    _output_arguments(p)


def _find_max_spec(args: argparse.Namespace) -> FindMaxSpec | None:
    if not args.find_max:
        if args.slo_p99 is not None:
            raise InputError("--slo-p99 applies to --find-max (for a pass/fail check use --threshold 'p99<MS')")
        return None
    if args.slo_p99 is None:
        raise InputError("--find-max needs --slo-p99 MS (the p99 latency objective)")
    return FindMaxSpec(
        slo_p99_ms=args.slo_p99, max_error_rate=args.max_error_rate, start_rate=args.start_rate,
        step_duration=args.step_duration, precision=args.precision, min_samples=args.min_samples,
        confirm=not args.no_confirm, final_duration=args.final_duration,
    )


def _headers(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    headers = []
    for h in args.header:
        k, sep, v = h.partition(":")
        if not sep or not k.strip():
            raise InputError(f"bad --header {h!r}; use NAME:VALUE")
        headers.append((k.strip(), v.strip()))
    return tuple(headers)


def _retry(args: argparse.Namespace) -> Retry | None:
    if args.retries < 0:
        raise InputError("--retries must be >= 0")
    if args.unavailable_patience is not None and not args.retries:
        raise InputError("--unavailable-patience applies to --retries N")
    if not args.retries:
        return None
    kw = {} if args.unavailable_patience is None else {"unavailable_patience": args.unavailable_patience}
    return Retry(attempts=args.retries + 1, **kw)


def _request_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.mix:
        given = [f"--{n}" for n in ("resolution", "frames", "latent", "scaling_factor", "shift_factor")
                 if getattr(args, n) is not None]
        given += [f"--{n}" for n, d in (("op", "decode"), ("preset", "sd"), ("batch", 1), ("output", "pt-uint8"))
                  if getattr(args, n) != d]
        if given:
            raise InputError(f"--mix replaces {', '.join(given)}: put them in the mix file")
        return {"mix": args.mix}
    return {"op": args.op, "preset": args.preset, "resolution": args.resolution, "frames": args.frames,
            "batch": args.batch, "output": args.output, "latent": args.latent,
            "scaling_factor": args.scaling_factor, "shift_factor": args.shift_factor}


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    """The :class:`LoadSpec` of parsed ``loadtest`` arguments."""
    if len(args.target) != 1:
        raise InputError("give one endpoint URL (to combine reports: asyncvae loadtest merge A.json B.json ...)")
    return LoadSpec(
        url=args.target[0], **_request_fields(args), seed=args.seed,
        rate=args.rate, stages=args.ramp or (), concurrency=args.concurrency, find_max=_find_max_spec(args),
        arrival=args.arrival, duration=args.duration, requests=args.requests,
        warmup=args.warmup.seconds, warmup_requests=args.warmup.requests, start_at=args.start_at,
        workers=args.workers, max_inflight=args.max_inflight, timeout=args.timeout, retry=_retry(args),
        token=args.token if args.token is not None else (os.environ.get("HF_TOKEN") or None),
        headers=_headers(args), late_ms=args.late_ms, interval=args.interval,
    )


def _write_outputs(report: Report, args: argparse.Namespace) -> None:
    if args.json == "-":
        print(report.to_json())
    else:
        print(report.text())
        if args.json:
            report.write_json(args.json)
    if args.hgrm:
        report.write_hgrm(args.hgrm)
    if args.hlog:
        report.write_hlog(args.hlog)
    if args.plot:
        write_plot(report, args.plot)


def _exit_status(report: Report) -> int:
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.passed else EXIT_THRESHOLD


def _merge_main(args: argparse.Namespace) -> int:
    files = args.target[1:]
    if len(files) < 2:
        raise InputError("merge needs two or more --json reports: asyncvae loadtest merge A.json B.json ...")
    report = merge_reports([load_report(f) for f in files], names=files, thresholds=args.threshold)
    _write_outputs(report, args)
    return 0 if report.passed else EXIT_THRESHOLD


def main(args: argparse.Namespace) -> int:
    """Run ``asyncvae loadtest`` (or ``loadtest merge``); returns the exit status."""
    if args.plot:
        check_plot_available()  # fail before the load, not after
    if args.target[0] == "merge":
        return _merge_main(args)
    try:
        spec = spec_from_args(args)
    except InputError as e:
        print(f"asyncvae loadtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    progress = None if args.quiet or args.json == "-" else ProgressBar(sys.stderr)
    try:
        report = run(spec, thresholds=args.threshold, progress=progress, handle_signals=True)
    finally:
        if progress is not None:
            progress.close()
    _write_outputs(report, args)
    return _exit_status(report)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``loadtest`` subcommand to the ``asyncvae`` CLI."""
    p = subparsers.add_parser(
        "loadtest",
        help="measure an endpoint's throughput and tail latency at a fixed rate",
        description=(
            "Load-test a remote VAE endpoint. Open loop (--rate/--ramp) sends on a fixed schedule "
            "and measures latency from each request's scheduled time, so queueing delay is not "
            "hidden (coordinated omission); closed loop (--concurrency) is there for comparison. "
            "`asyncvae loadtest merge A.json B.json ...` combines the --json reports of runs on "
            "several machines (histograms merged exactly)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)
    return p
