"""``python -m asyncvae.server``: the ``serve`` subcommand without the rest of the CLI."""

import argparse
import sys

from .cli import DESCRIPTION, add_arguments, main

parser = argparse.ArgumentParser(
    prog="python -m asyncvae.server",
    description=DESCRIPTION,
    formatter_class=argparse.RawDescriptionHelpFormatter,
)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
