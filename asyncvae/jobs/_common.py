"""Pieces shared by the encode and decode jobs: the client (or the embedded server),
the progress bar, the summary, running an async job from sync code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm
from yarl import URL

from ..client import Client
from ..config import Limits, Retry, Timeout
from ..errors import InputError
from ..errors import RetryExhausted as _RetryExhausted

T = TypeVar("T")

EMBEDDED_LABEL = "embedded"


@dataclass
class JobSummary:
    """What a dataset job did.

    Attributes:
        out: the output folder.
        items: inputs in this worker's shards (all of them without ``--num-shards``).
        processed: items handled in this run (those of skipped, complete shards excluded).
        ok / failures: items done well / failed, including those of skipped shards.
        shards_written / shards_skipped: shards written now / already complete (resume).
        seconds: wall time of the run.
        bytes_sent / bytes_received: request and response body bytes of this run.
        retries: retried requests in this run.
        failures_path: the failures listing, when there were failures.
        endpoint: where requests went (host names only, or ``embedded``).
    """

    out: Path
    items: int = 0
    processed: int = 0
    ok: int = 0
    failures: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0
    failures_path: Path | None = None
    endpoint: str = ""
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

    def line(self, verb: str = "encoded") -> str:
        """A one-line human summary."""
        written = f", {self.shards_written} shard(s) written" if self.shards_written else ""
        skipped = f", {self.shards_skipped} shard(s) already complete" if self.shards_skipped else ""
        return (
            f"{verb} {self.processed} item(s) in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s, "
            f"{self.mb_per_s:.1f} MB/s), {self.ok} ok, {self.failures} failed{written}{skipped}, "
            f"{self.retries} retries -> {self.out}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["failures_path"] = str(self.failures_path) if self.failures_path else None
        d["images_per_s"] = self.images_per_s
        return d


def log(msg: str, quiet: bool = False) -> None:
    """One line to stderr (suppressed by ``quiet``)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def endpoint_label(urls: Sequence[str]) -> str:
    """Host names only (never a token, port, path or query) for shard metadata."""
    hosts = sorted({URL(u).host or "?" for u in urls})
    return ",".join(hosts)


def make_client(
    endpoints: str | Sequence[str],
    *,
    concurrency: int,
    retry: Retry | None = None,
    timeout: Timeout | None = None,
    token: str | bool | None = None,
) -> Client:
    """A :class:`Client` sized for a dataset job: ``concurrency`` requests in flight and as
    many queued (the reorder window, hence memory, stays ~2x concurrency items)."""
    if concurrency < 1:
        raise InputError(f"concurrency {concurrency} must be >= 1")
    return Client(
        endpoints,
        limits=Limits(max_concurrency=concurrency, max_queued=max(8, concurrency)),
        retry=retry,
        timeout=timeout,
        token=token,
    )


@contextlib.asynccontextmanager
async def job_client(
    endpoint: str | Sequence[str] | None,
    client: Client | None,
    *,
    concurrency: int,
    retry: Retry | None,
    timeout: Timeout | None,
    token: str | bool | None,
    quiet: bool,
    command: str,
) -> AsyncIterator[tuple[Client, str]]:
    """The client to use and the endpoint label: the caller's ``client`` (left open), a
    new one for ``endpoint``, or — with neither — one for the built-in reference
    server started in this process on 127.0.0.1 and an ephemeral port."""
    if client is not None:
        yield client, endpoint_label(client.endpoints)
        return
    if endpoint:
        urls = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        async with make_client(urls, concurrency=concurrency, retry=retry, timeout=timeout, token=token) as c:
            yield c, endpoint_label(urls)
        return
    from ..server import LocalServer, ServerConfig

    srv = LocalServer(ServerConfig(replicas=max(1, min(4, os.cpu_count() or 1))))
    await asyncio.to_thread(srv.start)
    log(
        f"asyncvae {command}: no --endpoint given; started the built-in reference server at {srv.url} "
        "(weightless demo model, not a real VAE)",
        quiet,
    )
    try:
        async with make_client(srv.url, concurrency=concurrency, retry=retry, timeout=timeout, token=False) as c:
            yield c, EMBEDDED_LABEL
    finally:
        await asyncio.to_thread(srv.stop)


class Progress:
    """A tqdm bar fed by the job (items accounted) and by ``client.stats`` events
    (retries, failures), showing img/s, MB/s, retries and failures."""

    def __init__(self, client: Client, total: int, desc: str, enabled: bool) -> None:
        self.stats = client.stats
        self.t0 = time.perf_counter()
        self.bytes0 = self.stats.bytes_in + self.stats.bytes_out
        self.retries0 = sum(self.stats.retries.values())
        self.failures = 0
        self._last = 0.0
        self.bar = tqdm(
            total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
            mininterval=0.5, dynamic_ncols=True, smoothing=0.05,
        )
        self.enabled = enabled
        if enabled:
            self.stats.add_listener(self._on_event)

    def _on_event(self, event: str, stats: Any) -> None:
        if event == "retry":
            self._postfix(force=False)

    def retries(self) -> int:
        return sum(self.stats.retries.values()) - self.retries0

    def bytes(self) -> int:
        return self.stats.bytes_in + self.stats.bytes_out - self.bytes0

    def _postfix(self, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        mbs = self.bytes() / 1e6 / max(1e-9, now - self.t0)
        self.bar.set_postfix_str(f"{mbs:.1f}MB/s retries={self.retries()} failed={self.failures}", refresh=False)

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


def describe_error(e: BaseException) -> str:
    """A one-line reason for a failed item."""
    if isinstance(e, _RetryExhausted):
        return str(e)
    text = str(e) or type(e).__name__
    return text if isinstance(e, InputError) else f"{type(e).__name__}: {text}"


def prepare_out(out: str | os.PathLike[str]) -> Path:
    """Create the output folder and check it is writable (an :class:`InputError` with a
    one-line reason otherwise)."""
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".asyncvae-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder {str(p)!r} is not writable: {e.strerror or e}") from None
    return p


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from .shards import atomic_write

    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def finish(summary: JobSummary, fail_path: Path, failures: Sequence[dict[str, Any]], t_start: float) -> JobSummary:
    """Write (or remove a stale) failures file and stamp the job's wall time."""
    if failures:
        write_jsonl(fail_path, failures)
        summary.failures_path = fail_path
    else:
        with contextlib.suppress(FileNotFoundError):
            fail_path.unlink()
    summary.seconds = time.perf_counter() - t_start
    return summary


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a job coroutine to completion from sync code — also inside Jupyter, where a
    loop is already running (then on a fresh loop in a helper thread). Uses uvloop
    when it is installed."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncvae-job") as ex:
        return ex.submit(_run, coro).result()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    factory = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
