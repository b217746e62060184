"""The Hybrid Inference wire protocol as pure functions: no sockets, no event loop.

Every wire detail (query parameter names and their order, header names, content
types, dtype names, response size rules) is spelled here once; the client, the
reference server, the load generator and the benchmarks all build and read
messages through this module. See ``shared/PROTOCOL.md`` for the contract.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import json
import math
import numbers
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from PIL import Image

from .errors import InputError, ProtocolError

# --------------------------------------------------------------------------- facts

#: Wire dtype names and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}
#: Latent dtypes a decode request may carry.
LATENT_DTYPES = ("float16", "float32", "bfloat16")

OUTPUT_TYPES = ("pil", "pt", "mp4")
RETURN_TYPES = ("pil", "pt", "mp4")
IMAGE_FORMATS = ("jpg", "png")

HEADER_SHAPE = "shape"
HEADER_DTYPE = "dtype"
HEADER_CONTENT_TYPE = "Content-Type"
HEADER_ACCEPT = "Accept"
HEADER_CONTENT_LENGTH = "Content-Length"
HEADER_RETRY_AFTER = "Retry-After"
HEADER_SCALE_UP_TIMEOUT = "X-Scale-Up-Timeout"
HEADER_AUTHORIZATION = "Authorization"

CONTENT_TYPE_TENSOR = "tensor/binary"
CONTENT_TYPE_JPEG = "image/jpeg"
CONTENT_TYPE_PNG = "image/png"
CONTENT_TYPE_MP4 = "text/plain"  # sic: what the endpoints answer for mp4 bytes
CONTENT_TYPE_JSON = "application/json"

#: Video latents: frames = (T - 1) * TEMPORAL_FACTOR + 1.
TEMPORAL_FACTOR = 4
#: Spatial factor between latents and pixels.
SPATIAL_FACTOR = 8

ResponseKind = Literal["tensor", "image", "bytes"]


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.float16`` → ``"float16"``)."""
    return str(dtype).rsplit(".", 1)[-1]


def format_param(value: Any) -> str:
    """Format a query value like the reference client (``requests`` calls ``str()``)."""
    return str(value)


def frames_for_latent_frames(t: int) -> int:
    """Pixel frames produced by ``t`` latent frames of a video VAE."""
    return (t - 1) * TEMPORAL_FACTOR + 1


# --------------------------------------------------------------------------- tensor body


def tensor_body(tensor: torch.Tensor, *, copy: bool = False) -> memoryview:
    """A read-only byte view of the tensor's logical values, C order, little-endian.

    Zero-copy when the tensor is already a contiguous CPU tensor (unless ``copy``);
    otherwise one copy is made (``.contiguous()`` / ``.cpu()``): the values sent are
    always the logical ones, never the storage order of a transposed or expanded view.
    With ``copy=True`` the view never shares memory with ``tensor`` — a snapshot that
    later writes to the tensor can't change.
    """
    t = tensor.detach() if tensor.requires_grad else tensor
    fresh = False
    if not t.is_cpu:
        t = t.cpu()
        fresh = True
    if not t.is_contiguous():
        t = t.contiguous()
        fresh = True
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16: same bytes as int16
        t = t.view(torch.int16)
    arr = t.numpy()
    if sys.byteorder != "little" and arr.itemsize > 1:  # pragma: no cover - big-endian hosts
        arr = arr.byteswap()
        fresh = True
    view = memoryview(arr).cast("B")
    if copy and not fresh:
        return memoryview(view.tobytes())
    return view.toreadonly()


