"""``asyncvae serve``: run the reference endpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._argtypes import nonneg_float as _nonneg
from .._argtypes import nonneg_int as _nonneg_int
from .._argtypes import positive_int as _positive_int
from .._argtypes import probability as _probability
from ..errors import InputError
from .config import TOKEN_ENV, Faults, ServerConfig
from .model import BuiltinVAE, VAEModel

__all__ = ["add_arguments", "check_model", "config_from_args", "main", "register"]

DESCRIPTION = """\
Run a remote-VAE endpoint speaking the Hybrid Inference protocol (what diffusers'
remote_decode/remote_encode talk to): a weightless built-in model for tests and
benchmarks, or a real diffusers VAE (--model: a VAE folder or a pipeline root) on
any device and dtype, with dynamic batching, bearer-token auth, a bounded queue,
readiness, graceful drain on SIGTERM and Prometheus metrics.

Routes: POST / decodes when the query has output_type, else encodes; POST /decode
and /encode force the operation; GET /health (live), /ready (model loaded), /stats,
/metrics. Admin routes (POST /faults, /stats/reset) only with --admin or a fault
flag. Fault options make it misbehave on purpose, to test clients.

Prints 'asyncvae serve: listening on http://HOST:PORT/' once bound (a --model may
still be loading: GET /ready answers 200 when it is); stop with Ctrl-C or SIGTERM.
"""


def _stall(text: str) -> tuple[float, float]:
    p, sep, secs = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} must be P:SECONDS, e.g. 0.1:30")
    return _probability(p), _nonneg(secs)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run a VAE endpoint (built-in model, or a diffusers VAE with batching and auth)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` options (shared by ``asyncvae serve`` and ``python -m asyncvae.server``)."""
    d = ServerConfig()
    g = p.add_argument_group("server")
    g.add_argument("--host", default=d.host, help=f"address to bind (default: {d.host})")
    g.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)"
    )
    g.add_argument(
        "--replicas",
        type=_positive_int,
        default=d.replicas,
        metavar="K",
        help="replica slots: batches computed at once; like real endpoints each slot runs one "
        "request (or one batch) at a time and queues the rest (default: 1)",
    )
    g.add_argument(
        "--max-queue",
        type=_nonneg_int,
        default=d.max_queue,
        metavar="N",
        help="requests admitted but not yet computing (bodies being received included); beyond "
        "it new requests get 429 with Retry-After before their body is read; 0 = unbounded "
        f"(default: {d.max_queue})",
    )
    g.add_argument(
        "--busy-retry-after",
        type=_nonneg,
        default=d.busy_retry_after,
        metavar="S",
        help="Retry-After seconds of the server's own 429/503 answers (queue full, model "
        f"loading, draining) (default: {d.busy_retry_after:g})",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        metavar="N",
        help="largest request body accepted; larger ones get 413 (default: 512 MiB)",
    )
    g.add_argument(
        "--max-output-pixels",
        type=int,
        default=d.max_output_pixels,
        metavar="N",
        help="largest output (batch x frames x height x width) computed; larger gets 413 "
        "(default: 2^26)",
    )
    g.add_argument(
        "--drain-timeout",
        type=_nonneg,
        default=d.drain_timeout,
        metavar="S",
        help="on SIGTERM/SIGINT stop accepting and let requests in flight finish for up to S "
        f"seconds, then exit 0; a second signal stops at once (default: {d.drain_timeout:g})",
    )
    g.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request to stderr: peer, time, request line, status, bytes, "
        "seconds (never headers, so never the token)",
    )
    g.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT so several serve processes share one port (Linux spreads "
        "connections over them): run one per GPU, e.g. CUDA_VISIBLE_DEVICES=i asyncvae serve "
        "--reuse-port ...",
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=d.model,
        metavar="builtin|PATH",
        help="'builtin' (weightless, deterministic) or a local diffusers VAE: a folder with its "
        "config.json (save_pretrained layout) or a pipeline root holding vae/; the class comes "
        "from config.json (AutoencoderKL, AutoencoderTiny, AutoencoderDC, AutoencoderKLWan, "
        "AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo, ...). Loaded after the port is "
        "bound; requests get 503 + Retry-After until it is ready (default: builtin)",
    )
    m.add_argument(
        "--device",
        default=d.device,
        metavar="auto|cpu|cuda|cuda:N|mps",
        help="where a --model runs; auto = cuda if available, else mps, else cpu (default: auto)",
    )
    m.add_argument(
        "--dtype",
        default=d.dtype,
        choices=("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"),
        help="precision of a --model; auto = bf16 on CUDA with bf16 support, fp16 on mps, fp32 "
        "on cpu (default: auto)",
    )
    m.add_argument(
        "--tiling",
        action="store_true",
        help="decode/encode large frames in tiles (the model's enable_tiling()): less memory, "
        "slightly different pixels at tile seams",
    )
    m.add_argument(
        "--slicing",
        action="store_true",
        help="run batches one item at a time inside the model (enable_slicing()): less memory, "
        "less batching speed-up",
    )
    m.add_argument(
        "--latent-channels",
        type=int,
        default=d.latent_channels,
        metavar="C",
        help="channels of the built-in model's encoded latents (>= 3; default: 4; Flux-like: 16)",
    )

    b = p.add_argument_group(
        "dynamic batching and service time",
        "Requests with the same model input (operation, shape) that wait together run as one "
        "forward pass; answers are split back per request, and an error stays with its request.",
    )
    b.add_argument(
        "--max-batch",
        type=_positive_int,
        default=d.max_batch,
        metavar="N",
        help="most items (leading dimensions summed) per forward pass; 1 turns batching off "
        "(default: 1)",
    )
    b.add_argument(
        "--batch-wait-ms",
        type=_nonneg,
        default=d.batch_wait_ms,
        metavar="MS",
        help="how long the oldest request of a partial batch waits for company before its slot "
        f"runs it anyway (default: {d.batch_wait_ms:g})",
    )
    b.add_argument(
        "--delay-ms",
        type=_nonneg,
        default=d.delay_ms,
        metavar="MS",
        help="service time model: each batch holds its slot for at least delay-ms + items x "
        "delay-per-item-ms (the compute runs inside it), in ms (default: 0)",
    )
    b.add_argument(
        "--delay-per-item-ms",
        type=_nonneg,
        default=d.delay_per_item_ms,
        metavar="MS",
        help="extra service time per item of a batch (leading dimension), in ms (default: 0)",
    )
    b.add_argument(
        "--cache",
        action="store_true",
        help="compute one answer per request signature (operation, query, body length, "
        "Accept) and replay it afterwards, so benchmarks measure the client, not the model; "
        "bodies of the same size get the same answer, so never use it to check results",
    )

    a = p.add_argument_group("security")
    a.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="require 'Authorization: Bearer TOKEN' on every route but /health and /ready "
        f"(401 otherwise); command lines are visible to other users, so prefer ${TOKEN_ENV} "
        "or --token-file",
    )
    a.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help=f"read the token from this file (first line); default: ${TOKEN_ENV} when set",
    )
    a.add_argument(
        "--admin",
        action="store_true",
        help="enable the admin routes POST /faults and POST /stats/reset (on by themselves "
        "when any fault flag is given; off otherwise)",
    )
    f = p.add_argument_group(
        "fault injection (probabilities per request, drawn after the body is read; any of "
        "these flags, even at 0, also turns on the admin routes)"
    )
    f.add_argument(
        "--fault-503",
        type=_probability,
        default=None,
        metavar="P",
        help='answer 503 {"error": "503 Service Unavailable"} (a replica starting)',
    )
    f.add_argument(
        "--fault-429",
        type=_probability,
        default=None,
        metavar="P",
        help="answer 429 with a Retry-After header and a JSON error (rate limiting)",
    )
    f.add_argument(
        "--retry-after",
        type=_nonneg,
        default=None,
        metavar="S",
        help="seconds in the Retry-After header of injected 429s (default: 1)",
    )
    f.add_argument(
        "--fault-reset",
        type=_probability,
        default=None,
        metavar="P",
        help="send the headers and half the body, then abort the connection",
    )
    f.add_argument(
        "--fault-truncate",
        type=_probability,
        default=None,
        metavar="P",
        help="declare the full Content-Length, send about half the body, then close",
    )
    f.add_argument(
        "--fault-stall",
        type=_stall,
        default=None,
        metavar="P:SECONDS",
        help="with probability P sleep SECONDS before answering (trip read timeouts), e.g. 0.05:30",
    )
    f.add_argument(
        "--fault-bad-headers",
        type=_probability,
        default=None,
        metavar="P",
        help="tensor answers get a wrong shape, a missing dtype or a non-JSON shape header",
    )
    f.add_argument(
        "--fault-502-html",
        type=_probability,
        default=None,
        metavar="P",
        help="answer 502 with an HTML body (text/html), like a gateway",
    )
    f.add_argument(
        "--chunked",
        action="store_true",
        help="send 200 bodies with chunked transfer encoding (no Content-Length)",
    )
    f.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the fault RNG (default: 0)"
    )


