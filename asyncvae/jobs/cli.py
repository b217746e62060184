"""``asyncvae encode`` and ``asyncvae decode``: dataset jobs from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._argtypes import bounded
from .._argtypes import nonneg_int as _nonneg_int
from .._argtypes import positive_int as _positive_int
from ..config import Retry, Timeout
from ..errors import InputError
from .accounting import JobSummary
from .decode import decode_dataset
from .encode import encode_dataset
from .endpoint import BUILTIN, JobAborted
from .formats import FORMATS
from .preprocess import ALPHA_MODES, CROP_MODES, DEFAULT_MAX_PIXELS, RESAMPLE, WIRE_DTYPES
from .settings import IMAGE_FORMATS, LATENT_DTYPES

__all__ = ["decode_main", "encode_main", "register"]

_rate = bounded(float, low=0, high=1, noun="a rate")

#: Exit status when the job ran but some items failed (without --allow-failures).
EXIT_FAILURES = 3
#: Exit status when the job was aborted (endpoint refused it, failure rate, other model).
EXIT_ABORTED = 4

ENCODE_DESCRIPTION = """\
Encode a dataset of images into latent shards on remote VAE endpoints.

INPUT is any mix of image folders (searched recursively for .jpg .jpeg .png .webp;
.txt/.json/.cls sidecars with the same stem are carried along), .txt/.csv files
listing image paths (a CSV header is recognised; caption/text and other columns are
carried), uncompressed WebDataset .tar shards (one output shard per input tar), or
image files. Every image gets a stable key (its relative path without extension;
in a tar, WebDataset's key: up to the first dot). Images are EXIF-oriented,
converted to RGB (16-bit scaled to 8; transparent ones composited on white unless
--alpha says otherwise), resized so the shorter side fits and centre-cropped to
--resolution, in a pool of processes sized to the CPUs this process may use.

An endpoint is required: --endpoint URL (repeat for replicas), or --endpoint builtin
(or --demo) for the built-in reference server with its weightless DEMO model.

Output (--out DIR, or any fsspec URL such as s3://bucket/latents):
  job.json                  settings, endpoint (never the token), model (latent channels)
  manifest.arrow          which keys each shard holds; later runs extend it
  shard-00000.safetensors   {key: latent [C,H/8,W/8]} + metadata; or shard-00000.tar
                            (<key>.npy + <key>.json + .txt/.cls) with --format webdataset;
                            or shard-00000.parquet with a latent column (--format parquet)
  shard-00000.parquet       the index: per input key, source, caption, status, error
                            class/kind/reason, original size, crop box, shape, sidecars
  shard-00000_stats.json    written last, and only when the shard is complete
  failures.jsonl            failed items: key, source, class (input|endpoint), kind, reason

Failures: a bad file is an `input` failure (final); an endpoint failure (5xx,
timeout, connection, ...) leaves its shard incomplete, and running the same command
again resends just those items. HTTP 401/403/404 stop the job at once; so does a
failure rate over --max-failure-rate. Re-running skips complete shards; new inputs
extend the dataset (the last shard is filled, then new shards are added); with
--overwrite everything is redone and shards that are gone are removed.
"""

ENCODE_EPILOG = f"""\
exit status: 0 done; 1 bad arguments or I/O error; {EXIT_FAILURES} some items failed
(see failures.jsonl; --allow-failures makes bad inputs 0, never endpoint failures);
{EXIT_ABORTED} aborted (endpoint refused the job, failure rate, other model); 130 interrupted.

examples:
  asyncvae encode --demo --out /tmp/latents
  asyncvae encode photos/ --out latents/ --endpoint https://xyz.endpoints.huggingface.cloud/ \\
      --resolution 1024 --scaling-factor 0.13025
  asyncvae encode shards/{{00000..00099}}.tar --out latents/ --endpoint URL \\
      --shard-index $RANK --num-shards $WORLD     # one line per machine, same --out
"""

DECODE_DESCRIPTION = """\
Decode latent shards (written by `asyncvae encode`, any --format) or a folder of
.safetensors/.pt latent files back into images on remote VAE endpoints. Each latent
becomes OUT/<key>.png (or .jpg; [B,C,h,w] latents give <key>/000.png, ...); with
--format webdataset each input file becomes OUT/<name>.tar of <key>.png. Names are
checked: one that is absolute or holds '..' is a failure, never a write outside
--out. Scaling recorded in the shards is undone (a shift alone too); pass
--scaling-factor/--shift-factor for other latents. Each input file gets an index
OUT/<name>.parquet and, when complete, OUT/<name>_stats.json; a re-run skips
complete files and done images, and resends endpoint failures.
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument(
        "--endpoint", action="append", metavar="URL",
        help="endpoint URL (required); repeat for replicas of the same model. 'builtin' starts "
        "the built-in reference server in-process (a weightless DEMO model, not a real VAE). "
        "A token is read from HF_TOKEN and never recorded",
    )
    g.add_argument("--concurrency", type=_positive_int, default=32, metavar="N",
                   help="requests in flight (default: 32)")
    g.add_argument("--retries", type=_positive_int, default=5, metavar="N",
                   help="attempts per item, the first included (default: 5)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="read timeout of one attempt (default: 120)")
    g.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="encode: image preprocessing workers; decode: image-writing threads "
                   "(default: the CPUs this process may use, os.sched_getaffinity)")
    r = p.add_argument_group("run")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="overwrite", action="store_false",
                      help="skip outputs that are complete, redo partial ones (default)")
    mode.add_argument("--overwrite", dest="overwrite", action="store_true",
                      help="redo everything, replacing existing outputs")
    r.add_argument("--allow-failures", action="store_true",
                   help=f"exit 0 even if some inputs were bad (default: exit {EXIT_FAILURES}); "
                   f"endpoint failures always exit {EXIT_FAILURES}: the job is not complete")
    r.add_argument("--allow-endpoint-change", action="store_true",
                   help="resume although job.json names another endpoint (it must serve the same "
                   "model: a different latent channel count still aborts)")
    r.add_argument("--max-failure-rate", type=_rate, default=0.5, metavar="R",
                   help="abort when more than this share of the last 200 items failed at the "
                   "endpoint (default: 0.5; 1 turns it off)")
    r.add_argument("--shard-index", type=_nonneg_int, default=0, metavar="I",
                   help="this machine's index, 0 <= I < --num-shards (default: 0)")
    r.add_argument("--num-shards", type=_positive_int, default=1, metavar="N",
                   help="machines splitting the job: machine I takes the shards (decode: input "
                   "files) at positions p with p %% N == I, into the same --out (default: 1)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notices")
    r.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(overwrite=False)


def register(subparsers: Any) -> None:
    """Add the ``encode`` and ``decode`` subcommands."""
    e: argparse.ArgumentParser = subparsers.add_parser(
        "encode", help="encode an image dataset into latent shards (resumable)",
        description=ENCODE_DESCRIPTION, epilog=ENCODE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image folder, .txt/.csv list of paths, WebDataset .tar, or image file")
    e.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created)")
    e.add_argument("--demo", action="store_true",
                   help="generate 32 sample images into DIR/demo-images and encode them with the "
                   "built-in demo model (implies --endpoint builtin)")
    g = e.add_argument_group("images")
    g.add_argument("--resolution", default=None, metavar="N|WxH",
                   help="output size, multiples of 8 (default: 512; 256 with --demo)")
    g.add_argument("--crop", choices=CROP_MODES, default="center",
                   help="center: resize the shorter side, then centre crop (default); "
                   "none: resize to exactly the resolution")
    g.add_argument("--alpha", choices=ALPHA_MODES, default="white",
                   help="transparent images: composite on white (default) or black, or drop alpha")
    g.add_argument("--pool", choices=("auto", "process", "thread"), default="auto",
                   help="preprocess in worker processes (every CPU, no GIL) or threads; auto "
                   "(default): processes when 256+ images are to be prepared")
    g.add_argument("--resample", choices=tuple(RESAMPLE), default="lanczos",
                   help="resampling filter: lanczos (default, sharpest), bicubic, bilinear (fastest; "
                   "what diffusers' training scripts use)")
    g.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse source images larger than N pixels, checked from the header before "
                   f"decoding (default: {DEFAULT_MAX_PIXELS})")
    g.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="float16",
                   help="how pixels are sent: float16 tensors (default), float32, uint8 "
                   "(reference server), or png")
    la = e.add_argument_group("latents")
    la.add_argument("--scaling-factor", type=float, default=None, metavar="F",
                    help="the endpoint stores (latents - shift) * F, e.g. 0.18215 (default: unscaled)")
    la.add_argument("--shift-factor", type=float, default=None, metavar="F",
                    help="shift subtracted before scaling, e.g. 0.1159 for Flux")
    la.add_argument("--dtype", choices=LATENT_DTYPES, default="float16",
                    help="stored latent dtype (default: float16)")
    o = e.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors: one file per shard (default); webdataset: .tar per shard "
                   "(<key>.npy + <key>.json); parquet: the index with a fixed-shape latent column, "
                   "loadable with datasets.load_dataset('parquet', data_files='OUT/*.parquet')")
    o.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                   help="inputs per shard (default: 1000; a WebDataset input tar is always one shard)")
    o.add_argument("--retry-failed", action="store_true",
                   help="also resend items that failed as bad input")
    o.add_argument("--skip-bad-inputs", action="store_true",
                   help="go on when listing met problems (unreadable folders, corrupt tars, missing "
                   "listed files); they are listed in failures.jsonl (default: refuse to start)")
    _common(e)
    e.set_defaults(func=encode_main)

    d: argparse.ArgumentParser = subparsers.add_parser(
        "decode", help="decode latent shards back into images",
        description=DECODE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"exit status: 0 done; 1 bad arguments or I/O error; {EXIT_FAILURES} some items failed.",
    )
    d.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="latent shard folder, .safetensors/.pt/.tar files")
    d.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created)")
    d.add_argument("--format", choices=IMAGE_FORMATS, default="png",
                   help="png (default), jpg, or webdataset (.tar of png per input shard)")
    d.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="for --format jpg (default: 95)")
    d.add_argument("--scaling-factor", type=float, default=None, metavar="F",
                   help="override the scaling recorded in the shards (latents / F + shift)")
    d.add_argument("--shift-factor", type=float, default=None, metavar="F", help="see --scaling-factor")
    _common(d)
    d.set_defaults(func=decode_main)