@dataclass(frozen=True, slots=True)
class WireRequest:
    """One request ready to send: query parameters (ordered, repeated keys allowed),
    headers, the body (a zero-copy view where possible) and what the answer must be."""

    params: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]
    body: memoryview | bytes
    expect: ResponseKind
    #: The answer's expected size in bytes, where the request tells (tensor answers:
    #: exact for decode, an upper estimate for encode; images: the raw pixel size);
    #: 0 where unknown (mp4). The client reserves it in its byte budget before sending.
    size_hint: int = 0
    #: The tensor body's shape (None for an image body).
    shape: tuple[int, ...] | None = None
    #: Requests with equal keys may be coalesced into one (everything on the wire but
    #: the leading dimension agrees); None: this one may not.
    batch_key: Any = None

    @property
    def nbytes(self) -> int:
        return len(self.body) if isinstance(self.body, bytes) else self.body.nbytes


@dataclass(frozen=True)
class DecodeOptions:
    """The options of one decode call, named and defaulted as in ``remote_decode``."""

    processor: Any = None
    do_scaling: bool = True
    scaling_factor: float | None = None
    shift_factor: float | None = None
    output_type: str = "pil"
    return_type: str = "pil"
    image_format: str = "jpg"
    partial_postprocess: bool = False
    height: int | None = None
    width: int | None = None

    # ---- derived facts
    @property
    def expects_tensor(self) -> bool:
        """Whether the endpoint answers with a tensor body (else image or mp4 bytes)."""
        return self.output_type == "pt" or (self.output_type == "pil" and self.processor is not None)

    @property
    def expect(self) -> ResponseKind:
        if self.expects_tensor:
            return "tensor"
        return "bytes" if self.output_type == "mp4" else "image"

    @property
    def accept(self) -> str:
        if self.output_type == "pil" and self.processor is None:
            return CONTENT_TYPE_JPEG if self.image_format == "jpg" else CONTENT_TYPE_PNG
        if self.output_type == "mp4":
            return CONTENT_TYPE_MP4
        return CONTENT_TYPE_TENSOR

    def check(self) -> None:
        """Raise :class:`InputError` for option values or combinations the protocol lacks."""
        if self.output_type not in OUTPUT_TYPES:
            raise InputError(
                f"output_type={self.output_type!r} is not supported; use one of {', '.join(map(repr, OUTPUT_TYPES))}"
            )
        if self.return_type not in RETURN_TYPES:
            raise InputError(
                f"return_type={self.return_type!r} is not supported; use one of {', '.join(map(repr, RETURN_TYPES))}"
            )
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(
                f"image_format={self.image_format!r} is not supported; use 'jpg' or 'png'"
            )
        if self.return_type == "mp4" and self.output_type != "mp4":
            raise InputError(
                f"return_type='mp4' needs output_type='mp4' (got output_type={self.output_type!r})"
            )
        if (
            self.output_type == "pt"
            and self.return_type == "pil"
            and not self.partial_postprocess
            and self.processor is None
        ):
            raise InputError(
                "`processor` is required: output_type='pt' with return_type='pil' and "
                "partial_postprocess=False needs a VaeImageProcessor/VideoProcessor to turn the "
                "tensor into images; pass processor=..., or partial_postprocess=True, or return_type='pt'"
            )
        if self.processor is not None and not (
            hasattr(self.processor, "postprocess") or hasattr(self.processor, "postprocess_video")
        ) and self.output_type == "pt" and self.return_type == "pil" and not self.partial_postprocess:
            raise InputError(
                f"processor {type(self.processor).__name__} has neither postprocess() nor "
                "postprocess_video(); pass a diffusers VaeImageProcessor or VideoProcessor"
            )
        check_scale(self.scaling_factor, self.shift_factor)
        if (self.height is None) != (self.width is None):
            raise InputError("pass both height and width (in pixels), or neither")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= 0):
                raise InputError(f"{name}={v!r} must be a positive int (pixels)")

    def params(self, shape: Iterable[Any], dtype: str) -> tuple[tuple[str, str], ...]:
        """The query parameters, in the reference client's order and formatting."""
        p: list[tuple[str, str]] = [
            ("image_format", format_param(self.image_format)),
            ("output_type", format_param(self.output_type)),
            ("partial_postprocess", format_param(self.partial_postprocess)),
        ]
        p += [("shape", format_param(s)) for s in shape]
        p.append(("dtype", dtype))
        if self.do_scaling and self.scaling_factor is not None:
            p.append(("scaling_factor", format_param(self.scaling_factor)))
        if self.do_scaling and self.shift_factor is not None:
            p.append(("shift_factor", format_param(self.shift_factor)))
        if self.do_scaling and self.scaling_factor is None:
            p.append(("do_scaling", format_param(self.do_scaling)))
        if self.height is not None and self.width is not None:
            p.append(("height", format_param(self.height)))
            p.append(("width", format_param(self.width)))
        return tuple(p)


