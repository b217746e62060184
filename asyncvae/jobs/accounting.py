"""One place for a job's bookkeeping: the summary, the progress bar, the failure-rate
guard, and the failures file — the same for encode and decode."""

from __future__ import annotations

import collections
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from .endpoint import JobAborted

__all__ = ["FailureGuard", "JobSummary", "Progress", "failures_text"]


@dataclass
class JobSummary:
    """What a dataset job did.

    Attributes:
        out: the output folder or URL.
        items: inputs in this worker's shards (all of them without ``--num-shards``).
        processed: items handled in this run (items of complete shards, and done items
            reused from an earlier run, are not processed again).
        sent: items sent to the endpoint in this run.
        ok / failures: items done well / failed, including those of skipped shards.
        input_failures / endpoint_failures: failures by class: ``input`` (the file is
            bad: final) and ``endpoint`` (retried by the next run).
        shards_written / shards_skipped: shards written now / already complete.
        shards_incomplete: shards written with endpoint failures (not complete).
        seconds: wall time of the run.
        bytes_sent / bytes_received / retries: this run's share of the client's figures.
        failures_path: the failures listing, when there were failures.
        endpoint: the endpoint identity (no token).
        aborted: why the job stopped early, or ``""``.
    """

    out: str
    items: int = 0
    processed: int = 0
    sent: int = 0
    ok: int = 0
    failures: int = 0
    input_failures: int = 0
    endpoint_failures: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    shards_incomplete: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0
    failures_path: str | None = None
    endpoint: str = ""
    aborted: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Items handled per second in this run."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Body megabytes (sent + received) per second in this run."""
        return (self.bytes_sent + self.bytes_received) / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @staticmethod
    def client_totals(stats: Any) -> tuple[int, int, int]:
        """A client's running (bytes out, bytes in, retries), to take a run's share later."""
        return (stats.bytes_out, stats.bytes_in, sum(stats.retries.values()))

    def add_client_usage(self, stats: Any, since: tuple[int, int, int]) -> None:
        """Add what the client sent, received and retried since ``client_totals`` gave ``since``."""
        now = self.client_totals(stats)
        self.bytes_sent += now[0] - since[0]
        self.bytes_received += now[1] - since[1]
        self.retries += now[2] - since[2]

    def count(self, status: str, klass: str | None = None) -> None:
        """Count one finished item (``ok`` or failed with ``klass``)."""
        if status == "ok":
            self.ok += 1
            return
        self.failures += 1
        if klass == "endpoint":
            self.endpoint_failures += 1
        else:
            self.input_failures += 1

    def line(self, verb: str = "encoded") -> str:
        """A one-line human summary."""
        written = f", {self.shards_written} shard(s) written" if self.shards_written else ""
        skipped = f", {self.shards_skipped} shard(s) already complete" if self.shards_skipped else ""
        classes = ""
        if self.failures:
            classes = f" ({self.input_failures} bad input, {self.endpoint_failures} endpoint)"
        incomplete = (
            f"; {self.shards_incomplete} shard(s) incomplete: run the same command again to retry "
            f"the endpoint failures" if self.shards_incomplete else ""
        )
        return (
            f"{verb} {self.processed} item(s) in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s, "
            f"{self.mb_per_s:.1f} MB/s), {self.ok} ok, {self.failures} failed{classes}{written}{skipped}, "
            f"{self.retries} retries -> {self.out}{incomplete}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_s"] = self.images_per_s
        return d


class Progress:
    """A tqdm bar fed by the job (items accounted) and by ``client.stats`` events
    (retries), showing img/s, MB/s, retries and failures."""

    def __init__(self, client: Any, total: int, desc: str, enabled: bool) -> None:
        self.stats = client.stats
        self.t0 = time.perf_counter()
        self.bytes0 = self.stats.bytes_in + self.stats.bytes_out
        self.retries0 = sum(self.stats.retries.values())
        self.failures = 0
        self._last = 0.0
        self.enabled = enabled
        self.bar = tqdm(
            total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
            mininterval=0.5, dynamic_ncols=True, smoothing=0.05,
        )
        if enabled:
            self.stats.add_listener(self._on_event)

    def _on_event(self, event: str, stats: Any) -> None:
        if event == "retry":
            self._postfix(force=False)

    def _postfix(self, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        moved = self.stats.bytes_in + self.stats.bytes_out - self.bytes0
        mbs = moved / 1e6 / max(1e-9, now - self.t0)
        retries = sum(self.stats.retries.values()) - self.retries0
        self.bar.set_postfix_str(f"{mbs:.1f}MB/s retries={retries} failed={self.failures}", refresh=False)

    def add_total(self, n: int) -> None:
        if self.enabled:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def advance(self, n: int = 1, failed: bool = False) -> None:
        if failed:
            self.failures += n
        if self.enabled:
            self._postfix(force=failed)
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self._postfix(force=True)
            with contextlib.suppress(ValueError):
                self.stats.remove_listener(self._on_event)
        self.bar.close()


class FailureGuard:
    """Aborts a job that is failing wholesale: when, over the last ``window`` finished
    items (at least ``min_items`` of them), the share of endpoint failures passes
    ``max_rate``. ``max_rate >= 1`` turns it off."""

    def __init__(self, max_rate: float, window: int = 200, min_items: int = 50) -> None:
        self.max_rate = max_rate
        self.window: collections.deque[bool] = collections.deque(maxlen=window)
        self.min_items = min_items
        self.failed = 0

    def record(self, failed: bool, reason: str = "") -> None:
        if self.max_rate >= 1.0:
            return
        if len(self.window) == self.window.maxlen and self.window[0]:
            self.failed -= 1
        self.window.append(failed)
        self.failed += failed
        n = len(self.window)
        if n >= self.min_items and self.failed / n > self.max_rate:
            raise JobAborted(
                f"{self.failed} of the last {n} items failed at the endpoint (over --max-failure-rate "
                f"{self.max_rate:g}); last error: {reason}; finished shards are kept, run again once "
                "the endpoint is healthy"
            )


def failures_text(rows: Sequence[dict[str, Any]]) -> str:
    """The failures file: one JSON object per line (key, source, class, kind, reason)."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
