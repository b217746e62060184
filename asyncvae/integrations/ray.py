"""Ray Data adapter: encode image batches into latents with one pooled client per actor.

::

    import ray
    from asyncvae.integrations.ray import VAEEncode

    ds = ray.data.read_images("s3://bucket/images/", size=(512, 512), mode="RGB")
    ds = ds.map_batches(
        VAEEncode,
        fn_constructor_kwargs={"endpoint": "https://…endpoints.huggingface.cloud/", "scaling_factor": 0.18215},
        concurrency=4,            # actors; each keeps its own connection pool
        batch_size=64,
        batch_format="numpy",
    )

Ray is an optional extra (``pip install asyncvae[ray]``); this module does not import
it. :class:`VAEEncode` is a plain callable: ``VAEEncode(endpoint)({"image": arr})``
works without Ray too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from ..client import Client
from ..config import Limits, Retry, Timeout
from ..errors import InputError, ItemError
from ..jobs.preprocess import CROP_MODES, load_image, parse_resolution, prepare, to_wire_tensor

__all__ = ["VAEEncode"]

T = TypeVar("T")


class _Loop:
    """A private event loop (uvloop when importable) running in a daemon thread."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="asyncvae-ray-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class VAEEncode:
    """A callable class for ``Dataset.map_batches``: adds a latent column to a batch.

    Each instance (one per Ray actor) owns one :class:`~asyncvae.Client` on a private
    event loop thread, so connections are pooled across batches, and sends a batch's
    images concurrently (``concurrency`` requests in flight).

    Args:
        endpoint: endpoint URL, or several replicas.
        image_column: batch column with images: uint8 ``[N, H, W, 3]``, or a sequence /
            object array of ``[H, W, 3]`` (or ``[H, W]``, ``[H, W, 4]``) uint8 arrays,
            or encoded image bytes.
        latent_column: output column: ``[N, C, H/8, W/8]`` when all latents share a shape,
            else an object array of ``[C, h, w]`` arrays.
        resolution: resize/crop every image to this size first (``512`` or ``"WxH"``), as
            ``asyncvae encode`` does; ``None`` sends images as they are (their sides must be
            multiples of 8, or they are centre-cropped down to multiples of 8).
        crop: ``"center"`` or ``"none"`` (see :mod:`asyncvae.jobs.preprocess`).
        scaling_factor, shift_factor: sent to the endpoint.
        dtype: ``"float16"`` (default) or ``"float32"`` latents (numpy has no bfloat16).
        wire_dtype: ``"float16"`` (default), ``"float32"``, ``"uint8"`` or ``"png"``.
        concurrency: requests in flight per actor.
        on_error: ``"raise"`` (default; Ray retries the task) or ``"null"``: a failed
            image gets ``None`` and its reason in ``<latent_column>_error``.
        retry, timeout, token: client settings.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        image_column: str = "image",
        latent_column: str = "latent",
        resolution: int | str | tuple[int, int] | None = None,
        crop: str = "center",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        dtype: str = "float16",
        wire_dtype: str = "float16",
        concurrency: int = 32,
        on_error: str = "raise",
        retry: Retry | None = None,
        timeout: Timeout | None = None,
        token: str | bool | None = None,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise InputError(f"dtype={dtype!r} must be 'float16' or 'float32'")
        if on_error not in ("raise", "null"):
            raise InputError(f"on_error={on_error!r} must be 'raise' or 'null'")
        if crop not in CROP_MODES:
            raise InputError(f"crop={crop!r} must be one of {', '.join(CROP_MODES)}")
        self.image_column = image_column
        self.latent_column = latent_column
        self.resolution = parse_resolution(resolution) if resolution is not None else None
        self.crop = crop
        self.options = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        self.dtype = getattr(torch, dtype)
        self.wire_dtype = wire_dtype
        self.on_error = on_error
        self._client = Client(
            endpoint,
            limits=Limits(max_concurrency=concurrency, max_queued=max(8, concurrency)),
            retry=retry, timeout=timeout, token=token,
        )
        self._loop = _Loop()

    # ---- preprocessing (caller's thread)
    def _pixels(self, img: Any) -> np.ndarray:
        if isinstance(img, (bytes, bytearray, memoryview)):
            res = self.resolution
            if res is None:
                im = Image.open(io.BytesIO(bytes(img)))
                res = (im.width - im.width % 8, im.height - im.height % 8)
            return load_image(bytes(img), res, self.crop).pixels  # type: ignore[arg-type]
        arr = np.asarray(img)
        ok_rgb = arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        if self.resolution is None:
            if ok_rgb and arr.shape[0] % 8 == 0 and arr.shape[1] % 8 == 0:
                return arr
            h, w = arr.shape[:2]
            res = (w - w % 8, h - h % 8)
        elif ok_rgb and (arr.shape[1], arr.shape[0]) == self.resolution:
            return arr
        else:
            res = self.resolution
        if res[0] < 8 or res[1] < 8:
            raise InputError(f"image of shape {list(arr.shape)} is smaller than 8x8")
        if arr.dtype != np.uint8:
            raise InputError(f"images must be uint8, got {arr.dtype}")
        return prepare(Image.fromarray(arr), res, self.crop).pixels  # type: ignore[arg-type]

    async def _encode(self, items: list[Any]) -> list[Any]:
        return [r async for r in self._client.encode_many(items, on_error="yield", **self.options)]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Encode ``batch[image_column]``; returns the batch with ``latent_column`` added."""
        if self.image_column not in batch:
            raise InputError(f"batch has no column {self.image_column!r} (columns: {', '.join(batch)})")
        images = batch[self.image_column]
        wire: list[Any] = []
        errors: list[str | None] = []
        for img in images:
            try:
                wire.append(to_wire_tensor(self._pixels(img), self.wire_dtype))
                errors.append(None)
            except Exception as e:
                if self.on_error == "raise":
                    raise
                wire.append(None)
                errors.append(f"{type(e).__name__}: {e}")
        sendable = [w for w in wire if w is not None]
        results = iter(self._loop.run(self._encode(sendable)))
        latents: list[np.ndarray | None] = []
        for i, w in enumerate(wire):
            if w is None:
                latents.append(None)
                continue
            r = next(results)
            if isinstance(r, ItemError):
                if self.on_error == "raise":
                    raise r.error
                errors[i] = f"{type(r.error).__name__}: {r.error}"
                latents.append(None)
                continue
            lat = r[0] if r.dim() == 4 and r.shape[0] == 1 else r
            latents.append(lat.to(self.dtype).numpy())
        out = dict(batch)
        shapes = {a.shape for a in latents if a is not None}
        if len(shapes) == 1 and all(a is not None for a in latents):
            out[self.latent_column] = np.stack(latents)  # type: ignore[arg-type]
        else:
            col = np.empty(len(latents), dtype=object)
            for i, a in enumerate(latents):
                col[i] = a
            out[self.latent_column] = col
        if self.on_error == "null":
            out[f"{self.latent_column}_error"] = np.array([e or "" for e in errors], dtype=object)
        return out

    # ---- lifecycle
    def close(self) -> None:
        """Close the client and stop the loop thread (also done when garbage-collected)."""
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        self._loop = None  # type: ignore[assignment]
        with contextlib.suppress(Exception):
            loop.run(self._client.aclose())
        loop.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> VAEEncode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
