"""``python -m asyncvae.server``: the ``serve`` subcommand without the rest of the CLI."""

import argparse
import sys

from ..errors import AsyncVAEError
from .cli import DESCRIPTION, add_arguments, main

parser = argparse.ArgumentParser(
    prog="python -m asyncvae.server",
    description=DESCRIPTION,
    formatter_class=argparse.RawDescriptionHelpFormatter,
)
add_arguments(parser)
try:
    sys.exit(main(parser.parse_args()))
except AsyncVAEError as e:
    print(f"asyncvae serve: error: {e}", file=sys.stderr)
    sys.exit(1)
