"""``asyncvae serve``: run the reference endpoint."""

from __future__ import annotations

import argparse
from typing import Any

from .._argtypes import nonneg_float as _nonneg
from .._argtypes import probability as _probability
from ..errors import InputError
from .app import Faults, ServerConfig

__all__ = ["config_from_args", "main", "register"]

DESCRIPTION = """\
Run a local remote-VAE endpoint speaking the Hybrid Inference protocol (what
diffusers' remote_decode/remote_encode talk to). POST / decodes when the query has
output_type, else encodes; POST /decode and /encode force the operation; GET /health
and GET /stats report. The built-in model needs no weights (8x8 pooling and a fixed
channel mix); --model PATH loads a diffusers AutoencoderKL from a local folder.
Fault options make it misbehave on purpose, to test clients. Prints
'asyncvae serve: listening on http://HOST:PORT/' once bound; stop with Ctrl-C.
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
        help="run a local reference endpoint (built-in model or a diffusers AutoencoderKL)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` options (shared by ``asyncvae serve`` and ``python -m asyncvae.server``)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)"
    )
    g.add_argument(
        "--model",
        default="builtin",
        metavar="builtin|PATH",
        help="'builtin' (weightless, deterministic) or a local folder holding a diffusers "
        "AutoencoderKL saved with save_pretrained (default: builtin)",
    )
    g.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="K",
        help="requests computed at once; like real endpoints each replica runs one request and "
        "queues the rest (default: 1)",
    )
    g.add_argument(
        "--latent-channels",
        type=int,
        default=4,
        metavar="C",
        help="channels of the built-in model's encoded latents (>= 3; default: 4; Flux-like: 16)",
    )
    g.add_argument(
        "--cache",
        action="store_true",
        help="compute one answer per request signature (operation, query, body length, "
        "Accept) and replay it afterwards, so benchmarks measure the client, not the model; "
        "bodies of the same size get the same answer, so never use it to check results",
    )
    g.add_argument(
        "--delay-ms",
        type=_nonneg,
        default=0.0,
        metavar="MS",
        help="service time each request holds its replica for, in ms (default: 0)",
    )
    g.add_argument(
        "--delay-per-item-ms",
        type=_nonneg,
        default=0.0,
        metavar="MS",
        help="extra service time per batch item (leading dimension), in ms (default: 0)",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServerConfig.max_body_bytes,
        metavar="N",
        help="largest request body accepted; larger ones get 413 (default: 512 MiB)",
    )
    g.add_argument(
        "--max-output-pixels",
        type=int,
        default=ServerConfig.max_output_pixels,
        metavar="N",
        help="largest output (batch x frames x height x width) computed; larger gets 413 "
        "(default: 2^26)",
    )
    f = p.add_argument_group(
        "fault injection (probabilities per request, drawn after the body is read)"
    )
    f.add_argument(
        "--fault-503",
        type=_probability,
        default=0.0,
        metavar="P",
        help='answer 503 {"error": "503 Service Unavailable"} (a replica starting)',
    )
    f.add_argument(
        "--fault-429",
        type=_probability,
        default=0.0,
        metavar="P",
        help="answer 429 with a Retry-After header and a JSON error (rate limiting)",
    )
    f.add_argument(
        "--retry-after",
        type=_nonneg,
        default=1.0,
        metavar="S",
        help="seconds in the Retry-After header of injected 429s (default: 1)",
    )
    f.add_argument(
        "--fault-reset",
        type=_probability,
        default=0.0,
        metavar="P",
        help="send the headers and half the body, then abort the connection",
    )
    f.add_argument(
        "--fault-truncate",
        type=_probability,
        default=0.0,
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
        default=0.0,
        metavar="P",
        help="tensor answers get a wrong shape, a missing dtype or a non-JSON shape header",
    )
    f.add_argument(
        "--fault-502-html",
        type=_probability,
        default=0.0,
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


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A :class:`ServerConfig` from parsed ``serve`` options."""
    stall_p, stall_s = args.fault_stall or (0.0, 0.0)
    try:
        faults = Faults(
            fault_503=args.fault_503,
            fault_429=args.fault_429,
            retry_after=args.retry_after,
            fault_reset=args.fault_reset,
            fault_truncate=args.fault_truncate,
            fault_stall=stall_p,
            stall_seconds=stall_s,
            fault_bad_headers=args.fault_bad_headers,
            fault_502_html=args.fault_502_html,
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
        )
    except ValueError as e:
        raise InputError(str(e)) from None


def main(args: argparse.Namespace) -> int:
    """Run ``serve`` with parsed options (blocks until interrupted)."""
    from .model import load_model
    from .runner import run_server

    config = config_from_args(args)
    try:
        model = load_model(config.model, config.latent_channels)
    except ValueError as e:
        raise InputError(str(e)) from None
    return run_server(config, model)
