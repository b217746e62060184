"""The live progress line of ``asyncvae loadtest`` (stderr): a tqdm bar on a terminal,
a plain line every few seconds otherwise. Every figure is labelled and, except the
totals, about the *last* interval between updates, not the whole run so far."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from .hist import LIVE_ARGS, percentile, reset_histogram
from .text import fmt_ms

__all__ = ["ProgressBar", "describe"]


def describe(s: dict[str, Any], prev: dict[str, Any] | None) -> str:
    """The labelled figures of snapshot ``s`` since snapshot ``prev``."""
    dt = s["elapsed"] - (prev["elapsed"] if prev else 0.0)
    dt = dt if dt > 0 else 1e-9

    def per_s(key: str) -> str:
        return f"{(s[key] - (prev[key] if prev else 0)) / dt:.1f}/s"

    live = s.get("live")
    lat = ""
    if live is not None and live.get_total_count():
        lat = f" p50 {fmt_ms(percentile(live, 50) / 1000)} p99 {fmt_ms(percentile(live, 99) / 1000)}"
    tgt = f"target {s['target']:.1f}/s | " if s.get("target") else ""
    return (f"{tgt}last {dt:.1f}s: sent {per_s('sent')} ok {per_s('ok')} failed {per_s('failed')}{lat} | "
            f"in flight {s['in_flight']} | total sent {s['sent']} failed {s['failed']} late {s['late']}"
            + (f" capped {s['capped']}" if s.get("capped") else ""))


class ProgressBar:
    """A progress callback for :func:`asyncvae.loadtest.run` (see the module doc)."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 5.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.every = every
        self.bar: tqdm[Any] | None = None
        self.phase: str | None = None
        self.prev: dict[str, Any] | None = None
        self.printed: dict[str, Any] | None = None
        self.acc = HdrHistogram(*LIVE_ARGS)

    def _new_phase(self, s: dict[str, Any]) -> None:
        self.close()
        self.phase = s.get("phase") or ""
        self.prev = self.printed = None
        if self.tty:
            self.bar = tqdm(total=s.get("expected"), desc=self.phase or "loadtest", unit="req", file=self.stream,
                            dynamic_ncols=True, leave=False, mininterval=0.5, smoothing=0.1)

    def __call__(self, s: dict[str, Any]) -> None:
        if self.phase is None or (s.get("phase") or "") != self.phase:
            self._new_phase(s)
        if self.bar is not None:
            self.bar.set_postfix_str(describe(s, self.prev), refresh=False)
            self.bar.update(s["sent"] - self.bar.n)
        else:
            live = s.get("live")
            if live is not None:
                self.acc.add(live)
            if self.printed is None or s["elapsed"] - self.printed["elapsed"] >= self.every:
                phase = f"{self.phase} " if self.phase else ""
                self.stream.write(f"{phase}[{s['elapsed']:6.1f}s] {describe({**s, 'live': self.acc}, self.printed)}\n")
                self.stream.flush()
                self.printed = s
                reset_histogram(self.acc)
        self.prev = s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