#: Fault options whose presence on the command line turns on the admin routes.
FAULT_FLAGS = (
    "fault_503",
    "fault_429",
    "retry_after",
    "fault_reset",
    "fault_truncate",
    "fault_bad_headers",
    "fault_502_html",
)


def _token(args: argparse.Namespace) -> str | None:
    if args.token is not None and args.token_file is not None:
        raise InputError("give --token or --token-file, not both")
    if args.token is not None:
        if not args.token.strip():
            raise InputError("--token is empty; leave it out for an open server")
        return str(args.token)
    if args.token_file is not None:
        try:
            lines = Path(args.token_file).read_text().splitlines()
        except OSError as e:
            raise InputError(f"--token-file {args.token_file}: {e.strerror or e}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise InputError(f"--token-file {args.token_file} is empty")
        return token
    return ServerConfig.token_from_env()


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A :class:`ServerConfig` from parsed ``serve`` options."""
    stall_p, stall_s = args.fault_stall or (0.0, 0.0)
    given = [getattr(args, name) for name in FAULT_FLAGS]
    faults_given = any(v is not None for v in given) or args.fault_stall is not None or args.chunked
    d = Faults()

    def fault(name: str) -> float:
        v = getattr(args, name)
        return float(getattr(d, name) if v is None else v)

    try:
        faults = Faults(
            fault_503=fault("fault_503"),
            fault_429=fault("fault_429"),
            retry_after=fault("retry_after"),
            fault_reset=fault("fault_reset"),
            fault_truncate=fault("fault_truncate"),
            fault_stall=stall_p,
            stall_seconds=stall_s,
            fault_bad_headers=fault("fault_bad_headers"),
            fault_502_html=fault("fault_502_html"),
            chunked=args.chunked,
        )
        return ServerConfig(
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            delay_ms=args.delay_ms,
            delay_per_item_ms=args.delay_per_item_ms,
            cache=args.cache,
            faults=faults,
            max_body_bytes=args.max_body_bytes,
            max_output_pixels=args.max_output_pixels,
            seed=args.seed,
            latent_channels=args.latent_channels,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            tiling=args.tiling,
            slicing=args.slicing,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            max_queue=args.max_queue,
            busy_retry_after=args.busy_retry_after,
            token=_token(args),
            admin=True if args.admin or faults_given else None,
            drain_timeout=args.drain_timeout,
            access_log=args.access_log,
            reuse_port=args.reuse_port,
        )
    except ValueError as e:
        raise InputError(str(e)) from None


def check_model(config: ServerConfig) -> VAEModel | None:
    """Fail fast, before binding, on what can be checked without loading weights: the
    built-in model's settings, or the folder, class and device of a diffusers model.
    Returns the built-in model (ready at once), or None for a model to load."""
    if config.model == "builtin":
        try:
            return BuiltinVAE(config.latent_channels)
        except ValueError as e:
            raise InputError(f"--latent-channels: {e}") from None
    from .diffusers_model import find_model, model_class, resolve_device, resolve_dtype

    model_class(find_model(config.model))
    resolve_dtype(config.dtype, resolve_device(config.device))
    return None


def main(args: argparse.Namespace) -> int:
    """Run ``serve`` with parsed options (blocks until interrupted)."""
    from .runner import run_server

    config = config_from_args(args)
    model = check_model(config)
    warning = open_server_warning(config)
    if warning:
        print(f"asyncvae serve: warning: {warning}", file=sys.stderr)
    return run_server(config, model)


def open_server_warning(config: ServerConfig) -> str | None:
    """A warning when the server listens beyond loopback without a token."""
    if config.token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        return (
            f"listening on {config.host} without a token: anyone who can reach this port can "
            f"use it (set ${TOKEN_ENV} or --token-file)"
        )
    return None