def _client_opts(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "endpoint": args.endpoint or None,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "retry": Retry(attempts=args.retries),
        "timeout": Timeout(read=args.timeout),
        "overwrite": args.overwrite,
        "quiet": args.quiet,
        "allow_endpoint_change": args.allow_endpoint_change,
        "max_failure_rate": args.max_failure_rate,
        "shard_index": args.shard_index,
        "num_shards": args.num_shards,
        "pool": getattr(args, "pool", "thread"),
    }


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _finish(args: argparse.Namespace, summary: JobSummary, verb: str) -> int:
    if args.json:
        print(json.dumps(summary.to_dict()))
    _log(f"asyncvae {args.command}: {summary.line(verb)}", args.quiet)
    if summary.endpoint_failures or (summary.failures and not args.allow_failures):
        where = f" (listed in {summary.failures_path})" if summary.failures_path else ""
        hint = ("; run the same command again to retry the endpoint failures" if summary.endpoint_failures
                else "; pass --allow-failures to exit 0")
        print(f"asyncvae {args.command}: error: {summary.failures} item(s) failed{where}{hint}", file=sys.stderr)
        return EXIT_FAILURES
    return 0


def _run(args: argparse.Namespace, fn: Any, verb: str, *a: Any, **kw: Any) -> int:
    try:
        summary = fn(*a, **kw)
    except JobAborted as e:
        if args.debug:
            raise
        s = getattr(e, "summary", None)
        if s is not None and args.json:
            print(json.dumps(s.to_dict()))
        print(f"asyncvae {args.command}: aborted: {e}", file=sys.stderr)
        return EXIT_ABORTED
    return _finish(args, summary, verb)