def _check_layout(tensor: torch.Tensor, what: str) -> None:
    if tensor.layout is not torch.strided:
        raise InputError(f"{what} is a {tensor.layout} tensor; send a dense one (tensor.to_dense())")
    if tensor.device.type == "meta":
        raise InputError(f"{what} is on the meta device and holds no values")


def check_latent(tensor: Any, opts: DecodeOptions) -> None:
    """Raise :class:`InputError` when ``tensor`` can't be a decode input under ``opts``."""
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"tensor must be a torch.Tensor of latents, got {type(tensor).__name__}")
    name = dtype_name(tensor.dtype)
    if name not in LATENT_DTYPES:
        raise InputError(
            f"latents of dtype {name} can't be sent; convert them first, e.g. tensor.to(torch.float16) "
            f"(supported: {', '.join(LATENT_DTYPES)})"
        )
    _check_layout(tensor, "the latent tensor")
    if tensor.dim() not in (3, 4, 5):
        raise InputError(
            f"latents must be 4-D [B,C,H,W] (image), 3-D [B,seq,C] (packed, with height/width) "
            f"or 5-D [B,C,T,H,W] (video); got {tensor.dim()}-D shape {list(tensor.shape)}"
        )
    if tensor.numel() == 0:
        raise InputError(f"latents are empty (shape {list(tensor.shape)}); nothing to decode")
    if tensor.dim() == 3 and (opts.height is None or opts.width is None):
        raise InputError(
            "`height` and `width` required for packed latents: a 3-D tensor "
            f"{list(tensor.shape)} is packed (Flux); pass height= and width= in pixels"
        )
    if opts.output_type == "mp4" and tensor.dim() != 5:
        raise InputError(f"output_type='mp4' needs 5-D video latents, got {tensor.dim()}-D")


def decode_size_hint(shape: tuple[int, ...], opts: DecodeOptions) -> int:
    """The decode answer's size in bytes as the request implies it (0: unknown, mp4).

    Pixels are the latent size times :data:`SPATIAL_FACTOR` (``height``/``width`` for
    packed latents), video frames ``(T - 1) * 4 + 1``; tensors are uint8 with
    ``partial_postprocess``, else 2 bytes a value (4 for a processor's frames, whose
    dtype the protocol leaves open); an image is at most its raw pixels plus a margin.
    """
    if opts.output_type == "mp4":
        return 0
    b = shape[0]
    if len(shape) == 3:
        h, w, frames = opts.height or 0, opts.width or 0, 1
    elif len(shape) == 5:
        h, w, frames = shape[3] * SPATIAL_FACTOR, shape[4] * SPATIAL_FACTOR, frames_for_latent_frames(shape[2])
    else:
        h, w, frames = shape[2] * SPATIAL_FACTOR, shape[3] * SPATIAL_FACTOR, 1
    values = b * frames * h * w * 3
    if not opts.expects_tensor:  # an encoded image: never bigger than raw pixels + PNG overhead
        return values + h * b * frames + 4096
    if opts.output_type == "pt" and opts.partial_postprocess:
        return values
    return values * (4 if opts.processor is not None and opts.output_type == "pil" else 2)


