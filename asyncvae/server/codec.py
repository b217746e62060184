"""From a request to model work and back: validate a decode/encode request into a
:class:`Job` (model input shape, how to build the input, how to turn the model's
output into the answer), without touching sockets or the event loop.

A job is split in three so that the server can batch: ``prepare()`` turns the body
into the model's float32 input ``[B, *shape]`` (scaling, unpacking, image decoding),
the model runs once over the inputs of every job with the same :attr:`Job.batch_key`
stacked along dim 0, and ``finish(output)`` turns the job's own slice of the output
into the bytes and headers of its answer (dtype, uint8, PNG/JPEG, mp4).

Decisions the protocol leaves open (documented here once):

- Encode answers float16 latents for image-bytes input, the input dtype for a
  float tensor body, and float32 for a uint8 tensor body.
- Encoded images whose width/height are not multiples of the model's spatial factor
  are resized *down* to the nearest multiples with Lanczos, as diffusers'
  ``VaeImageProcessor`` does.
- ``output_type="pil"`` picks image vs tensor by ``Accept``: ``tensor/binary`` means the
  client holds a processor (answer ``[N,3,H,W]`` in [0, 1]); ``image/png`` /
  ``image/jpeg`` answer that format; anything else follows ``image_format``.
- mp4 is H.264 (libx264, else h264, else mpeg4), yuv420p, 15 fps, one video (B = 1).
- A video model (5-D) may also be sent a 5-D video ``[B,3,F,H,W]`` to encode; 4-D
  images go through it as one frame and come back as 4-D latents.
- With ``do_scaling=True`` and no ``scaling_factor`` the model's own default applies
  (``VAEModel.unscale``: per-channel ``latents_mean``/``latents_std`` where the config
  has them).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import protocol as P
from ..errors import InputError
from .model import VAEModel, unpack_latents

__all__ = ["HTTPFail", "Job", "Result", "decode_job", "encode_job", "encode_mp4"]

MP4_FPS = 15
MP4_CODECS = ("libx264", "h264", "mpeg4")


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
    """A validated request: the model call it needs and how to get in and out of it."""

    #: ``"decode"`` or ``"encode"`` (the route's operation).
    op: str
    #: Leading batch size of the request (its share of a batch's service time).
    items: int
    #: Model method: ``decode``, ``decode_video``, ``encode`` or ``encode_video``.
    fn: str
    #: The model input's shape without the batch dimension.
    shape: tuple[int, ...]
    #: Body → model input ``[items, *shape]`` float32 (runs on a replica thread).
    prepare: Callable[[], torch.Tensor]
    #: This job's slice of the model output → the answer (runs on a replica thread).
    finish: Callable[[torch.Tensor], Result]
    #: Request signature for ``--cache``.
    cache_key: tuple[Any, ...]

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one forward pass."""
        return (self.fn, self.shape)


# --------------------------------------------------------------------------- helpers


def tensor_result(t: torch.Tensor) -> Result:
    """A tensor answer: raw little-endian body plus ``shape``/``dtype`` headers."""
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


