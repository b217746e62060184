"""Image preprocessing for dataset jobs: decode, orient, convert to RGB, resize and crop.

Pure CPU functions, run by the jobs in a pool of worker processes sized to the CPUs
this process may use (``os.sched_getaffinity``), never on the event loop.

Rules (the same for the CLI, the Python API and the Ray adapter):

- EXIF orientation is applied (``ImageOps.exif_transpose``).
- Images with transparency (RGBA, LA, PA, P with a transparent colour) are
  composited on a white background (``alpha="white"``, the default), on black
  (``alpha="black"``), or their alpha is simply dropped (``alpha="drop"``).
- 16-bit images (``I;16*``, and ``I`` with values in 0..65535) are scaled to 8 bits
  (``v / 257``); float images (``F``) with values in [0, 1] are scaled by 255; other
  32-bit integer or float ranges are an :class:`~asyncvae.InputError` that says so
  (never a silently white or black picture). Other modes (L, CMYK, P, ...) are
  converted to RGB by Pillow.
- The pixel count is checked from the header, before anything is decoded
  (``max_pixels``, default 64 MP): a 10000x10000 PNG is refused, not inflated.
- ``crop="center"``: scale so the shorter side fits, then take the centre
  ``W x H`` window (one Lanczos resample straight from the source box).
  ``crop="none"``: resize to exactly ``W x H``, ignoring the aspect ratio.
- Large JPEGs are decoded at a reduced DCT scale first (``Image.draft``) when the
  result still covers the target size, which is much faster and deterministic; then
  one resample (``resample``: Lanczos by default; Pillow's ``reducing_gap`` when the
  source is 3x the target or more).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .._resolution import parse_resolution
from ..errors import InputError

__all__ = [
    "ALPHA_MODES",
    "CROP_MODES",
    "DEFAULT_MAX_PIXELS",
    "WIRE_DTYPES",
    "Prepared",
    "load_image",
    "parse_resolution",
    "prepare",
    "to_wire_tensor",
]

Crop = Literal["center", "none"]
Alpha = Literal["white", "black", "drop"]
CROP_MODES = ("center", "none")
ALPHA_MODES = ("white", "black", "drop")
#: How preprocessed pixels travel to the endpoint: float tensors in [-1, 1] (float16
#: halves the bytes of float32), uint8 tensors (reference server only) or PNG bytes.
WIRE_DTYPES = ("float16", "float32", "uint8", "png")
#: Resampling filters: Lanczos (default, sharpest), bicubic, bilinear (what diffusers'
#: training scripts use; the fastest).
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}
#: Largest source image (width x height, from the header) a job decodes.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Prepared:
    """A preprocessed image: ``pixels`` is uint8 ``[H, W, 3]``; ``size`` the original
    ``(width, height)`` after EXIF orientation; ``crop`` the source box
    ``(x0, y0, x1, y1)`` in original pixel coordinates that became the output."""

    pixels: np.ndarray
    size: tuple[int, int]
    crop: tuple[float, float, float, float]


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float single-channel images to mode L, scaled, or InputError."""
    mode = im.mode
    arr = np.asarray(im)
    if mode.startswith("I;16"):
        return Image.fromarray(((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "I":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise InputError(
                f"32-bit integer image with values {lo}..{hi}: its range is unknown, convert it "
                "to 8 or 16 bits first"
            )
        return Image.fromarray(((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "F":
        if arr.size and not np.isfinite(arr).all():
            raise InputError("float image with NaN or infinite values")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"float image with values {lo:g}..{hi:g}: only [0, 1] is understood, convert it first"
            )
        return Image.fromarray(np.round(arr * 255.0).astype(np.uint8), "L")
    return im


def _to_rgb(im: Image.Image, alpha: Alpha) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        im = _wide_to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )
    if has_alpha and alpha != "drop":
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if alpha == "white" else (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def prepare(
    im: Image.Image,
    resolution: tuple[int, int],
    crop: Crop = "center",
    alpha: Alpha = "white",
    resample: str = "lanczos",
) -> Prepared:
    """Orient, convert and resize/crop an opened PIL image (see the module rules)."""
    flt = RESAMPLE.get(resample)
    if flt is None:
        raise InputError(f"resample={resample!r} must be one of {', '.join(RESAMPLE)}")
    tw, th = resolution
    ow, oh = im.size  # before EXIF orientation and draft
    orientation = im.getexif().get(0x0112, 1)
    if im.format == "JPEG" and crop in CROP_MODES:
        # DCT-domain downscale (1/2, 1/4, 1/8) to the smallest scale that still has every
        # pixel the resample needs: the decoder does most of the shrinking, nearly for free
        sw, sh = (oh, ow) if orientation in (5, 6, 7, 8) else (ow, oh)
        s = max(tw / sw, th / sh) if crop == "center" else 1.0
        need = (tw, th) if crop == "none" else (math.ceil(sw * s), math.ceil(sh * s))
        if orientation in (5, 6, 7, 8):
            need = (need[1], need[0])
        im.draft("RGB", need)
    dw, dh = im.size
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im, alpha)
    w, h = im.size
    swapped = (w, h) != (dw, dh)
    size = (oh, ow) if swapped else (ow, oh)
    if crop == "none":
        box = (0.0, 0.0, float(w), float(h))
    elif crop == "center":
        scale = max(tw / w, th / h)
        bw, bh = tw / scale, th / scale
        x0, y0 = (w - bw) / 2, (h - bh) / 2
        box = (x0, y0, x0 + bw, y0 + bh)
    else:
        raise InputError(f"crop={crop!r} must be one of {', '.join(CROP_MODES)}")
    if (w, h) != (tw, th):
        im = im.resize((tw, th), flt, box=box, reducing_gap=3.0)  # one resample (reduce() first if >= 3x)
    pixels = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    # the crop box in original pixels (draft() may have decoded at a reduced scale)
    sx, sy = size[0] / w, size[1] / h
    orig_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return Prepared(pixels, size, tuple(round(v, 3) for v in orig_box))  # type: ignore[arg-type]


def load_image(
    source: str | Path | bytes,
    resolution: tuple[int, int],
    crop: Crop = "center",
    alpha: Alpha = "white",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    resample: str = "lanczos",
) -> Prepared:
    """Read an image file or bytes and :func:`prepare` it.

    Raises :class:`~asyncvae.InputError` with a stable, address-free message for
    unreadable or corrupt images (so job indexes are reproducible), and for images
    over ``max_pixels`` (checked from the header, before decoding; ``None``: no cap).
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise InputError(f"cannot read image: {e.strerror or e}") from None
    with fp:
        try:
            im = Image.open(fp)
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise InputError(
                    f"image is {im.width}x{im.height} ({im.width * im.height / 1e6:.1f} MP), over the "
                    f"{max_pixels / 1e6:g} MP cap (--max-pixels); not decoded"
                )
            result = prepare(im, resolution, crop, alpha, resample)
        except UnidentifiedImageError:
            raise InputError("not a readable image (unknown or corrupt format)") from None
        except Image.DecompressionBombError as e:
            raise InputError(f"image too large: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"corrupt image ({type(e).__name__}: {e})") from None
    return result


#: uint8 value → its float in [-1, 1] (``v / 127.5 - 1`` computed in float32, then cast):
#: converting by table lookup is exact and far faster than arithmetic on a permuted view.
_LUT = {
    name: ((np.arange(256, dtype=np.float32) / np.float32(127.5)) - np.float32(1.0)).astype(name)
    for name in ("float16", "float32")
}


def to_wire_tensor(pixels: np.ndarray, wire: str = "float16") -> torch.Tensor | Image.Image:
    """uint8 ``[H, W, 3]`` pixels → what is sent to the endpoint: a contiguous
    ``[1, 3, H, W]`` tensor of ``v / 127.5 - 1`` (``float16``/``float32``), the uint8
    tensor (``uint8``), or a PIL image sent as PNG (``png``)."""
    if wire == "png":
        return Image.fromarray(pixels)
    chw = np.asarray(pixels, dtype=np.uint8).transpose(2, 0, 1)
    if wire == "uint8":
        return torch.from_numpy(np.ascontiguousarray(chw)).unsqueeze(0)
    lut = _LUT.get(wire)
    if lut is None:
        raise InputError(f"wire dtype {wire!r} must be one of {', '.join(WIRE_DTYPES)}")
    return torch.from_numpy(lut[np.ascontiguousarray(chw)]).unsqueeze(0)
