"""What one server instance shares between requests: its config, the model (loaded
in the background when it comes from a path), the replica slots and batcher, the
response cache, the fault configuration, the counters of ``/stats`` and the
Prometheus metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .batching import Batcher, execute
from .codec import HTTPFail, Job, Result
from .config import FAULT_KINDS, Faults, ServerConfig
from .metrics import Metrics
from .model import BuiltinVAE, VAEModel

__all__ = ["ModelSpec", "ServerState", "Stats", "Ticket"]

log = logging.getLogger("asyncvae.server")

#: A model, a function that loads one, or a path (``"builtin"``, a diffusers folder);
#: functions and folders are loaded on a thread after the server binds.
ModelSpec = VAEModel | Callable[[], VAEModel] | str | os.PathLike[str] | None


class Stats:
    """Thread-safe counters shown by ``GET /stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queue_depth = 0
        self.in_flight = 0
        self.in_service = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter (the gauges keep their current values)."""
        with self._lock:
            self.requests: dict[str, int] = {}
            self.responses: dict[str, int] = {}
            self.faults: dict[str, int] = {}
            self.batch_sizes: dict[str, int] = {}
            self.cache_hits = 0
            self.batches = 0
            self.max_queue_depth = self.queue_depth
            self.max_in_flight = self.in_flight

    def count(self, table: str, key: str, n: int = 1) -> None:
        """Add ``n`` to ``table[key]`` (requests, responses, faults, batch_sizes)."""
        with self._lock:
            d: dict[str, int] = getattr(self, table)
            d[key] = d.get(key, 0) + n

    def add(self, name: str, delta: int) -> None:
        """Add ``delta`` to a gauge or counter attribute (tracking the peaks)."""
        with self._lock:
            v = getattr(self, name) + delta
            setattr(self, name, v)
            if name == "queue_depth":
                self.max_queue_depth = max(self.max_queue_depth, v)
            elif name == "in_flight":
                self.max_in_flight = max(self.max_in_flight, v)

    def snapshot(self) -> dict[str, Any]:
        """A copy of every counter and gauge."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "responses": dict(self.responses),
                "faults": dict(self.faults),
                "cache_hits": self.cache_hits,
                "batches": self.batches,
                "batch_sizes": dict(self.batch_sizes),
                "queue_depth": self.queue_depth,
                "max_queue_depth": self.max_queue_depth,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "in_service": self.in_service,
            }


