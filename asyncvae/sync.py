"""Synchronous front door: ``remote_decode``/``remote_encode`` with diffusers' documented
signatures, and ordered ``remote_decode_batch``/``remote_encode_batch``.

All calls run on one private event loop (uvloop when importable) in a daemon thread,
with one pooled :class:`~asyncvae.Client` per endpoint, so connections are reused
across calls. They work from plain scripts, from many threads at once, and inside
Jupyter (whose own running loop is left alone). The loop and its clients are closed
at interpreter exit, and re-created in a forked child.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Literal, TypeVar

import torch
from PIL import Image

from .client import Client
from .errors import ClientClosedError, InputError, ItemError

__all__ = [
    "configure",
    "remote_decode",
    "remote_decode_batch",
    "remote_encode",
    "remote_encode_batch",
    "shutdown",
]

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.new_event_loop()


class _LoopThread:
    """One event loop running in a daemon thread, with cached clients.

    Clients are cached per endpoint and per *generation* of options: ``configure()``
    starts a new generation, so a call that starts after it uses the new options,
    while calls already running on an older client finish there; that client is
    closed once it is idle.
    """

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.clients: dict[tuple[int, str], Client] = {}
        self.active: dict[Client, int] = {}
        self.retired: set[Client] = set()
        #: calls submitted from other threads and not yet answered (failed on close)
        self.pending: set[concurrent.futures.Future[Any]] = set()
        self.pending_lock = threading.Lock()
        self.closing = False
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="asyncvae-loop", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    # ---- on the loop thread
    def _client(self, endpoint: str, generation: int, kwargs: dict[str, Any]) -> Client:
        key = (generation, endpoint)
        c = self.clients.get(key)
        if c is None:
            self.retire_before(generation)
            c = self.clients[key] = Client(endpoint, **kwargs)
        return c

    def retire_before(self, generation: int) -> None:
        """Retire the clients of older generations (closed now if idle, else when idle)."""
        for old_key in [k for k in self.clients if k[0] < generation]:
            self._retire(self.clients.pop(old_key))

    def _retire(self, c: Client) -> None:
        if self.active.get(c, 0) == 0:
            self.loop.create_task(c.aclose())
        else:
            self.retired.add(c)

    async def _call(self, endpoint: str, generation: int, kwargs: dict[str, Any],
                    call: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
        c = self._client(endpoint, generation, kwargs)
        self.active[c] = self.active.get(c, 0) + 1
        try:
            return await call(c)
        finally:
            n = self.active[c] = self.active[c] - 1
            if n == 0:
                del self.active[c]
                if c in self.retired:
                    self.retired.discard(c)
                    await c.aclose()

    # ---- from any other thread
    def run(self, endpoint: str, call: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
        """Run ``call(client)`` on the loop with the endpoint's cached client; wait for it."""
        if threading.current_thread() is self.thread:
            raise RuntimeError(
                "asyncvae's sync functions were called from its own event loop thread; "
                "use `await Client.decode(...)` there instead"
            )
        with _lock:
            generation, kwargs = _generation, _client_kwargs
        coro = self._call(endpoint, generation, kwargs, call)
        with self.pending_lock:
            if self.closing:
                coro.close()
                raise ClientClosedError("asyncvae.shutdown() was called; the call was not sent")
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self.pending.add(fut)
        try:
            return fut.result()
        except (KeyboardInterrupt, SystemExit):
            fut.cancel()
            raise
        except concurrent.futures.CancelledError:
            raise ClientClosedError("asyncvae.shutdown() stopped the call while it ran") from None
        finally:
            with self.pending_lock:
                self.pending.discard(fut)

    def close(self, timeout: float = 10.0) -> None:
        """Close every client (calls still running end with ClientClosedError), then
        stop the loop and its thread."""

        async def _close() -> None:
            clients = set(self.clients.values()) | self.retired | set(self.active)
            self.clients.clear()
            self.retired.clear()
            await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
            # let the calls that were woken with ClientClosedError hand it to their threads
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if pending:
                await asyncio.wait(pending, timeout=timeout / 2)
                for t in pending:
                    t.cancel()

        with self.pending_lock:
            self.closing = True  # no new calls from here on
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        with self.pending_lock:
            stranded, self.pending = list(self.pending), set()
        for fut in stranded:  # never run, or never finished: their callers must not hang
            fut.cancel()
        if not self.thread.is_alive():
            self.loop.close()


