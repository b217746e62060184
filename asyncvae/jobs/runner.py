"""Running a job coroutine from sync code (also inside Jupyter's running loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run_sync"]


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
