"""The preprocessing pool: image files → wire arrays, off the event loop, on every CPU
this process may use.

A job prepares items in worker processes (``concurrent.futures.ProcessPoolExecutor``)
sized to ``len(os.sched_getaffinity(0))`` — the CPUs of the container or cgroup, not
of the host — started at the very beginning of the job (see :func:`start_processes`). Workers return compact numpy arrays (the wire
dtype, or uint8 pixels for PNG); the event loop only wraps them. Small runs (under
:data:`PROCESS_MIN_ITEMS` items to prepare) use threads instead, where starting
processes would cost more than it saves.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .preprocess import _LUT, DEFAULT_MAX_PIXELS, load_image
from .sources import Item, read_item, read_sidecars

__all__ = ["PROCESS_MIN_ITEMS", "ImageSpec", "Prepared", "available_cpus", "prepare_item", "start_processes", "thread_pool"]

#: Below this many items to prepare, a job uses threads instead of processes.
PROCESS_MIN_ITEMS = 256
#: How often a worker process checks that its job is still alive (seconds).
PARENT_POLL_S = 0.5


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask / cgroup), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ImageSpec:
    """How to turn an image into what is sent (picklable: it travels to the workers)."""

    resolution: tuple[int, int]
    crop: str = "center"
    alpha: str = "white"
    wire: str = "float16"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    resample: str = "lanczos"


@dataclass(frozen=True)
class Prepared:
    """A prepared item: ``array`` is ``[3, H, W]`` in the wire dtype (``[H, W, 3]`` uint8
    for ``png``); ``size``/``crop`` as in :class:`asyncvae.jobs.Prepared`; ``sidecars``
    the text of its ``txt``/``json``/``cls`` sidecars."""

    array: np.ndarray
    size: tuple[int, int]
    crop: tuple[float, float, float, float]
    sidecars: dict[str, str]


def prepare_item(item: Item, spec: ImageSpec) -> Prepared:
    """Read, decode, orient, convert and resize one item; raises :class:`InputError`."""
    data = read_item(item)
    p = load_image(data, spec.resolution, spec.crop, spec.alpha, spec.max_pixels, spec.resample)  # type: ignore[arg-type]
    if spec.wire == "png":
        arr = p.pixels
    else:
        chw = np.ascontiguousarray(p.pixels.transpose(2, 0, 1))
        arr = chw if spec.wire == "uint8" else _LUT[spec.wire][chw]
    return Prepared(arr, p.size, p.crop, read_sidecars(item) if item.sidecars else {})


def _init_worker() -> None:  # pragma: no cover - runs in the workers
    # one thread per worker process: the pool is the parallelism
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A worker whose job was killed (SIGKILL, the OOM killer) would wait on the pool's
    # queue forever (its siblings hold the queue's other end): leave once the parent
    # (the job, or the forkserver that dies with it) is gone.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="asyncvae-parent-watch",
                     daemon=True).start()


def _exit_with_parent(parent: int) -> None:  # pragma: no cover - runs in the workers
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(0)


def _main_is_importable() -> bool:
    """Whether worker processes can re-import ``__main__`` (they do, unless it has no file:
    a REPL or Jupyter); a script read from stdin cannot be."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def start_processes(workers: int | None) -> concurrent.futures.ProcessPoolExecutor | None:
    """Start the worker processes now, or ``None`` with one CPU (threads do then).

    Called at the very start of a job: while the process has no other thread yet (the
    CLI), workers are ``fork``-ed — instant, and they share the modules already imported.
    Where threads exist (a notebook, an app, a test server), ``forkserver`` is used
    instead (never ``fork`` with threads); its server imports this module once. As with
    any process pool, a script must then guard its top level with
    ``if __name__ == "__main__":``. A script read from stdin cannot start one (threads)."""
    n = workers or available_cpus()
    if n < 2 or not _main_is_importable():
        return None
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        ctx: Any = multiprocessing.get_context("fork")
    else:
        ctx = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["asyncvae.jobs.prep"])
    pool = concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker)
    pool.submit(os.getpid)  # launch the workers now (fork: before any thread starts)
    return pool


def thread_pool(workers: int | None) -> concurrent.futures.ThreadPoolExecutor:
    """Preprocessing threads (Pillow releases the GIL while decoding and resampling)."""
    return concurrent.futures.ThreadPoolExecutor(max(2, workers or available_cpus()), thread_name_prefix="asyncvae-prep")
