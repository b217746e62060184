"""The ``asyncvae`` command line: ``serve``, ``encode``, ``decode``, ``loadtest``.

Each subcommand lives beside the layer it drives and registers itself through a
``register(subparsers)`` function that adds its parser and sets ``func``. Errors
print as one line (no traceback unless ``--debug``) and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import AsyncVAEError

#: Modules that provide subcommands (each has ``register(subparsers)``).
SUBCOMMAND_MODULES = (
    "asyncvae.server.cli",
    "asyncvae.jobs.cli",
    "asyncvae.loadtest.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="asyncvae",
        description=(
            "Drive remote VAE encode/decode endpoints (the Hybrid Inference protocol of "
            "diffusers' remote_decode/remote_encode) at high throughput, or serve one locally."
        ),
    )
    parser.add_argument("--version", action="version", version=f"asyncvae {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asyncvae`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("asyncvae: interrupted", file=sys.stderr)
        return 130
    except (AsyncVAEError, OSError) as e:
        if args.debug:
            raise
        print(f"asyncvae {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
