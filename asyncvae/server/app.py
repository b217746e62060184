"""The reference endpoint as an ``aiohttp.web`` application.

Routes: ``POST /`` (decode when the query carries ``output_type``, else encode),
``POST /decode``, ``POST /encode``, ``GET /health``, ``GET /stats``,
``POST /stats/reset`` and ``POST /faults`` (JSON of :class:`Faults` fields; swaps the
fault configuration at runtime).

Like the real endpoints, each replica runs one request at a time and queues the
rest: ``replicas=K`` is a semaphore of K around the compute, which runs in a
thread pool of K so the event loop keeps accepting. Every wire detail comes from
:mod:`asyncvae.protocol`.

Decisions the protocol leaves open (documented here once):

- Encode answers float16 latents for image-bytes input, the input dtype for a
  float tensor body, and float32 for a uint8 tensor body.
- Encoded images whose width/height are not multiples of 8 are resized *down* to
  the nearest multiples of 8 with Lanczos, as diffusers' ``VaeImageProcessor`` does.
- ``output_type="pil"`` picks image vs tensor by ``Accept``: ``tensor/binary`` means the
  client holds a processor (answer ``[N,3,H,W]`` in [0, 1]); ``image/png`` /
  ``image/jpeg`` answer that format; anything else follows ``image_format``.
- mp4 is H.264 (libx264, else h264, else mpeg4), yuv420p, 15 fps, one video (B = 1).
- ``chunked`` streams every 200 body with chunked transfer encoding (64 KiB writes).
- ``Retry-After`` is written as an integer when the configured value is whole,
  else as a decimal (our client accepts it; it makes fast tests possible).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from aiohttp import web

from .. import protocol as P
from ..errors import InputError
from .model import BuiltinVAE, VAEModel, load_model, unpack_latents

__all__ = ["FAULT_KINDS", "Faults", "ServerConfig", "ServerState", "create_app"]

log = logging.getLogger("asyncvae.server")

#: Names of the injectable faults, as counted in ``/stats["faults"]``.
FAULT_KINDS = (
    "fault_503",
    "fault_429",
    "fault_502_html",
    "fault_stall",
    "fault_reset",
    "fault_truncate",
    "fault_bad_headers",
)
CHUNK = 64 * 1024
MP4_FPS = 15
MP4_CODECS = ("libx264", "h264", "mpeg4")
HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass(frozen=True)
class Faults:
    """Per-request probabilities of injected faults (all off by default).

    Faults are drawn after the request body was read, from the server's seeded RNG,
    one draw per configured kind per request, and take effect in this precedence:
    503 / 429 / 502-HTML answer at once; a stall sleeps ``stall_seconds`` (without
    holding a replica) and then answers normally; reset / truncate / bad headers
    spoil the successful answer.
    """

    #: 503 ``{"error": "503 Service Unavailable"}`` (a replica starting).
    fault_503: float = 0.0
    #: 429 with ``Retry-After: retry_after`` and a JSON error.
    fault_429: float = 0.0
    #: Seconds in the ``Retry-After`` header of a 429.
    retry_after: float = 1.0
    #: Send headers and part of the body, then abort the connection.
    fault_reset: float = 0.0
    #: Declare the full Content-Length, send about half the body, then close.
    fault_truncate: float = 0.0
    #: Sleep ``stall_seconds`` before answering (exceed a client's read timeout).
    fault_stall: float = 0.0
    stall_seconds: float = 0.0
    #: Tensor answers with a wrong shape, a missing dtype or a non-JSON shape header.
    fault_bad_headers: float = 0.0
    #: 502 with an HTML body (``text/html``), like a gateway.
    fault_502_html: float = 0.0
    #: Send 200 bodies with chunked transfer encoding instead of Content-Length.
    chunked: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("fault_") and not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"{f.name}={v!r} must be a probability in [0, 1]")
        if self.retry_after < 0 or self.stall_seconds < 0:
            raise ValueError("retry_after and stall_seconds must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        """Build from a JSON-like dict; unknown keys raise :class:`InputError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(f"unknown fault settings {sorted(unknown)}; known: {sorted(names)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise InputError(str(e)) from None


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of the reference server."""

    host: str = "127.0.0.1"
    #: 0 picks a free ephemeral port.
    port: int = 0
    #: Requests computed at once; the rest wait in a queue.
    replicas: int = 1
    #: Service time each request holds its replica slot for: ``delay_ms + B * delay_per_item_ms``.
    delay_ms: float = 0.0
    delay_per_item_ms: float = 0.0
    #: Compute once per request signature and replay the stored answer (benchmarks).
    cache: bool = False
    faults: Faults = field(default_factory=Faults)
    #: Largest request body accepted (413 above it).
    max_body_bytes: int = 512 * 1024 * 1024
    #: Largest number of output pixels (B x F x H x W for decode, B x H x W for encode).
    max_output_pixels: int = 1 << 26
    #: Seed of the fault RNG.
    seed: int = 0
    #: Channels of the built-in model's latents.
    latent_channels: int = 4
    #: ``"builtin"`` or a local diffusers AutoencoderKL folder (when no model is passed).
    model: str = "builtin"
    #: Seconds to wait for in-flight handlers when shutting down.
    shutdown_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.delay_ms < 0 or self.delay_per_item_ms < 0:
            raise ValueError("delay_ms and delay_per_item_ms must be >= 0")


class HTTPFail(Exception):
    """An error answer with a status and a message (JSON ``{"error": message}``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Result:
    """A computed successful answer, ready to send (and to cache)."""

    body: bytes
    headers: dict[str, str]
    tensor: bool


@dataclass
class Job:
    """A validated request: what to compute, its batch size and its cache signature."""

    op: str
    compute: Callable[[], Result]
    batch: int
    key: tuple[Any, ...]


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
            self.cache_hits = 0
            self.max_queue_depth = self.queue_depth
            self.max_in_flight = self.in_flight

    def count(self, table: str, key: str) -> None:
        with self._lock:
            d: dict[str, int] = getattr(self, table)
            d[key] = d.get(key, 0) + 1

    def add(self, name: str, delta: int) -> None:
        with self._lock:
            v = getattr(self, name) + delta
            setattr(self, name, v)
            if name == "queue_depth":
                self.max_queue_depth = max(self.max_queue_depth, v)
            elif name == "in_flight":
                self.max_in_flight = max(self.max_in_flight, v)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "responses": dict(self.responses),
                "faults": dict(self.faults),
                "cache_hits": self.cache_hits,
                "queue_depth": self.queue_depth,
                "max_queue_depth": self.max_queue_depth,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "in_service": self.in_service,
            }


class ServerState:
    """Everything one app instance shares: config, model, replica slots, pool, stats,
    faults (swappable at runtime from any thread) and the response cache."""

    def __init__(self, config: ServerConfig, model: VAEModel | None = None) -> None:
        self.config = config
        self.model: VAEModel = (
            model
            if model is not None
            else (
                BuiltinVAE(config.latent_channels)
                if config.model == "builtin"
                else load_model(config.model, config.latent_channels)
            )
        )
        self.stats = Stats()
        self._faults = config.faults
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._cache: dict[tuple[Any, ...], Result] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self.executor = ThreadPoolExecutor(config.replicas, thread_name_prefix="asyncvae-replica")

    def snapshot(self) -> dict[str, Any]:
        """The ``GET /stats`` document: counters plus the model name and replica count."""
        snap = self.stats.snapshot()
        snap["model"] = self.model.name
        snap["replicas"] = self.config.replicas
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
        with self._lock:
            return self._rng.random()

    # ---- service
    @contextlib.asynccontextmanager
    async def replica(self) -> Any:
        """Hold one replica slot (queueing for it, counted in the queue depth)."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.config.replicas)
        self.stats.add("queue_depth", 1)
        try:
            await self._semaphore.acquire()
        finally:
            self.stats.add("queue_depth", -1)
        self.stats.add("in_service", 1)
        try:
            yield
        finally:
            self.stats.add("in_service", -1)
            self._semaphore.release()

    async def run(self, job: Job) -> Result:
        """Compute (or replay from the cache) a job while holding a replica slot,
        plus the configured service delay."""
        cfg = self.config
        delay = (cfg.delay_ms + job.batch * cfg.delay_per_item_ms) / 1000.0
        async with self.replica():
            result = self._cache.get(job.key) if cfg.cache else None
            if result is not None:
                self.stats.add("cache_hits", 1)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.executor, job.compute)
                if cfg.cache:
                    self._cache[job.key] = result
            if delay > 0:
                await asyncio.sleep(delay)
        return result


STATE_KEY: web.AppKey[ServerState] = web.AppKey("asyncvae_state", ServerState)


# --------------------------------------------------------------------------- helpers


def json_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error answer ``{"error": message}`` with a JSON content type."""
    h = {P.HEADER_CONTENT_TYPE: P.CONTENT_TYPE_JSON, **(headers or {})}
    return web.Response(status=status, body=P.error_json(message), headers=h)


def _retry_after_value(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _tensor_result(t: torch.Tensor) -> Result:
    t = t.contiguous()
    return Result(bytes(P.tensor_body(t)), P.tensor_response_headers(t), tensor=True)


def _from_body(body: bytes, tq: P.TensorQuery) -> torch.Tensor:
    return torch.frombuffer(bytearray(body), dtype=P.DTYPES[tq.dtype]).reshape(tq.shape)


def _check_body(body: bytes, tq: P.TensorQuery) -> None:
    if len(body) != tq.nbytes:
        raise InputError(
            f"body is {len(body)} bytes but shape {list(tq.shape)} of {tq.dtype} needs {tq.nbytes} "
            "bytes (numel x itemsize, raw little-endian, C order)"
        )


def _check_pixels(state: ServerState, pixels: int, what: str) -> None:
    limit = state.config.max_output_pixels
    if pixels > limit:
        raise HTTPFail(
            413,
            f"{what} is {pixels} pixels, over this server's max_output_pixels={limit}; "
            "send smaller batches or sizes",
        )


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 like diffusers' postprocess (denormalize, *255, round)."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _mp4_available() -> bool:
    return importlib.util.find_spec("av") is not None


def encode_mp4(frames: np.ndarray, fps: int = MP4_FPS) -> bytes:
    """mp4 bytes of ``frames`` (uint8 ``[F,H,W,3]``), H.264 yuv420p where available."""
    import av

    f, h, w, _ = frames.shape
    h2, w2 = h - h % 2, w - w % 2  # yuv420p needs even sizes
    if h2 == 0 or w2 == 0:
        raise InputError(f"video frames of {h}x{w} are too small for mp4")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream: Any = None
        errors = []
        for codec in MP4_CODECS:
            try:
                stream = container.add_stream(codec, rate=fps)
                break
            except Exception as e:
                errors.append(f"{codec}: {e}")
        if stream is None:
            raise RuntimeError(f"no mp4 video codec available in PyAV ({'; '.join(errors)})")
        stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"preset": "veryfast", "crf": "20"}
        for i in range(f):
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frames[i, :h2, :w2]), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _image_bytes(img_u8_hwc: torch.Tensor, fmt: str) -> Result:
    from PIL import Image

    im = Image.fromarray(img_u8_hwc.numpy())
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG")
        ctype = P.CONTENT_TYPE_PNG
    else:
        im.save(buf, format="JPEG", quality=95)
        ctype = P.CONTENT_TYPE_JPEG
    return Result(buf.getvalue(), {P.HEADER_CONTENT_TYPE: ctype}, tensor=False)


# --------------------------------------------------------------------------- decode


def _answer_kind(dq: P.DecodeQuery, accept: str) -> str:
    """``tensor`` | ``uint8`` | ``frames01`` | ``png`` | ``jpg`` | ``mp4``."""
    if dq.output_type == "mp4":
        return "mp4"
    if dq.output_type == "pt":
        return "uint8" if dq.partial_postprocess else "tensor"
    a = accept.lower()
    if P.CONTENT_TYPE_TENSOR in a:
        return "frames01"
    if P.CONTENT_TYPE_PNG in a:
        return "png"
    if P.CONTENT_TYPE_JPEG in a:
        return "jpg"
    return dq.image_format


def decode_job(state: ServerState, query: Any, body: bytes, accept: str) -> Job:
    """Validate a decode request (raises :class:`InputError` / :class:`HTTPFail`)."""
    dq = P.parse_decode_query(query)
    tq = dq.tensor
    _check_body(body, tq)
    shape = tq.shape
    model = state.model
    f = model.spatial_factor
    rank = len(shape)
    b = shape[0]
    if rank == 3:
        if dq.height is None or dq.width is None:
            raise InputError(
                f"`height` and `width` required for packed latents: a 3-D shape {list(shape)} is "
                "packed (Flux); send height= and width= in pixels"
            )
        if dq.height % 16 or dq.width % 16 or dq.height <= 0 or dq.width <= 0:
            raise InputError(
                f"height={dq.height} and width={dq.width} must be positive multiples of 16 for packed latents"
            )
        if shape[2] % 4:
            raise InputError(f"packed latents' last dimension {shape[2]} must be a multiple of 4")
        tokens = (dq.height // 16) * (dq.width // 16)
        if shape[1] != tokens:
            raise InputError(
                f"packed latents have {shape[1]} tokens but height={dq.height}, width={dq.width} "
                f"needs (H/16)*(W/16) = {tokens}"
            )
        channels, frames, hh, ww = shape[2] // 4, 1, dq.height // 8 * f, dq.width // 8 * f
    elif rank == 4:
        channels, frames, hh, ww = shape[1], 1, shape[2] * f, shape[3] * f
    elif rank == 5:
        channels, hh, ww = shape[1], shape[3] * f, shape[4] * f
        frames = P.frames_for_latent_frames(shape[2])
    else:
        raise InputError(
            f"latents must be 4-D [B,C,H,W], 3-D [B,N,C] (packed, with height/width) or 5-D "
            f"[B,C,T,H,W] (video); got {rank}-D shape {list(shape)}"
        )
    _check_pixels(state, b * frames * hh * ww, f"the decoded output ({b}x{frames}x{hh}x{ww})")
    model.check_latent_channels(channels)
    if dq.scaling_factor == 0:
        raise InputError("scaling_factor=0 would divide by zero")
    kind = _answer_kind(dq, accept)
    if kind == "mp4":
        if rank != 5:
            raise InputError(f"output_type='mp4' needs 5-D video latents [B,C,T,H,W], got {rank}-D")
        if b != 1:
            raise InputError(
                f"output_type='mp4' answers one video; got a batch of {b}, send them one at a time"
            )
        if not _mp4_available():
            raise InputError("mp4 output needs the 'av' package: pip install asyncvae[video]")
    if kind in ("png", "jpg") and b * frames != 1:
        raise InputError(
            f"output_type='pil' without a processor answers ONE image, but these latents decode to "
            f"{b * frames} images; use output_type='pt' (e.g. partial_postprocess=True) for batches"
        )
    in_dtype = P.DTYPES[tq.dtype]

    def compute() -> Result:
        x = _from_body(body, tq).float()
        if dq.scaling_factor is not None:
            x = x / dq.scaling_factor
            if dq.shift_factor is not None:
                x = x + dq.shift_factor
        elif dq.do_scaling:
            x = x / model.scaling_factor
            x = x + (dq.shift_factor if dq.shift_factor is not None else model.shift_factor)
        if rank == 3:
            assert dq.height is not None and dq.width is not None
            x = unpack_latents(x, dq.height, dq.width)
        video = rank == 5
        img = model.decode_video(x) if video else model.decode(x)  # [B,3,(F,)H,W] in [-1,1]
        if kind == "tensor":
            return _tensor_result(img.to(in_dtype))
        if video:  # → frames [B*F,3,H,W]
            bb, c, ff, h, w = img.shape
            img = img.permute(0, 2, 1, 3, 4).reshape(bb * ff, c, h, w)
        if kind == "frames01":
            return _tensor_result((img / 2 + 0.5).clamp(0, 1).to(in_dtype))
        u8 = _to_uint8(img).permute(0, 2, 3, 1).contiguous()  # [N,H,W,3]
        if kind == "uint8":
            return _tensor_result(u8)
        if kind == "mp4":
            return Result(
                encode_mp4(u8.numpy()), {P.HEADER_CONTENT_TYPE: P.CONTENT_TYPE_MP4}, False
            )
        return _image_bytes(u8[0], kind)

    return Job("decode", compute, b, ("decode", tuple(query.items()), len(body), accept))


# --------------------------------------------------------------------------- encode


def _load_image(body: bytes, state: ServerState) -> torch.Tensor:
    """Image bytes → float32 ``[1,3,H,W]`` in [-1, 1], resized down to multiples of the
    model's spatial factor (Lanczos), like diffusers' VaeImageProcessor."""
    from PIL import Image, UnidentifiedImageError

    f = state.model.spatial_factor
    try:
        im = Image.open(io.BytesIO(body))
        w, h = im.size
        _check_pixels(state, w * h, f"the image ({w}x{h})")
        im = im.convert("RGB")
    except HTTPFail:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as e:
        kind = P.detect_image_type(body)
        reason = "no image format recognised" if isinstance(e, UnidentifiedImageError) else str(e)
        raise InputError(
            f"body is not a readable image (detected type: {kind}, {len(body)} bytes): {reason}; send PNG, "
            "JPEG or WEBP bytes, or a tensor with shape= and dtype= parameters"
        ) from None
    w8, h8 = w - w % f, h - h % f
    if w8 == 0 or h8 == 0:
        raise InputError(f"image is {w}x{h}; it must be at least {f}x{f} pixels")
    if (w8, h8) != (w, h):
        im = im.resize((w8, h8), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0


def encode_job(state: ServerState, query: Any, body: bytes) -> Job:
    """Validate an encode request (raises :class:`InputError` / :class:`HTTPFail`)."""
    eq = P.parse_encode_query(query)
    model = state.model
    f = model.spatial_factor
    tq = eq.tensor
    if tq is not None:
        _check_body(body, tq)
        shape = tq.shape
        if len(shape) not in (3, 4) or shape[-3] != 3:
            raise InputError(
                f"image tensor must be [3,H,W] or [B,3,H,W] (RGB, channels first), got shape {list(shape)}"
            )
        h, w = shape[-2:]
        if h % f or w % f:
            raise InputError(
                f"image tensor height and width must be multiples of {f}, got {h}x{w}; resize or crop it first"
            )
        batch = shape[0] if len(shape) == 4 else 1
        _check_pixels(state, batch * h * w, f"the image batch ({batch}x{h}x{w})")
        out_dtype = torch.float32 if tq.dtype == "uint8" else P.DTYPES[tq.dtype]
    else:
        if not body:
            raise InputError(
                "empty body: send image bytes (PNG/JPEG/WEBP) or a tensor with shape= and dtype="
            )
        batch = 1
        out_dtype = torch.float16
    if eq.scaling_factor == 0:
        raise InputError("scaling_factor=0 would zero every latent")

    def compute() -> Result:
        if tq is not None:
            x = _from_body(body, tq)
            x = x.float() / 127.5 - 1.0 if tq.dtype == "uint8" else x.float()
            if x.dim() == 3:
                x = x.unsqueeze(0)
        else:
            x = _load_image(body, state)
        z = model.encode(x)
        if eq.shift_factor is not None:
            z = z - eq.shift_factor
        if eq.scaling_factor is not None:
            z = z * eq.scaling_factor
        return _tensor_result(z.to(out_dtype))

    return Job("encode", compute, batch, ("encode", tuple(query.items()), len(body)))


# --------------------------------------------------------------------------- sending


def _spoil_headers(headers: dict[str, str], pick: float) -> dict[str, str]:
    h = dict(headers)
    if pick < 1 / 3:
        shape = json.loads(h[P.HEADER_SHAPE])
        shape[0] = shape[0] + 1
        h[P.HEADER_SHAPE] = json.dumps(shape)
    elif pick < 2 / 3:
        h.pop(P.HEADER_DTYPE, None)
    else:
        h[P.HEADER_SHAPE] = "x".join(str(s) for s in json.loads(h[P.HEADER_SHAPE]))
    return h


async def _send(
    request: web.Request, state: ServerState, result: Result, faults: Faults, hit: set[str]
) -> web.StreamResponse:
    headers = dict(result.headers)
    body = result.body
    stats = state.stats
    if "fault_bad_headers" in hit and result.tensor:
        stats.count("faults", "fault_bad_headers")
        headers = _spoil_headers(headers, state.random())
    broken = next((k for k in ("fault_reset", "fault_truncate") if k in hit), None)
    if broken is not None and len(body) >= 2:
        stats.count("faults", broken)
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            if broken == "fault_reset":
                transport.abort()
            else:
                transport.close()
        return resp
    if faults.chunked:
        resp = web.StreamResponse(status=200, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        view = memoryview(body)
        for i in range(0, len(body), CHUNK):
            await resp.write(view[i : i + CHUNK])
        await resp.write_eof()
        return resp
    return web.Response(status=200, body=body, headers=headers)


async def _read_body(request: web.Request, state: ServerState) -> bytes:
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise HTTPFail(
            413, f"request body of {request.content_length} bytes is over max_body_bytes={limit}"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HTTPFail(413, f"request body is over max_body_bytes={limit}") from None


async def _handle(request: web.Request, op: str | None) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    query = request.query
    if op is None:
        op = "decode" if P.is_decode(query) else "encode"
    stats = state.stats
    stats.count("requests", op)
    stats.add("in_flight", 1)
    try:
        body = await _read_body(request, state)
        faults, hit = state.draw_faults()
        if "fault_503" in hit:
            stats.count("faults", "fault_503")
            return json_response(503, "503 Service Unavailable")
        if "fault_429" in hit:
            stats.count("faults", "fault_429")
            return json_response(
                429,
                "429 Too Many Requests: rate limit exceeded, retry later",
                {P.HEADER_RETRY_AFTER: _retry_after_value(faults.retry_after)},
            )
        if "fault_502_html" in hit:
            stats.count("faults", "fault_502_html")
            return web.Response(status=502, text=HTML_502, content_type="text/html")
        if "fault_stall" in hit:
            stats.count("faults", "fault_stall")
            await asyncio.sleep(faults.stall_seconds)
        accept = request.headers.get(P.HEADER_ACCEPT, "")
        if op == "decode":
            job = decode_job(state, query, body, accept)
        else:
            job = encode_job(state, query, body)
        result = await state.run(job)
        return await _send(request, state, result, faults, hit)
    finally:
        stats.add("in_flight", -1)


# --------------------------------------------------------------------------- app


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answers JSON ``{"error": ...}``: 400 for bad input, the status of
    an :class:`HTTPFail`/HTTP exception, 500 for anything unexpected. Counts statuses."""
    state = request.app[STATE_KEY]
    try:
        resp = await handler(request)
    except InputError as e:
        resp = json_response(400, str(e))
    except HTTPFail as e:
        resp = json_response(e.status, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        resp = json_response(e.status, e.text or e.reason or f"HTTP {e.status}", None)
        for k, v in e.headers.items():
            if k.lower() not in ("content-type", "content-length"):
                resp.headers[k] = v
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        log.exception("unexpected error handling %s %s", request.method, request.path_qs)
        resp = json_response(500, f"internal server error: {type(e).__name__}: {e}")
    state.stats.count("responses", str(resp.status))
    return resp


async def _decode(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "decode")


async def _encode(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "encode")


async def _root(request: web.Request) -> web.StreamResponse:
    return await _handle(request, None)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].snapshot())


async def _stats_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].stats.reset()
    return web.json_response({"status": "ok"})


async def _set_faults(request: web.Request) -> web.Response:
    try:
        data = await request.json()
    except ValueError:
        raise InputError("POST /faults needs a JSON object of Faults fields") from None
    if not isinstance(data, dict):
        raise InputError("POST /faults needs a JSON object of Faults fields")
    faults = Faults.from_dict(data)
    request.app[STATE_KEY].set_faults(faults)
    return web.json_response(dataclasses.asdict(faults))


def create_app(
    config: ServerConfig | None = None, model: VAEModel | None = None
) -> web.Application:
    """The reference endpoint as an ``aiohttp.web.Application`` (state under ``STATE_KEY``)."""
    config = config or ServerConfig()
    state = ServerState(config, model)
    app = web.Application(middlewares=[_errors], client_max_size=config.max_body_bytes)
    app[STATE_KEY] = state
    app.router.add_post("/", _root)
    app.router.add_post("/decode", _decode)
    app.router.add_post("/encode", _encode)
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/stats/reset", _stats_reset)
    app.router.add_post("/faults", _set_faults)

    async def _shutdown(app: web.Application) -> None:
        state.executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(_shutdown)
    return app
