"""argparse value types shared by the subcommands: one place for "a number in a range"."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded(
    kind: type[int] | type[float],
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    noun: str | None = None,
) -> Callable[[str], float]:
    """An argparse ``type=`` that parses ``kind`` and checks ``low <= v <= high``
    (``low < v`` with ``low_open``), with a message naming what was wrong."""
    noun = noun or ("an integer" if kind is int else "a number")

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if low is not None and high is not None:
            if not low <= v <= high:
                raise argparse.ArgumentTypeError(f"{text!r} must be in [{low:g}, {high:g}]")
        elif low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if low_open else '>='} {low:g}")
        return v

    return parse


positive_int = bounded(int, low=1)
nonneg_int = bounded(int, low=0)
positive_float = bounded(float, low=0, low_open=True)
nonneg_float = bounded(float, low=0)
probability = bounded(float, low=0, high=1, noun="a probability")
