"""Ray Data adapters: encode image batches into latents with one pooled client per actor.

::

    import ray
    from ray.data import ActorPoolStrategy
    from asyncvae.integrations.ray import AsyncVAEEncode

    ds = ray.data.read_images("s3://bucket/images/", mode="RGB")     # or read_binary_files
    ds = ds.map_batches(
        AsyncVAEEncode,
        fn_constructor_kwargs={"endpoint": "https://…endpoints.huggingface.cloud/",
                               "resolution": 512, "scaling_factor": 0.18215,
                               "keep_images": False},              # drop the pixels from the rows
        compute=ActorPoolStrategy(size=4),     # actors; each keeps its own connection pool
        batch_size=64,
        batch_format="numpy",
    )

- :class:`AsyncVAEEncode` has an ``async`` ``__call__``: Ray Data runs it on the
  actor's event loop, several batches at once (Ray Data's default for async batch
  UDFs is 4 per actor), all sharing one client; within a batch, images are decoded
  and resized in a thread pool *while* earlier images are on the wire.
- :class:`VAEEncode` is the same work as a plain callable (it runs its own loop in a
  thread): ``VAEEncode(endpoint)({"image": arr})`` works without Ray too. Preprocessing
  overlaps with requests here as well.

Failures and retries, truthfully: the client retries what can succeed on retry
(connection errors, timeouts, 408/429/5xx; ``retry=Retry(...)``) before an image counts
as failed. Then, with ``on_error="raise"`` (default) the batch raises and Ray Data's
defaults fail the dataset: Ray restarts *crashed* actors and re-runs their tasks, but
it does not retry a task that raised unless you ask it to —
``ray.data.DataContext.get_current().actor_task_retry_on_errors = [asyncvae.RetryExhausted]``
(or ``max_errored_blocks`` to skip bad blocks). With ``on_error="null"`` nothing raises:
a failed image gets a NaN latent and its reason in ``<latent_column>_error``
(``""`` when it went well), so filter on that column.

Column types are stable across batches, empty ones included: with ``resolution`` set,
``latent`` is always a float array ``[N, C, H/8, W/8]``; without it, always an object
array of ``[C, h, w]`` arrays (Ray stores them as variable-shaped tensors).

Images: uint8 ``[N, H, W, 3]`` arrays, sequences of ``[H, W]``/``[H, W, 3|4]`` uint8
arrays, or encoded image bytes (EXIF orientation applied before sizing and cropping).
Ray is an optional extra (``pip install asyncvae[ray]``); this module does not import it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from ..client import Client
from ..config import Limits, Retry, Timeout
from ..errors import InputError, ItemError
from ..jobs.prep import available_cpus
from ..jobs.preprocess import (
    ALPHA_MODES,
    CROP_MODES,
    WIRE_DTYPES,
    parse_resolution,
    prepare,
    to_wire_tensor,
)

__all__ = ["AsyncVAEEncode", "VAEEncode"]

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


class _Encoder:
    """What both adapters share: options, preprocessing, one client, the batch coroutine."""

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        image_column: str = "image",
        latent_column: str = "latent",
        resolution: int | str | tuple[int, int] | None = None,
        crop: str = "center",
        alpha: str = "white",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        dtype: str = "float16",
        wire_dtype: str = "float16",
        concurrency: int = 32,
        prep_threads: int | None = None,
        on_error: str = "raise",
        keep_images: bool = True,
        retry: Retry | None = None,
        timeout: Timeout | None = None,
        token: str | bool | None = None,
    ) -> None:
        if dtype not in ("float16", "float32"):
            raise InputError(f"dtype={dtype!r} must be 'float16' or 'float32' (numpy has no bfloat16)")
        if on_error not in ("raise", "null"):
            raise InputError(f"on_error={on_error!r} must be 'raise' or 'null'")
        if crop not in CROP_MODES:
            raise InputError(f"crop={crop!r} must be one of {', '.join(CROP_MODES)}")
        if alpha not in ALPHA_MODES:
            raise InputError(f"alpha={alpha!r} must be one of {', '.join(ALPHA_MODES)}")
        if wire_dtype not in WIRE_DTYPES:
            raise InputError(f"wire_dtype={wire_dtype!r} must be one of {', '.join(WIRE_DTYPES)}")
        self.endpoint = endpoint
        self.image_column = image_column
        self.latent_column = latent_column
        self.resolution = parse_resolution(resolution) if resolution is not None else None
        self.crop = crop
        self.alpha = alpha
        self.options = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
        self.dtype = dtype
        self.wire_dtype = wire_dtype
        self.on_error = on_error
        self.keep_images = keep_images
        self.concurrency = concurrency
        self._client_kw = {"retry": retry, "timeout": timeout, "token": token}
        self._client: Client | None = None
        self._latent_shape: tuple[int, ...] | None = None
        self._threads = prep_threads or available_cpus()
        self._prep = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="asyncvae-ray-prep")
        Client(endpoint)  # validate the URL now, not on the first batch

    def _get_client(self) -> Client:
        if self._client is None:
            c = self.concurrency
            self._client = Client(self.endpoint, limits=Limits(max_concurrency=c, max_queued=max(8, c)),
                                  **self._client_kw)  # type: ignore[arg-type]
        return self._client

    # ---- preprocessing (pool threads)
    def _pixels(self, img: Any) -> np.ndarray:
        if isinstance(img, (bytes, bytearray, memoryview)):
            try:
                im = ImageOps.exif_transpose(Image.open(io.BytesIO(bytes(img))))
            except Exception as e:
                raise InputError(f"not a readable image ({type(e).__name__}: {e})") from None
            res = self.resolution or (im.width - im.width % 8, im.height - im.height % 8)
            if res[0] < 8 or res[1] < 8:
                raise InputError(f"image of {im.width}x{im.height} is smaller than 8x8")
            return prepare(im, res, self.crop, self.alpha).pixels  # type: ignore[arg-type]
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise InputError(f"images must be uint8, got {arr.dtype}")
        ok_rgb = arr.ndim == 3 and arr.shape[2] == 3
        h, w = arr.shape[:2]
        res = self.resolution or (w - w % 8, h - h % 8)
        if ok_rgb and (w, h) == res:
            return arr
        if res[0] < 8 or res[1] < 8:
            raise InputError(f"image of shape {list(arr.shape)} is smaller than 8x8")
        return prepare(Image.fromarray(arr), res, self.crop, self.alpha).pixels  # type: ignore[arg-type]

    def _wire(self, img: Any) -> Any:
        return to_wire_tensor(self._pixels(img), self.wire_dtype)

    # ---- one batch (in the event loop)
    async def encode_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Encode ``batch[image_column]``; returns the batch with the latent column."""
        if self.image_column not in batch:
            raise InputError(f"batch has no column {self.image_column!r} (columns: {', '.join(batch)})")
        images = batch[self.image_column]
        n = len(images)
        loop = asyncio.get_running_loop()
        errors: list[str] = [""] * n
        latents: list[np.ndarray | None] = [None] * n
        sent: list[int] = []
        client = self._get_client()

        async def feed() -> AsyncIterator[Any]:
            # prepare ahead in threads while earlier images are being encoded remotely
            depth = max(4, 2 * self._threads)
            futs: list[asyncio.Future[Any]] = []
            nxt = 0
            while nxt < n and len(futs) < depth:
                futs.append(loop.run_in_executor(self._prep, self._wire, images[nxt]))
                nxt += 1
            for i in range(n):
                fut = futs[i]
                if nxt < n:
                    futs.append(loop.run_in_executor(self._prep, self._wire, images[nxt]))
                    nxt += 1
                try:
                    value = await fut
                except Exception as e:
                    if self.on_error == "raise":
                        for f in futs[i + 1 :]:
                            f.cancel()
                        raise
                    errors[i] = f"{type(e).__name__}: {e}"
                    continue
                sent.append(i)
                yield value

        k = 0
        async with contextlib.aclosing(client.encode_many(feed(), on_error="yield", **self.options)) as results:
            async for r in results:
                i = sent[k]
                k += 1
                if isinstance(r, ItemError):
                    if self.on_error == "raise":
                        raise r.error
                    errors[i] = f"{type(r.error).__name__}: {r.error}"
                    continue
                lat = r[0] if r.dim() == 4 and r.shape[0] == 1 else r
                latents[i] = lat.to(getattr(torch, self.dtype)).numpy()
        out = {k2: v for k2, v in batch.items() if self.keep_images or k2 != self.image_column}
        out[self.latent_column] = await self._column(latents)
        if self.on_error == "null":
            out[f"{self.latent_column}_error"] = np.array(errors, dtype=object)
        return out

    async def _column(self, latents: list[np.ndarray | None]) -> np.ndarray:
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        if self.resolution is None:  # ragged: always an object column
            col = np.empty(len(latents), dtype=object)
            for i, a in enumerate(latents):
                col[i] = a if a is not None else np.full((0,), np.nan, np_dtype)
            return col
        shape = next((a.shape for a in latents if a is not None), None) or self._latent_shape
        if shape is None:  # an empty (or all-failed) first batch: ask the endpoint once
            w, h = self.resolution
            probe = to_wire_tensor(np.zeros((h, w, 3), np.uint8), self.wire_dtype)
            r = await self._get_client().encode(probe, **self.options)
            shape = tuple((r[0] if r.dim() == 4 else r).shape)
        self._latent_shape = tuple(shape)
        col = np.full((len(latents), *shape), np.nan, dtype=np_dtype)
        for i, a in enumerate(latents):
            if a is not None:
                col[i] = a
        return col

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._prep.shutdown(wait=False, cancel_futures=True)