_lock = threading.Lock()
_runner: _LoopThread | None = None
_client_kwargs: dict[str, Any] = {}
_generation = 0
_ALLOWED = frozenset({"limits", "timeout", "retry", "token", "headers", "verify", "transport"})


def _get_runner() -> _LoopThread:
    global _runner
    r = _runner
    if r is not None and r.thread.is_alive():
        return r
    with _lock:
        if _runner is None or not _runner.thread.is_alive():
            _runner = _LoopThread()
        return _runner


def configure(**client_kwargs: Any) -> None:
    """Set the :class:`~asyncvae.Client` options (``limits``, ``timeout``, ``retry``,
    ``token``, ``headers``, ``verify``, ``transport``) used by the sync functions.

    Calls that start after ``configure()`` returns use the new options, from any
    thread; calls already running finish with the options they started with (their
    client is closed once idle). The options are checked here: a bad value raises
    :class:`~asyncvae.InputError` and leaves the old ones in place.
    """
    global _client_kwargs, _generation
    unknown = set(client_kwargs) - _ALLOWED
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_ALLOWED))}")
    Client("http://127.0.0.1/", **client_kwargs)  # checks the values; makes no connection
    with _lock:
        _client_kwargs = dict(client_kwargs)
        _generation += 1
        generation, r = _generation, _runner
    if r is not None and r.thread.is_alive():
        # close the idle clients of the old options now (busy ones once they are idle)
        with contextlib.suppress(RuntimeError):
            r.loop.call_soon_threadsafe(r.retire_before, generation)


def shutdown() -> None:
    """Close the sync clients and stop the background loop (also done at exit).

    Calls running in other threads end with :class:`~asyncvae.ClientClosedError`
    instead of hanging; the next sync call starts a fresh loop."""
    global _runner
    with _lock:
        r, _runner = _runner, None
    if r is not None:
        r.close()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    def _after_fork() -> None:
        global _runner, _lock
        _runner = None  # the thread did not survive the fork
        _lock = threading.Lock()

    os.register_at_fork(after_in_child=_after_fork)