class Ticket:
    """One admitted request's place in the queue count: counted as waiting from
    admission until its batch starts (:meth:`start`) or it ends (:meth:`done`)."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._waiting = True
        self._serving = False
        stats.add("queue_depth", 1)

    def start(self) -> None:
        """Its batch started computing."""
        if self._waiting:
            self._waiting = False
            self._serving = True
            self._stats.add("queue_depth", -1)
            self._stats.add("in_service", 1)

    def done(self) -> None:
        """The request is over (answered, failed or cancelled); idempotent."""
        if self._waiting:
            self._waiting = False
            self._stats.add("queue_depth", -1)
        if self._serving:
            self._serving = False
            self._stats.add("in_service", -1)


class ServerState:
    """Everything one app instance shares: config, model, replica slots and batcher,
    thread pool, stats, metrics, faults (swappable at runtime from any thread) and the
    response cache.

    ``model`` is a :class:`VAEModel` (ready at once), a function returning one, a path,
    or None for ``config.model`` (``"builtin"``: the built-in model at once; a diffusers
    folder, loaded with the config's device/dtype/tiling/slicing). A function or a folder
    is loaded on a thread once the server runs (:meth:`start`); until it is loaded the
    server answers 503 with ``Retry-After``.
    """

    def __init__(self, config: ServerConfig, model: ModelSpec = None) -> None:
        self.config = config
        self.model: VAEModel | None = None
        self._loader: Callable[[], VAEModel] | None = None
        spec = str(model) if isinstance(model, (str, os.PathLike)) else config.model
        if isinstance(model, VAEModel):
            self.model = model
        elif callable(model):
            self._loader = model
        elif spec == "builtin":
            self.model = BuiltinVAE(config.latent_channels)
        else:
            from .diffusers_model import load_model

            self._loader = functools.partial(
                load_model,
                spec,
                config.latent_channels,
                device=config.device,
                dtype=config.dtype,
                tiling=config.tiling,
                slicing=config.slicing,
            )
        #: One line saying why the model failed to load (None while loading or when loaded).
        self.load_error: str | None = None
        #: Seconds the model took to load (None until loaded in the background).
        self.load_seconds: float | None = None
        self.draining = False
        self.stats = Stats()
        self.metrics = Metrics(
            {
                "queue_depth": lambda: self.stats.queue_depth,
                "in_flight": lambda: self.stats.in_flight,
                "in_service": lambda: self.stats.in_service,
                "model_ready": lambda: float(self.ready),
            }
        )
        self._faults = config.faults
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._cache: dict[tuple[Any, ...], Result] = {}
        self.executor = ThreadPoolExecutor(config.replicas, thread_name_prefix="asyncvae-replica")
        self.batcher: Batcher[Job] = Batcher(
            config.replicas, config.max_batch, config.batch_wait_ms / 1000.0, self._run_batch
        )
        self._load_task: asyncio.Task[None] | None = None
        self._settled: asyncio.Event | None = None

    # ---- lifecycle
    @property
    def ready(self) -> bool:
        """The model is loaded and the server is not draining."""
        return self.model is not None and not self.draining

    async def start(self) -> None:
        """Start the replica slots and, if needed, the background model load."""
        self._settled = asyncio.Event()
        self.batcher.start()
        if self.model is not None or self._loader is None:
            self._settled.set()
        else:
            self._load_task = asyncio.create_task(self._load(self._loader))

    async def _load(self, loader: Callable[[], VAEModel]) -> None:
        assert self._settled is not None
        t0 = time.perf_counter()
        try:
            model = await asyncio.to_thread(loader)
        except Exception as e:
            text = str(e).strip().splitlines()
            self.load_error = text[0] if text else type(e).__name__
            log.error("model failed to load: %s", self.load_error)
        else:
            self.load_seconds = time.perf_counter() - t0
            self.model = model
        finally:
            self._settled.set()

    async def wait_loaded(self) -> bool:
        """Wait until the model is loaded (True) or failed to load (False)."""
        assert self._settled is not None, "ServerState.start() was not called"
        await self._settled.wait()
        return self.model is not None

    async def close(self) -> None:
        """Stop the slots (failing what still waits) and release the thread pool."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.batcher.stop(HTTPFail(503, "503 Service Unavailable: the server is shutting down"))
        self.executor.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        """The ``GET /stats`` document: counters plus model, replicas and batching."""
        snap = self.stats.snapshot()
        snap["model"] = self.model.name if self.model is not None else None
        snap["ready"] = self.ready
        snap["replicas"] = self.config.replicas
        snap["max_batch"] = self.config.max_batch
        return snap

    # ---- faults
    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def set_faults(self, faults: Faults) -> None:
        """Swap the fault configuration (thread-safe; applies to the next request)."""
        with self._lock:
            self._faults = faults

    def draw_faults(self) -> tuple[Faults, set[str]]:
        """One RNG draw per configured fault kind; returns the config and the kinds hit."""
        with self._lock:
            f = self._faults
            hit = set()
            for kind in FAULT_KINDS:
                p = getattr(f, kind)
                if p > 0 and self._rng.random() < p:
                    hit.add(kind)
            return f, hit

    def random(self) -> float:
        """A draw from the seeded fault RNG."""
        with self._lock:
            return self._rng.random()

    # ---- service
    def admit(self) -> Ticket:
        """Count a request as waiting (raises 429 when ``max_queue`` are already waiting)."""
        limit = self.config.max_queue
        if limit and self.stats.queue_depth >= limit:
            raise HTTPFail(
                429,
                f"429 Too Many Requests: {self.stats.queue_depth} requests are already waiting "
                f"(max_queue={limit}); retry later",
                {"Retry-After": retry_after_value(self.config.busy_retry_after)},
            )
        return Ticket(self.stats)

    async def run(self, job: Job, ticket: Ticket | None = None) -> Result:
        """Compute (or replay from the cache) a job in a batch on a replica slot."""
        return await self.batcher.submit(job, ticket.start if ticket is not None else None)

    def _execute(self, model: VAEModel, jobs: list[Job]) -> Any:
        """One batch on the calling replica thread (per-thread torch settings apply)."""
        n = model.intra_op_threads
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)  # OpenMP: this thread only
        if model.thread_safe:
            return execute(model, jobs)
        with self._model_lock:
            return execute(model, jobs)

    async def _run_batch(self, jobs: list[Job]) -> list[Any]:
        """One batch on one slot: replay cached answers, compute the rest in one forward
        pass on a replica thread, and hold the slot for at least the configured service
        time ``delay_ms + items * delay_per_item_ms``."""
        cfg = self.config
        model = self.model
        assert model is not None
        loop = asyncio.get_running_loop()
        items = sum(j.items for j in jobs)
        until = loop.time() + (cfg.delay_ms + items * cfg.delay_per_item_ms) / 1000.0
        outcomes: list[Any] = [None] * len(jobs)
        todo: list[int] = []
        for i, job in enumerate(jobs):
            hit = self._cache.get(job.cache_key) if cfg.cache else None
            if hit is not None:
                outcomes[i] = hit
                self.stats.add("cache_hits", 1)
            else:
                todo.append(i)
        if todo:
            run = await loop.run_in_executor(
                self.executor, self._execute, model, [jobs[i] for i in todo]
            )
            for i, outcome in zip(todo, run.outcomes, strict=True):
                outcomes[i] = outcome
                if cfg.cache and isinstance(outcome, Result):
                    self._cache[jobs[i].cache_key] = outcome
            if run.forward_passes:
                self.metrics.observe_batch(
                    jobs[todo[0]].fn, len(todo), sum(jobs[i].items for i in todo), run.compute_seconds
                )
        self.stats.add("batches", 1)
        self.stats.count("batch_sizes", str(len(jobs)))
        left = until - loop.time()
        if left > 0:
            await asyncio.sleep(left)
        return outcomes


def retry_after_value(seconds: float) -> str:
    """A ``Retry-After`` value: an integer when whole, else a decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
