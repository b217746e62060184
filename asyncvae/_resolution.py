"""The one resolution parser: ``N`` or ``WxH`` → :class:`Resolution` ``(width, height)``.

Width first, as written, and a named tuple so no caller has to remember the order.
The dataset jobs (``--resolution``, :func:`asyncvae.jobs.parse_resolution`) and the
load tester (``--resolution``, :func:`asyncvae.loadtest.parse_resolution`) both use it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .errors import InputError

__all__ = ["Resolution", "parse_resolution"]


class Resolution(NamedTuple):
    """An image size in pixels, width first (``"768x512"`` is 768 wide, 512 high)."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_resolution(value: Any, *, multiple: int = 8) -> Resolution:
    """``512`` / ``"512"`` → ``Resolution(512, 512)``; ``"768x512"`` (also ``768*512``,
    ``768X512``) or ``(768, 512)`` → ``Resolution(width=768, height=512)``.

    Both sides must be positive multiples of ``multiple`` pixels (8: the VAE's
    spatial factor; the load tester asks 16 so that packed Flux latents fit).
    Raises :class:`InputError` saying what to write instead.
    """
    if isinstance(value, bool):
        raise InputError(f"resolution {value!r} must be N or WxH, e.g. 512 or 768x512")
    if isinstance(value, tuple):
        if len(value) != 2:
            raise InputError(f"resolution {value!r} must be (width, height)")
        w, h = value
    elif isinstance(value, int):
        w = h = value
    else:
        text = str(value).strip().lower().replace("*", "x")
        try:
            if "x" in text:
                ws, hs = text.split("x", 1)
                w, h = int(ws), int(hs)
            else:
                w = h = int(text)
        except ValueError:
            raise InputError(f"resolution {value!r} must be N or WxH, e.g. 512 or 768x512") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (w, h)):
        raise InputError(f"resolution {value!r} must be whole pixels, e.g. 512 or 768x512")
    if w <= 0 or h <= 0 or w % multiple or h % multiple:
        raise InputError(
            f"resolution {w}x{h} must be positive multiples of {multiple} pixels (e.g. 512 or 768x512)"
        )
    return Resolution(int(w), int(h))