def _run(endpoint: str, call: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
    return _get_runner().run(endpoint, call)


def remote_decode(
    endpoint: str,
    tensor: torch.Tensor,
    processor: Any = None,
    do_scaling: bool = True,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    output_type: Literal["mp4", "pil", "pt"] = "pil",
    return_type: Literal["mp4", "pil", "pt"] = "pil",
    image_format: Literal["png", "jpg"] = "jpg",
    partial_postprocess: bool = False,
    input_tensor_type: Literal["binary"] = "binary",
    output_tensor_type: Literal["binary"] = "binary",
    height: int | None = None,
    width: int | None = None,
) -> Image.Image | list[Image.Image] | bytes | torch.Tensor:
    """Decode latents on a remote VAE endpoint — a drop-in for ``diffusers.utils.remote_decode``.

    Same arguments, defaults and results as diffusers' function, with a pooled
    connection, timeouts and retries. Where diffusers breaks, this works or says why:
    ``output_type="mp4"`` returns the mp4 ``bytes`` whatever ``return_type`` is;
    non-contiguous and CUDA tensors are sent by their logical values; a non-JSON error
    body still raises the HTTP error.

    Args:
        endpoint: the endpoint URL.
        tensor: latents: ``[B,C,H,W]`` image, ``[B,C,T,H,W]`` video, or packed
            ``[B,seq,C]`` with ``height``/``width``; float16, bfloat16 or float32.
        processor: a diffusers ``VaeImageProcessor``/``VideoProcessor`` (duck-typed);
            needed for ``output_type="pt"``, ``return_type="pil"`` without
            ``partial_postprocess``, and flags video models for ``output_type="pil"``.
        do_scaling: deprecated; ``True`` without ``scaling_factor`` asks the server to
            apply its model's default scaling. ``False`` sends no scaling at all.
        scaling_factor, shift_factor: the endpoint computes ``latents / scaling_factor + shift_factor``.
        output_type: what the endpoint sends: ``"pil"`` (an encoded image), ``"pt"`` (a
            tensor) or ``"mp4"`` (video bytes).
        return_type: what this function returns: ``"pil"``, ``"pt"`` or ``"mp4"``.
        image_format: ``"jpg"`` or ``"png"``, for ``output_type="pil"``.
        partial_postprocess: with ``output_type="pt"``, the endpoint sends uint8 images.
        input_tensor_type, output_tensor_type: ``"binary"`` (``"base64"`` is deprecated
            and means binary).
        height, width: pixel size, required for packed latents.

    Returns:
        A ``PIL.Image``, a list of them, a ``torch.Tensor`` or ``bytes``, as diffusers does.

    Raises:
        InputError: (a ``ValueError``) bad arguments; nothing was sent.
        EndpointError / RetryExhausted: (``RuntimeError``) the endpoint failed;
            ``args[0]`` is its JSON error body.
        ProtocolError: the answer broke the protocol.
    """
    opts = dict(
        processor=processor, do_scaling=do_scaling, scaling_factor=scaling_factor, shift_factor=shift_factor,
        output_type=output_type, return_type=return_type, image_format=image_format,
        partial_postprocess=partial_postprocess, input_tensor_type=input_tensor_type,
        output_tensor_type=output_tensor_type, height=height, width=width,
    )
    return _run(endpoint, lambda c: c.decode(tensor, **opts))


def remote_encode(
    endpoint: str,
    image: torch.Tensor | Image.Image,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """Encode an image on a remote VAE endpoint — a drop-in for ``diffusers.utils.remote_encode``.

    Args:
        endpoint: the endpoint URL.
        image: a ``PIL.Image`` (sent as PNG) or an image tensor ``[B,3,H,W]``/``[3,H,W]``
            (float in [-1, 1], sent by its logical values even when non-contiguous).
        scaling_factor, shift_factor: the endpoint computes ``(latents - shift_factor) * scaling_factor``.

    Returns:
        The latents, a ``torch.Tensor`` ``[B,C,H/8,W/8]``.
    """
    return _run(endpoint, lambda c: c.encode(image, scaling_factor=scaling_factor, shift_factor=shift_factor))


async def _collect(it: Any) -> list[Any]:
    return [x async for x in it]


def remote_decode_batch(
    endpoint: str, items: Iterable[torch.Tensor], *, on_error: Literal["yield", "raise"] = "yield", **options: Any
) -> list[Any]:
    """Decode many latents concurrently; results in input order.

    ``options`` are ``remote_decode``'s keywords. A failed item is an
    :class:`~asyncvae.ItemError` in its place (``on_error="yield"``, the default) or
    raises (``on_error="raise"``); the other items are never lost or reordered.
    """
    return _run(endpoint, lambda c: _collect(c.decode_many(items, on_error=on_error, **options)))


def remote_encode_batch(
    endpoint: str, items: Iterable[Any], *, on_error: Literal["yield", "raise"] = "yield", **options: Any
) -> list[torch.Tensor | ItemError]:
    """Encode many images concurrently; results in input order (see :func:`remote_decode_batch`)."""
    return _run(endpoint, lambda c: _collect(c.encode_many(items, on_error=on_error, **options)))
