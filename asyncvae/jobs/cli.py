"""``asyncvae encode`` and ``asyncvae decode``: dataset jobs from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .._argtypes import nonneg_int as _nonneg_int
from .._argtypes import positive_int as _positive_int
from ..config import Retry, Timeout
from ..errors import InputError
from ._common import JobSummary, log
from .decode import IMAGE_FORMATS, decode_dataset
from .encode import FORMATS, LATENT_DTYPES, encode_dataset
from .preprocess import ALPHA_MODES, CROP_MODES, WIRE_DTYPES

__all__ = ["decode_main", "encode_main", "register"]

#: Exit status when the job ran but some items failed (without --allow-failures).
EXIT_FAILURES = 3

ENCODE_DESCRIPTION = """\
Encode a dataset of images into latent shards on remote VAE endpoints.

INPUT is any mix of image folders (searched recursively for .jpg .jpeg .png .webp),
.txt/.csv files listing image paths, uncompressed WebDataset .tar shards, or image
files. The listing is sorted and every image gets a stable key (its relative path
without extension). Images are EXIF-oriented, converted to RGB (transparent ones are
composited on white unless --alpha says otherwise), resized so the shorter side fits
and centre-cropped to --resolution (--crop none: resized to exactly that size), in a
thread pool, and sent as float16 tensors.

Output (--out DIR), one shard per --shard-size inputs:
  shard-00000.safetensors   {key: latent [C,H/8,W/8]} + metadata (endpoint host, scaling,
                            dtype, resolution, asyncvae version); or shard-00000.tar
                            (<key>.safetensors + <key>.json) with --format webdataset
  shard-00000.jsonl         per input: key, source, status, original size, crop box, error
  shard-00000_stats.json    count, failures, seconds: written last, marks the shard complete
  failures.jsonl            the items that failed (key, source, reason)
Shards are byte-identical on every run of the same input and settings. Re-running
skips complete shards and redoes partial ones (a killed job loses nothing).

Without --endpoint, the built-in reference server is started in-process (a
weightless demo model). `asyncvae encode --demo --out DIR` generates 32 sample
images into DIR/demo-images and encodes them: the quickest end-to-end check.
"""

ENCODE_EPILOG = f"""\
exit status: 0 done; 1 bad arguments or I/O error; {EXIT_FAILURES} some items failed
(see failures.jsonl; --allow-failures makes that 0); 130 interrupted.

examples:
  asyncvae encode --demo --out /tmp/latents
  asyncvae encode photos/ --out latents/ --endpoint https://xyz.endpoints.huggingface.cloud/ \\
      --resolution 1024 --scaling-factor 0.13025
  asyncvae encode shards/{{00000..00099}}.tar --out latents/ --endpoint URL \\
      --shard-index $RANK --num-shards $WORLD     # one line per machine, same --out
