"""The preprocessing pool: image files → wire arrays, off the event loop, on every CPU
this process may use.

A job prepares items in worker processes (``concurrent.futures.ProcessPoolExecutor``,
``forkserver`` start) sized to ``len(os.sched_getaffinity(0))`` — the CPUs of the
container or cgroup, not of the host. Workers return compact numpy arrays (the wire
dtype, or uint8 pixels for PNG); the event loop only wraps them. Small runs (under
:data:`PROCESS_MIN_ITEMS` items to prepare) use threads instead, where starting
processes would cost more than it saves.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from .preprocess import _LUT, DEFAULT_MAX_PIXELS, load_image
from .sources import Item, read_item, read_sidecars

__all__ = ["PROCESS_MIN_ITEMS", "ImageSpec", "Prepared", "available_cpus", "make_pool", "prepare_item"]

#: Below this many items to prepare, a job uses threads instead of processes.
PROCESS_MIN_ITEMS = 256


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
    p = load_image(data, spec.resolution, spec.crop, spec.alpha, spec.max_pixels)  # type: ignore[arg-type]
    if spec.wire == "png":
        arr = p.pixels
    else:
        chw = np.ascontiguousarray(p.pixels.transpose(2, 0, 1))
        arr = chw if spec.wire == "uint8" else _LUT[spec.wire][chw]
    return Prepared(arr, p.size, p.crop, read_sidecars(item) if item.sidecars else {})


def _init_worker() -> None:  # pragma: no cover - runs in the workers
    # one thread per worker process: the pool is the parallelism
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_pool(workers: int | None, n_items: int, kind: str = "auto") -> concurrent.futures.Executor:
    """An executor for :func:`prepare_item`: processes (``kind="process"``, or ``"auto"``
    with at least :data:`PROCESS_MIN_ITEMS` items and more than one worker) or threads."""
    n = workers or available_cpus()
    if kind not in ("auto", "process", "thread"):
        raise InputError(f"pool kind {kind!r} must be auto, process or thread")
    use_processes = kind == "process" or (kind == "auto" and n > 1 and n_items >= PROCESS_MIN_ITEMS)
    if not use_processes:
        return concurrent.futures.ThreadPoolExecutor(max(2, n), thread_name_prefix="asyncvae-prep")
    method = "forkserver" if sys.platform.startswith("linux") else "spawn"
    ctx: Any = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["asyncvae.jobs.prep"])
    return concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker)