def _check_pixels(limit: int, pixels: int, what: str) -> None:
    if pixels > limit:
        raise HTTPFail(
            413,
            f"{what} is {pixels} pixels, over this server's max_output_pixels={limit}; "
            "send smaller batches or sizes",
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 like diffusers' postprocess (denormalize, *255, round)."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def mp4_available() -> bool:
    """Whether PyAV is importable (mp4 answers need it)."""
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


def decode_job(
    model: VAEModel, query: Any, body: bytes, accept: str, max_output_pixels: int
) -> Job:
    """Validate a decode request (raises :class:`InputError` / :class:`HTTPFail`)."""
    dq = P.parse_decode_query(query)
    tq = dq.tensor
    _check_body(body, tq)
    shape = tq.shape
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
        model_shape: tuple[int, ...] = (shape[2] // 4, dq.height // 8, dq.width // 8)
        frames = 1
    elif rank == 4:
        model_shape = tuple(shape[1:])
        frames = 1
    elif rank == 5:
        model_shape = tuple(shape[1:])
        frames = model.decoded_frames(shape[2])
    else:
        raise InputError(
            f"latents must be 4-D [B,C,H,W], 3-D [B,N,C] (packed, with height/width) or 5-D "
            f"[B,C,T,H,W] (video); got {rank}-D shape {list(shape)}"
        )
    channels, hh, ww = model_shape[0], model_shape[-2] * f, model_shape[-1] * f
    _check_pixels(
        max_output_pixels, b * frames * hh * ww, f"the decoded output ({b}x{frames}x{hh}x{ww})"
    )
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
        if not mp4_available():
            raise InputError("mp4 output needs the 'av' package: pip install asyncvae[video]")
    if kind in ("png", "jpg") and b * frames != 1:
        raise InputError(
            f"output_type='pil' without a processor answers ONE image, but these latents decode to "
            f"{b * frames} images; use output_type='pt' (e.g. partial_postprocess=True) for batches"
        )
    in_dtype = P.DTYPES[tq.dtype]
    video = rank == 5

    def prepare() -> torch.Tensor:
        x = _from_body(body, tq).float()
        if rank == 3:
            assert dq.height is not None and dq.width is not None
            x = unpack_latents(x, dq.height, dq.width)
        if dq.scaling_factor is not None:
            x = x / dq.scaling_factor
            if dq.shift_factor is not None:
                x = x + dq.shift_factor
        elif dq.do_scaling:
            x = model.unscale(x, dq.shift_factor)
        return x

    def finish(img: torch.Tensor) -> Result:  # [B,3,(F,)H,W] in [-1,1]
        if kind == "tensor":
            return tensor_result(img.to(in_dtype))
        if video:  # → frames [B*F,3,H,W]
            bb, c, ff, h, w = img.shape
            img = img.permute(0, 2, 1, 3, 4).reshape(bb * ff, c, h, w)
        if kind == "frames01":
            return tensor_result((img / 2 + 0.5).clamp(0, 1).to(in_dtype))
        u8 = to_uint8(img).permute(0, 2, 3, 1).contiguous()  # [N,H,W,3]
        if kind == "uint8":
            return tensor_result(u8)
        if kind == "mp4":
            return Result(
                encode_mp4(u8.numpy()), {P.HEADER_CONTENT_TYPE: P.CONTENT_TYPE_MP4}, False
            )
        return _image_bytes(u8[0], kind)

    return Job(
        op="decode",
        items=b,
        fn="decode_video" if video else "decode",
        shape=model_shape,
        prepare=prepare,
        finish=finish,
        cache_key=("decode", tuple(query.items()), len(body), accept),
    )


# --------------------------------------------------------------------------- encode


def _open_image(body: bytes, f: int, max_output_pixels: int) -> Any:
    """Open image bytes lazily (header only) and check their size; returns the PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(body))
        w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _bad_image(body, e) from None
    _check_pixels(max_output_pixels, w * h, f"the image ({w}x{h})")
    if w - w % f == 0 or h - h % f == 0:
        raise InputError(f"image is {w}x{h}; it must be at least {f}x{f} pixels")
    return im


def _bad_image(body: bytes, e: BaseException) -> InputError:
    from PIL import UnidentifiedImageError

    kind = P.detect_image_type(body)
    reason = "no image format recognised" if isinstance(e, UnidentifiedImageError) else str(e)
    return InputError(
        f"body is not a readable image (detected type: {kind}, {len(body)} bytes): {reason}; send PNG, "
        "JPEG or WEBP bytes, or a tensor with shape= and dtype= parameters"
    )


def _load_image(im: Any, body: bytes, f: int) -> torch.Tensor:
    """A PIL image → float32 ``[1,3,H,W]`` in [-1, 1], resized down to multiples of ``f``
    (Lanczos), like diffusers' VaeImageProcessor."""
    from PIL import Image

    try:
        w, h = im.size
        im = im.convert("RGB")
        w8, h8 = w - w % f, h - h % f
        if (w8, h8) != (w, h):
            im = im.resize((w8, h8), Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _bad_image(body, e) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0


def encode_job(model: VAEModel, query: Any, body: bytes, max_output_pixels: int) -> Job:
    """Validate an encode request (raises :class:`InputError` / :class:`HTTPFail`)."""
    eq = P.parse_encode_query(query)
    f = model.spatial_factor
    tq = eq.tensor
    image: Any = None
    if tq is not None:
        _check_body(body, tq)
        shape = tq.shape
        rank = len(shape)
        if rank == 5 and model.video:
            if shape[1] != 3:
                raise InputError(
                    f"video tensor must be [B,3,F,H,W] (RGB, channels first), got shape {list(shape)}"
                )
            model.check_video_frames(shape[2])
        elif rank not in (3, 4) or shape[-3] != 3:
            video_hint = " or [B,3,F,H,W] (video models)" if model.video else ""
            raise InputError(
                f"image tensor must be [3,H,W] or [B,3,H,W] (RGB, channels first){video_hint}, "
                f"got shape {list(shape)}"
            )
        h, w = shape[-2:]
        if h % f or w % f:
            raise InputError(
                f"image tensor height and width must be multiples of {f}, got {h}x{w}; resize or crop it first"
            )
        batch = shape[0] if rank >= 4 else 1
        frames = shape[2] if rank == 5 else 1
        _check_pixels(
            max_output_pixels, batch * frames * h * w, f"the image batch ({batch}x{frames}x{h}x{w})"
        )
        out_dtype = torch.float32 if tq.dtype == "uint8" else P.DTYPES[tq.dtype]
        model_shape: tuple[int, ...] = tuple(shape[1:]) if rank >= 4 else tuple(shape)
        fn = "encode_video" if rank == 5 else "encode"
    else:
        if not body:
            raise InputError(
                "empty body: send image bytes (PNG/JPEG/WEBP) or a tensor with shape= and dtype="
            )
        image = _open_image(body, f, max_output_pixels)
        w, h = image.size
        batch = 1
        out_dtype = torch.float16
        model_shape = (3, h - h % f, w - w % f)
        fn = "encode"
    if eq.scaling_factor == 0:
        raise InputError("scaling_factor=0 would zero every latent")

    def prepare() -> torch.Tensor:
        if tq is None:
            return _load_image(image, body, f)
        x = _from_body(body, tq)
        x = x.float() / 127.5 - 1.0 if tq.dtype == "uint8" else x.float()
        return x.unsqueeze(0) if x.dim() == 3 else x

    def finish(z: torch.Tensor) -> Result:
        if eq.shift_factor is not None:
            z = z - eq.shift_factor
        if eq.scaling_factor is not None:
            z = z * eq.scaling_factor
        return tensor_result(z.to(out_dtype))

    return Job(
        op="encode",
        items=batch,
        fn=fn,
        shape=model_shape,
        prepare=prepare,
        finish=finish,
        cache_key=("encode", tuple(query.items()), len(body)),
    )