#: Encode answers are latents ``[B, C, H/8, W/8]`` whose channels and dtype the request
#: doesn't tell: the size hint assumes 16 channels of 4 bytes (the byte budget's lease
#: shrinks to the true size when the answer's headers arrive).
ENCODE_HINT_BYTES_PER_LATENT_PIXEL = 16 * 4


def encode_size_hint(batch: int, height: int, width: int) -> int:
    """An upper estimate of an encode answer's size in bytes."""
    return batch * (height // SPATIAL_FACTOR) * (width // SPATIAL_FACTOR) * ENCODE_HINT_BYTES_PER_LATENT_PIXEL


class _Facts:
    """What a request of one shape and dtype looks like, derived once per plan.

    ``batch_key`` is set where items of this shape may share a coalesced request: it is
    everything on the wire but the leading dimension (so equal keys mean equal
    options, per-item shape and dtype); ``None`` where they may not (images and mp4
    answers, video latents, PIL inputs).
    """

    __slots__ = ("batch_key", "dtype", "expect", "headers", "leading", "params", "shape", "size_hint")

    def __init__(self, params: tuple[tuple[str, str], ...], headers: Mapping[str, str],
                 expect: ResponseKind, size_hint: int, shape: tuple[int, ...], dtype: str,
                 batch_key: Any) -> None:
        self.params = params
        self.headers = headers
        self.expect = expect
        self.size_hint = size_hint
        self.shape = shape
        self.dtype = dtype
        self.leading = shape[0] if shape else 1
        self.batch_key = batch_key


#: Encode requests carry no headers of their own (the reference client sends none).
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})

#: Distinct shapes a plan remembers (a job of a million items sees a handful).
_PLAN_CACHE = 256


class DecodePlan:
    """A decode call's options, checked once, and the request facts of each latent
    shape/dtype derived once (a bulk job re-checks nothing per item).

    :meth:`request` builds the :class:`WireRequest` of one tensor; the cache is keyed
    by ``(shape, dtype)``.
    """

    __slots__ = ("_cache", "headers", "opts")

    def __init__(self, opts: DecodeOptions) -> None:
        opts.check()
        self.opts = opts
        #: the request headers of every request of this plan
        self.headers: Mapping[str, str] = {HEADER_CONTENT_TYPE: CONTENT_TYPE_TENSOR, HEADER_ACCEPT: opts.accept}
        self._cache: dict[Any, _Facts] = {}

    def facts(self, tensor: Any) -> _Facts:
        """The checked request facts of ``tensor``'s shape and dtype."""
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"tensor must be a torch.Tensor of latents, got {type(tensor).__name__}")
        key = (tensor.shape, tensor.dtype, tensor.layout)
        f = self._cache.get(key)
        if f is None:
            check_latent(tensor, self.opts)
            shape = tuple(tensor.shape)
            opts = self.opts
            name = dtype_name(tensor.dtype)
            batch_key = None
            if opts.expects_tensor and len(shape) in (3, 4):
                batch_key = ("decode", opts.params(("*", *shape[1:]), name), opts.accept)
            f = _Facts(
                opts.params(shape, name), self.headers, opts.expect, decode_size_hint(shape, opts),
                shape, name, batch_key,
            )
            if len(self._cache) >= _PLAN_CACHE:
                self._cache.clear()
            self._cache[key] = f
        return f

    def request(self, tensor: torch.Tensor, *, copy: bool = False) -> WireRequest:
        """The request for ``tensor`` (``copy``: the body is a snapshot, see :func:`tensor_body`)."""
        f = self.facts(tensor)
        return WireRequest(f.params, f.headers, tensor_body(tensor, copy=copy), f.expect, f.size_hint,
                           f.shape, f.batch_key)

    def stacked(self, shape: tuple[int, ...], dtype: str, body: bytes) -> WireRequest:
        """One request for several same-shaped latents whose bodies were joined along
        dim 0 (request coalescing); ``shape`` is the stacked shape."""
        return WireRequest(
            self.opts.params(shape, dtype), self.headers, body, self.opts.expect,
            decode_size_hint(shape, self.opts), shape,
        )