class VAEEncode(_Encoder):
    """A callable class for ``Dataset.map_batches`` (sync actors): adds a latent column.

    Each instance (one per Ray actor) owns one :class:`~asyncvae.Client` on a private
    event-loop thread, so connections are pooled across batches; within a batch,
    images are preprocessed in threads while earlier ones are being encoded.

    Args:
        endpoint: endpoint URL, or several replicas.
        image_column: batch column with images (see the module docstring).
        latent_column: output column (see "Column types" in the module docstring).
        resolution: resize/crop every image to this size first (``512`` or ``"WxH"``), as
            ``asyncvae encode`` does; ``None`` sends images as they are (centre-cropped
            down to multiples of 8).
        crop, alpha: as ``asyncvae encode`` (:mod:`asyncvae.jobs.preprocess`).
        scaling_factor, shift_factor: sent to the endpoint.
        dtype: ``"float16"`` (default) or ``"float32"`` latents.
        wire_dtype: ``"float16"`` (default), ``"float32"``, ``"uint8"`` or ``"png"``.
        concurrency: requests in flight per actor; prep_threads: preprocessing threads
            (default: the CPUs this process may use).
        on_error: ``"raise"`` (default) or ``"null"`` (see "Failures and retries").
        keep_images: ``False`` drops the image column from the output rows.
        retry, timeout, token: client settings.
    """

    def __init__(self, endpoint: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(endpoint, **kwargs)
        self._loop: _Loop | None = _Loop()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Encode ``batch[image_column]``; returns the batch with ``latent_column`` added."""
        if self._loop is None:
            raise InputError("this VAEEncode is closed")
        return self._loop.run(self.encode_batch(batch))

    def close(self) -> None:
        """Close the client and stop the loop thread (also done when garbage-collected)."""
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        self._loop = None
        with contextlib.suppress(Exception):
            loop.run(self.aclose())
        loop.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> VAEEncode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVAEEncode(_Encoder):
    """:class:`VAEEncode` for Ray Data's async actors: ``__call__`` is an async generator
    run on the actor's event loop, so batches overlap (``max_concurrency``) and the
    client is shared by all of them. Same arguments as :class:`VAEEncode`."""

    async def __call__(self, batch: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield ``batch`` with ``latent_column`` added."""
        yield await self.encode_batch(batch)