"""

DECODE_DESCRIPTION = """\
Decode latent shards (written by `asyncvae encode`) or a folder of .safetensors/.pt
latent files back into images on remote VAE endpoints. Each latent becomes
OUT/<key>.png (or .jpg); with --format webdataset each input shard becomes
OUT/<shard>.tar of <key>.png. Scaling recorded in the shard metadata is undone
automatically; pass --scaling-factor/--shift-factor for other latents. Existing
outputs are skipped (resume) unless --overwrite.
"""




def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument(
        "--endpoint", action="append", metavar="URL",
        help="endpoint URL; repeat for replicas of the same model (default: start the built-in "
        "reference server in-process). A token is read from HF_TOKEN",
    )
    g.add_argument("--concurrency", type=_positive_int, default=32, metavar="N",
                   help="requests in flight (default: 32)")
    g.add_argument("--retries", type=_positive_int, default=5, metavar="N",
                   help="attempts per item, the first included (default: 5)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="read timeout of one attempt (default: 120)")
    g.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="image threads (default: CPU count)")
    r = p.add_argument_group("run")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="overwrite", action="store_false",
                      help="skip outputs that are complete, redo partial ones (default)")
    mode.add_argument("--overwrite", dest="overwrite", action="store_true",
                      help="redo everything, replacing existing outputs")
    r.add_argument("--allow-failures", action="store_true",
                   help=f"exit 0 even if some items failed (default: exit {EXIT_FAILURES})")
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
                   help="generate 32 sample images into DIR/demo-images and encode them")
    g = e.add_argument_group("images")
    g.add_argument("--resolution", default=None, metavar="N|WxH",
                   help="output size, multiples of 8 (default: 512; 256 with --demo)")
    g.add_argument("--crop", choices=CROP_MODES, default="center",
                   help="center: resize the shorter side, then centre crop (default); "
                   "none: resize to exactly the resolution")
    g.add_argument("--alpha", choices=ALPHA_MODES, default="white",
                   help="transparent images: composite on white (default) or black, or drop alpha")
    g.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="float16",
                   help="how pixels are sent: float16 tensors (default), float32, uint8 "
                   "(reference server), or png")
    la = e.add_argument_group("latents")
    la.add_argument("--scaling-factor", type=float, default=None, metavar="F",
                    help="the endpoint stores (latents - shift) * F, e.g. 0.18215 (default: unscaled)")
    la.add_argument("--shift-factor", type=float, default=None, metavar="F",
                    help="shift subtracted before scaling, e.g. 0.1159 for Flux")
    la.add_argument("--dtype", choices=tuple(LATENT_DTYPES), default="float16",
                    help="stored latent dtype (default: float16)")
    o = e.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors: one file per shard (default); webdataset: .tar per shard")
    o.add_argument("--shard-size", type=_positive_int, default=1000, metavar="N",
                   help="inputs per shard (default: 1000)")
    o.add_argument("--shard-index", type=_nonneg_int, default=0, metavar="I",
                   help="this machine's index, 0 <= I < --num-shards (default: 0)")
    o.add_argument("--num-shards", type=_positive_int, default=1, metavar="N",
                   help="machines splitting the job: machine I writes shards g with "
                   "g %% N == I, into the same layout (default: 1)")
    o.add_argument("--retry-failed", action="store_true",
                   help="also redo complete shards that recorded failures")
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
    }


def _finish(args: argparse.Namespace, summary: JobSummary, verb: str) -> int:
    if args.json:
        print(json.dumps(summary.to_dict()))
    log(f"asyncvae {args.command}: {summary.line(verb)}", args.quiet)
    if summary.failures and not args.allow_failures:
        where = f" (listed in {summary.failures_path})" if summary.failures_path else ""
        print(
            f"asyncvae {args.command}: error: {summary.failures} item(s) failed{where}; "
            "pass --allow-failures to exit 0",
            file=sys.stderr,
        )
        return EXIT_FAILURES
    return 0


def encode_main(args: argparse.Namespace) -> int:
    """Run ``asyncvae encode``; returns the exit status."""
    inputs: list[str] = list(args.inputs)
    resolution = args.resolution
    if args.demo:
        from .demo import make_demo_images

        try:
            folder = make_demo_images(Path(args.out) / "demo-images")
        except OSError as e:
            raise InputError(f"cannot write demo images into {args.out!r}: {e.strerror or e}") from None
        log(f"asyncvae encode: demo: 32 sample images in {folder}", args.quiet)
        inputs.append(str(folder))
        resolution = resolution or "256"
    if not inputs:
        raise InputError("no INPUT given: pass image folders, .txt/.csv lists or .tar shards (or --demo)")
    summary = encode_dataset(
        inputs, args.out,
        resolution=resolution or "512", crop=args.crop, alpha=args.alpha,
        scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
        dtype=args.dtype, wire_dtype=args.wire_dtype, shard_size=args.shard_size,
        format=args.format, shard_index=args.shard_index, num_shards=args.num_shards,
        retry_failed=args.retry_failed, **_client_opts(args),
    )
    return _finish(args, summary, "encoded")


def decode_main(args: argparse.Namespace) -> int:
    """Run ``asyncvae decode``; returns the exit status."""
    summary = decode_dataset(
        args.inputs, args.out, format=args.format, jpeg_quality=args.jpeg_quality,
        scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, **_client_opts(args),
    )
    return _finish(args, summary, "decoded")