def decode_request(tensor: torch.Tensor, opts: DecodeOptions) -> WireRequest:
    """Validate and build a decode request (raises :class:`InputError`; nothing is sent)."""
    return DecodePlan(opts).request(tensor)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy.bool_ too


def _is_int(v: Any) -> bool:
    """An integer, numpy's included (``str()`` of it is what goes on the wire)."""
    return isinstance(v, numbers.Integral) and not _is_bool(v)


def check_scale(scaling_factor: Any, shift_factor: Any) -> None:
    """Scaling and shift factors are finite real numbers (numpy scalars too) or None."""
    for name, v in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if v is None:
            continue
        if not isinstance(v, numbers.Real) or _is_bool(v) or not math.isfinite(float(v)):
            raise InputError(f"{name}={v!r} must be a finite number or None")


#: PIL modes a PNG can't hold that are sent as RGB (what the endpoint makes of any image).
_TO_RGB_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV"})
#: zlib level of the PNG bodies: 1 is several times faster than PIL's default 6 and the
#: pixels (all the endpoint reads) are the same; the body is somewhat larger.
PNG_COMPRESS_LEVEL = 1


def pil_to_png(image: Image.Image, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of a PIL image (the body of an encode request).

    Modes PNG can't store (CMYK, YCbCr, LAB, HSV) are converted to RGB first; float and
    32-bit integer images are refused, since their scale is ambiguous.
    """
    import io

    if image.mode in _TO_RGB_MODES:
        image = image.convert("RGB")
    elif image.mode in ("F", "I"):
        raise InputError(
            f"a mode {image.mode!r} image (32-bit {'float' if image.mode == 'F' else 'int'}) can't be "
            "sent: its value range is ambiguous; convert it to 'RGB' (or 'I;16'/'L') first"
        )
    buf = io.BytesIO()
    try:
        image.save(buf, format="PNG", compress_level=compress_level)
    except (OSError, ValueError) as e:
        raise InputError(f"the {image.mode} image can't be encoded as PNG ({e}); convert('RGB') it first") from None
    return buf.getvalue()


#: Pixels above which encoding a PIL image to PNG is worth a worker thread.
PNG_THREAD_PIXELS = 128 * 128


class EncodePlan:
    """An encode call's options, checked once; :meth:`request` builds one request."""

    __slots__ = ("_cache", "_params", "scaling_factor", "shift_factor")

    #: encode requests carry no headers of their own (the reference client sends none)
    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(self, scaling_factor: float | None = None, shift_factor: float | None = None) -> None:
        check_scale(scaling_factor, shift_factor)
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        params: list[tuple[str, str]] = []
        if scaling_factor is not None:
            params.append(("scaling_factor", format_param(scaling_factor)))
        if shift_factor is not None:
            params.append(("shift_factor", format_param(shift_factor)))
        self._params = tuple(params)
        self._cache: dict[Any, _Facts] = {}

    def facts(self, image: Any) -> _Facts:
        """The checked request facts of an image tensor's shape and dtype."""
        key = (image.shape, image.dtype, image.layout)
        f = self._cache.get(key)
        if f is None:
            name = dtype_name(image.dtype)
            if name not in DTYPES:
                raise InputError(
                    f"image tensors of dtype {name} can't be sent; use float16/float32/bfloat16 in [-1, 1] "
                    "or uint8 in [0, 255]"
                )
            _check_layout(image, "the image tensor")
            if image.dim() not in (3, 4) or image.shape[-3] != 3:
                raise InputError(
                    f"image tensor must be [3,H,W] or [B,3,H,W] (channels first), got shape {list(image.shape)}"
                )
            if image.numel() == 0:
                raise InputError(f"image tensor is empty (shape {list(image.shape)})")
            h, w = image.shape[-2:]
            if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
                raise InputError(
                    f"image tensor height and width must be multiples of {SPATIAL_FACTOR}, got {h}x{w}; "
                    "resize or crop it first"
                )
            shape = tuple(image.shape)
            batch = shape[0] if len(shape) == 4 else 1
            batch_key = ("encode", self._tensor_params(("*", *shape[1:]), name)) if len(shape) == 4 else None
            f = _Facts(self._tensor_params(shape, name), _NO_HEADERS, "tensor", encode_size_hint(batch, h, w),
                       shape, name, batch_key)
            if len(self._cache) >= _PLAN_CACHE:
                self._cache.clear()
            self._cache[key] = f
        return f

    def _tensor_params(self, shape: tuple[Any, ...], dtype: str) -> tuple[tuple[str, str], ...]:
        return self._params + tuple(("shape", format_param(s)) for s in shape) + (("dtype", dtype),)

    def request(self, image: Any, *, copy: bool = False) -> WireRequest:
        """The request for a PIL image (a PNG body) or an image tensor."""
        if isinstance(image, torch.Tensor):
            f = self.facts(image)
            return WireRequest(f.params, f.headers, tensor_body(image, copy=copy), "tensor", f.size_hint,
                               f.shape, f.batch_key)
        if isinstance(image, Image.Image):
            if image.width < SPATIAL_FACTOR or image.height < SPATIAL_FACTOR:
                raise InputError(f"image is {image.width}x{image.height}; it must be at least 8x8 pixels")
            return WireRequest(self._params, _NO_HEADERS, pil_to_png(image), "tensor",
                               encode_size_hint(1, image.height, image.width))
        raise InputError(f"image must be a PIL.Image.Image or a torch.Tensor, got {type(image).__name__}")

    def stacked(self, shape: tuple[int, ...], dtype: str, body: bytes) -> WireRequest:
        """One request for several same-shaped image tensors joined along dim 0."""
        return WireRequest(self._tensor_params(shape, dtype), _NO_HEADERS, body, "tensor",
                           encode_size_hint(shape[0], shape[-2], shape[-1]), shape)


def encode_request(
    image: Any, scaling_factor: float | None = None, shift_factor: float | None = None
) -> WireRequest:
    """Validate and build an encode request for a PIL image or an image tensor."""
    return EncodePlan(scaling_factor, shift_factor).request(image)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class TensorSpec:
    """A tensor response's declared shape and dtype, checked for consistency."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @functools.cached_property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None:
        # plain dicts are case-sensitive; aiohttp's CIMultiDict is not
        lname = name.lower()
        for k, val in headers.items():
            if k.lower() == lname:
                return val
    return v


@functools.lru_cache(maxsize=1024)
def _spec(raw_shape: str, raw_dtype: str) -> TensorSpec:
    """The checked spec of two raw header values (cached: a bulk job sees few distinct ones)."""
    try:
        shape = json.loads(raw_shape)
    except ValueError:
        raise ProtocolError(f"shape header is not a JSON list: {raw_shape[:100]!r}", retryable=True) from None
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError(
            f"shape header must be a JSON list of at most 8 non-negative ints, got {raw_shape[:100]!r}",
            retryable=True,
        )
    dtype = raw_dtype.strip()
    if dtype.startswith("torch."):
        dtype = dtype[6:]
    if dtype not in DTYPES:
        raise ProtocolError(
            f"dtype header {raw_dtype[:50]!r} is not one of {', '.join(DTYPES)}", retryable=True
        )
    return TensorSpec(tuple(shape), dtype)


def parse_tensor_headers(
    headers: Mapping[str, str], *, max_bytes: int | None = None
) -> TensorSpec:
    """Read and check the ``shape``/``dtype`` headers of a tensor response.

    Raises :class:`ProtocolError` for missing, malformed or absurd values, or a size
    over ``max_bytes`` — before anything is allocated. Whether the body length
    agrees is :func:`check_body_length`'s job.
    """
    raw_shape = _header(headers, HEADER_SHAPE)
    raw_dtype = _header(headers, HEADER_DTYPE)
    if raw_shape is None or raw_dtype is None:
        missing = [n for n, v in ((HEADER_SHAPE, raw_shape), (HEADER_DTYPE, raw_dtype)) if v is None]
        raise ProtocolError(
            f"tensor response lacks the {' and '.join(missing)} header(s); the endpoint may not "
            "speak the remote VAE protocol, or a proxy dropped them",
            retryable=True,
        )
    spec = _spec(raw_shape, raw_dtype)
    if max_bytes is not None and spec.nbytes > max_bytes:
        raise ProtocolError(
            f"response declares a {list(spec.shape)} {spec.dtype} tensor of {spec.nbytes} bytes, over the "
            f"client's max_response_bytes={max_bytes}; raise Limits(max_response_bytes=...) if it is real"
        )
    return spec


def check_body_length(expected: int, content_length: int | None) -> None:
    """A ``Content-Length`` that disagrees with the declared tensor size is a protocol error."""
    if content_length is not None and content_length != expected:
        raise ProtocolError(
            f"Content-Length {content_length} disagrees with the shape/dtype headers ({expected} bytes)",
            retryable=True,
        )


def parse_content_length(headers: Mapping[str, str]) -> int | None:
    v = _header(headers, HEADER_CONTENT_LENGTH)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise ProtocolError(f"Content-Length is not an integer: {v[:40]!r}", retryable=True) from None
    if n < 0:
        raise ProtocolError(f"negative Content-Length {n}", retryable=True)
    return n


def detect_image_type(data: bytes | memoryview) -> str:
    """The image type of encoded bytes by magic number, named as the reference client does."""
    head = bytes(data[:8])
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] == b"RIFF":
        return "webp"
    return "unknown"


def error_body(status: int, body: bytes, content_type: str | None = None) -> Any:
    """The ``args[0]`` of an HTTP error: the JSON body when it is JSON, else a dict
    naming the status and (the start of) the text, so a 502 HTML page stays readable."""
    text = body.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        snippet = " ".join(text.split())[:500]
        return {"error": snippet or f"HTTP {status} with an empty body", "status": status}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            # asctime dates and "-0000" carry no zone; HTTP dates are always GMT (RFC 9110)
            when = when.replace(tzinfo=datetime.UTC)
        secs = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(secs):
        return None
    return max(0.0, secs)


# --------------------------------------------------------------------------- server side


def _bool(v: str, name: str) -> bool:
    s = v.strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no", "none"):
        return False
    raise InputError(f"{name}={v!r} is not a boolean (True/False)")


def _float(v: str, name: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise InputError(f"{name}={v!r} is not a number") from None
    if not math.isfinite(f):
        raise InputError(f"{name}={v!r} is not finite")
    return f


def _int(v: str, name: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise InputError(f"{name}={v!r} is not an integer") from None


def _getall(query: Any, key: str) -> list[str]:
    if hasattr(query, "getall"):
        return list(query.getall(key, []))
    v = query.get(key)
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _parse_shape(values: list[str]) -> tuple[int, ...]:
    if len(values) == 1 and values[0].strip().startswith("["):
        try:
            shape = json.loads(values[0])
        except ValueError:
            raise InputError(f"shape={values[0]!r} is not a list of ints") from None
        values = [str(s) for s in shape]
    shape_t = tuple(_int(s, "shape") for s in values)
    if any(s <= 0 for s in shape_t):
        raise InputError(f"shape {list(shape_t)} has a non-positive dimension")
    return shape_t


@dataclass(frozen=True)
class TensorQuery:
    """A request body's declared tensor (from the ``shape``/``dtype`` parameters)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.shape, self.dtype).nbytes


def parse_tensor_query(query: Any) -> TensorQuery | None:
    """``shape``/``dtype`` of a request; ``None`` when neither is given (an image body)."""
    shape_v = _getall(query, "shape")
    dtype_v = _getall(query, "dtype")
    if not shape_v and not dtype_v:
        return None
    if not shape_v:
        raise InputError("missing `shape` parameter for a tensor body")
    if not dtype_v:
        raise InputError("missing `dtype` parameter for a tensor body")
    dtype = dtype_v[-1]
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return TensorQuery(_parse_shape(shape_v), dtype)


@dataclass(frozen=True)
class DecodeQuery:
    """A decode request as a server reads it from the query string."""

    tensor: TensorQuery
    output_type: str = "pil"
    image_format: str = "jpg"
    partial_postprocess: bool = False
    scaling_factor: float | None = None
    shift_factor: float | None = None
    do_scaling: bool = False
    height: int | None = None
    width: int | None = None


def parse_decode_query(query: Any) -> DecodeQuery:
    """Parse and check a decode request's parameters (raises :class:`InputError`)."""
    tq = parse_tensor_query(query)
    if tq is None:
        raise InputError("missing `shape` and `dtype` parameters")
    if tq.dtype not in LATENT_DTYPES:
        raise InputError(f"latents of dtype {tq.dtype} are not supported; use {', '.join(LATENT_DTYPES)}")

    def one(key: str) -> str | None:
        vals = _getall(query, key)
        return vals[-1] if vals else None

    output_type = one("output_type") or "pil"
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"unknown output_type {output_type!r}; use pil, pt or mp4")
    image_format = one("image_format") or "jpg"
    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"unknown image_format {image_format!r}; use jpg or png")
    pp = one("partial_postprocess")
    sf, sh, ds = one("scaling_factor"), one("shift_factor"), one("do_scaling")
    h, w = one("height"), one("width")
    return DecodeQuery(
        tensor=tq,
        output_type=output_type,
        image_format=image_format,
        partial_postprocess=_bool(pp, "partial_postprocess") if pp is not None else False,
        scaling_factor=_float(sf, "scaling_factor") if sf is not None else None,
        shift_factor=_float(sh, "shift_factor") if sh is not None else None,
        do_scaling=_bool(ds, "do_scaling") if ds is not None else False,
        height=_int(h, "height") if h is not None else None,
        width=_int(w, "width") if w is not None else None,
    )