def encode_main(args: argparse.Namespace) -> int:
    """Run ``asyncvae encode``; returns the exit status."""
    inputs: list[str] = list(args.inputs)
    resolution = args.resolution
    opts = _client_opts(args)
    if args.demo:
        from .demo import make_demo_images

        try:
            folder = make_demo_images(Path(args.out) / "demo-images")
        except OSError as e:
            raise InputError(f"cannot write demo images into {args.out!r}: {e.strerror or e}") from None
        _log(f"asyncvae encode: demo: 32 sample images in {folder}", args.quiet)
        inputs.append(str(folder))
        resolution = resolution or "256"
        if opts["endpoint"] is None:
            opts["endpoint"] = BUILTIN
    if not inputs:
        raise InputError("no INPUT given: pass image folders, .txt/.csv lists or .tar shards (or --demo)")
    return _run(
        args, encode_dataset, "encoded", inputs, args.out,
        resolution=resolution or "512", crop=args.crop, alpha=args.alpha,
        scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
        dtype=args.dtype, wire_dtype=args.wire_dtype, shard_size=args.shard_size,
        format=args.format, max_pixels=args.max_pixels, resample=args.resample, retry_failed=args.retry_failed,
        skip_bad_inputs=args.skip_bad_inputs, **opts,
    )


def decode_main(args: argparse.Namespace) -> int:
    """Run ``asyncvae decode``; returns the exit status."""
    return _run(
        args, decode_dataset, "decoded", args.inputs, args.out, format=args.format,
        jpeg_quality=args.jpeg_quality, scaling_factor=args.scaling_factor,
        shift_factor=args.shift_factor, **_client_opts(args),
    )
