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
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Literal, TypeVar

import torch
from PIL import Image

from .client import Client
from .errors import InputError, ItemError

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
    """One event loop running forever in a daemon thread, with cached clients."""

    def __init__(self, client_kwargs: dict[str, Any]):
        self.loop = _new_loop()
        self.clients: dict[str, Client] = {}
        self.client_kwargs = client_kwargs
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="asyncvae-loop", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def client(self, endpoint: str) -> Client:
        # runs on the loop thread
        c = self.clients.get(endpoint)
        if c is None:
            c = Client(endpoint, **self.client_kwargs)
            self.clients[endpoint] = c
        return c

    def run(self, endpoint: str, call: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
        """Run ``call(client)`` on the loop with the endpoint's cached client; wait for it."""
        if threading.current_thread() is self.thread:
            raise RuntimeError(
                "asyncvae's sync functions were called from its own event loop thread; "
                "use `await Client.decode(...)` there instead"
            )

        async def go() -> T:
            return await call(self.client(endpoint))

        fut = asyncio.run_coroutine_threadsafe(go(), self.loop)
        try:
            return fut.result()
        except (KeyboardInterrupt, SystemExit):
            fut.cancel()
            raise
        except concurrent.futures.CancelledError:
            raise RuntimeError("the asyncvae loop was shut down while the call was running") from None

    def close(self, timeout: float = 5.0) -> None:
        async def _close() -> None:
            for c in list(self.clients.values()):
                await c.aclose()
            self.clients.clear()

        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


_lock = threading.Lock()
_runner: _LoopThread | None = None
_client_kwargs: dict[str, Any] = {}


def _get_runner() -> _LoopThread:
    global _runner
    r = _runner
    if r is not None and r.thread.is_alive():
        return r
    with _lock:
        if _runner is None or not _runner.thread.is_alive():
            _runner = _LoopThread(dict(_client_kwargs))
        return _runner


def configure(**client_kwargs: Any) -> None:
    """Set the :class:`~asyncvae.Client` options (``limits``, ``timeout``, ``retry``,
    ``token``, ``headers``, ``verify``) used by the sync functions from now on.

    Cached clients are closed; the next call makes new ones with these options.
    """
    global _client_kwargs
    allowed = {"limits", "timeout", "retry", "token", "headers", "verify"}
    unknown = set(client_kwargs) - allowed
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(allowed))}")
    shutdown()
    _client_kwargs = dict(client_kwargs)


def shutdown() -> None:
    """Close the sync clients and stop the background loop (also done at exit)."""
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