@dataclass(frozen=True)
class EncodeQuery:
    """An encode request as a server reads it: a tensor body, or image bytes when ``tensor`` is None."""

    tensor: TensorQuery | None
    scaling_factor: float | None = None
    shift_factor: float | None = None


def parse_encode_query(query: Any) -> EncodeQuery:
    sf = _getall(query, "scaling_factor")
    sh = _getall(query, "shift_factor")
    return EncodeQuery(
        tensor=parse_tensor_query(query),
        scaling_factor=_float(sf[-1], "scaling_factor") if sf else None,
        shift_factor=_float(sh[-1], "shift_factor") if sh else None,
    )


def is_decode(query: Any) -> bool:
    """Tell a decode request from an encode one on a shared URL: decode always sends
    ``output_type`` (the reference client does), encode never does."""
    return bool(_getall(query, "output_type"))


def tensor_response_headers(tensor: torch.Tensor) -> dict[str, str]:
    """Headers of a tensor response body."""
    return {
        HEADER_CONTENT_TYPE: CONTENT_TYPE_TENSOR,
        HEADER_SHAPE: json.dumps(list(tensor.shape)),
        HEADER_DTYPE: dtype_name(tensor.dtype),
    }


def error_json(message: str) -> bytes:
    """The body of an error answer, as the toolkit servers write it."""
    return json.dumps({"error": message}).encode()
