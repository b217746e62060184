"""Pure conversions between wire payloads and what the caller asked for.

No sockets, no event loop: a decoded response payload (a tensor, image bytes or mp4
bytes) plus the call's :class:`~asyncvae.protocol.DecodeOptions` give the value
``remote_decode`` returns, exactly as the reference client builds it (PROTOCOL.md,
"Decode responses"), and a working result where the reference client breaks.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .errors import ProtocolError
from .protocol import DecodeOptions, detect_image_type

DecodeResult = Any  # PIL.Image | list[PIL.Image] | torch.Tensor | bytes


def open_image(data: bytes | bytearray | memoryview, *, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from encoded bytes, with ``.format`` set to the detected type
    (``"jpeg"``/``"png"``, as the reference client sets it).

    Raises :class:`ProtocolError` for bytes PIL can't read and for images whose
    pixel count exceeds ``max_pixels`` (a decompression bomb), before decoding them.
    """
    kind = detect_image_type(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data if isinstance(data, bytes) else bytes(data)))
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ProtocolError(
                    f"response image is {img.width}x{img.height}, over the {max_pixels}-pixel limit "
                    "implied by Limits.max_response_bytes; refusing to decode it"
                )
            out = img.convert("RGB")
    except ProtocolError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own message names the BytesIO object, which says nothing to the reader
        reason = "no image format recognised" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ProtocolError(
            f"response body ({len(data)} bytes, looks like {kind}) is not a readable image: {reason}"
        ) from None
    out.format = kind
    return out


def uint8_to_pil(t: torch.Tensor) -> Image.Image | list[Image.Image]:
    """``[N,H,W,3]`` uint8 → a list of PIL images, unwrapped when there is one."""
    images = [Image.fromarray(frame.numpy()) for frame in t]
    return images[0] if len(images) == 1 else images


def unit_frames_to_pil(t: torch.Tensor) -> list[Image.Image]:
    """``[N,3,H,W]`` in [0, 1] → a list of PIL images, rounded like the reference client."""
    arr = (t.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(frame) for frame in arr]


def tensor_result(t: torch.Tensor, opts: DecodeOptions) -> DecodeResult:
    """The caller's value from a tensor response of a decode call."""
    if opts.output_type == "pt":
        if opts.partial_postprocess:
            return uint8_to_pil(t) if opts.return_type == "pil" else t
        if opts.processor is None or opts.return_type == "pt":
            return t
        if hasattr(opts.processor, "postprocess_video"):
            return opts.processor.postprocess_video(t, output_type="pil")[0]
        return opts.processor.postprocess(t, output_type="pil")[0]
    # output_type == "pil" with a processor (video models): frames in [0, 1]
    if opts.return_type == "pil":
        return unit_frames_to_pil(t)
    return t


def bytes_result(data: bytes, opts: DecodeOptions, *, max_pixels: int | None = None) -> DecodeResult:
    """The caller's value from an image or mp4 response of a decode call.

    ``output_type="mp4"`` always gives the ``bytes`` (the reference client crashes on
    the default ``return_type="pil"``). An image answer with ``return_type="pt"`` gives
    a ``[1,H,W,3]`` uint8 tensor (the reference client crashes there too).
    """
    if opts.output_type == "mp4":
        return bytes(data)
    img = open_image(data, max_pixels=max_pixels)
    if opts.return_type == "pt":
        import numpy as np

        return torch.from_numpy(np.asarray(img).copy()).unsqueeze(0)
    return img


def needs_thread(opts: DecodeOptions) -> bool:
    """Whether turning the payload into the result is CPU work worth moving off the loop."""
    if opts.expects_tensor:
        return opts.return_type == "pil"
    return opts.output_type != "mp4"
