"""Procedural, deterministic test inputs: images (PIL and tensors) and latents.

Import from tests as ``from images import ...`` (``tests/`` is on ``sys.path`` under
pytest's default import mode). Nothing is downloaded; every value is a pure function
of the arguments.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["image_tensor", "latents", "picture", "picture_array"]


def picture_array(width: int = 512, height: int = 512, seed: int = 0) -> np.ndarray:
    """A uint8 ``[H,W,3]`` picture with smooth gradients, hard edges and a little noise
    (so JPEG/PNG, resizing and pooling all have something to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255.0 * x / max(width - 1, 1)
    g = 255.0 * y / max(height - 1, 1)
    cx, cy = width * (0.3 + 0.4 * rng.random()), height * (0.3 + 0.4 * rng.random())
    b = 127.5 + 127.5 * np.sin(np.hypot(x - cx, y - cy) / (4.0 + 8.0 * rng.random()))
    img = np.stack([r, g, b], axis=-1)
    checker = ((x // 32 + y // 32) % 2).astype(bool)
    img[checker] = 255.0 - img[checker]
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def picture(width: int = 512, height: int = 512, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A procedural PIL image of ``mode`` (``RGB``, ``RGBA``, ``L``, ...)."""
    img = Image.fromarray(picture_array(width, height, seed), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def image_tensor(
    batch: int | None = 1,
    height: int = 64,
    width: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.Tensor:
    """An image tensor ``[B,3,H,W]`` (``[3,H,W]`` when ``batch`` is None) in [-1, 1]
    (or [0, 255] for ``torch.uint8``), from :func:`picture_array`."""
    arrs = [picture_array(width, height, seed + i) for i in range(batch or 1)]
    t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    if dtype != torch.uint8:
        t = (t.float() / 127.5 - 1.0).to(dtype)
    return t[0] if batch is None else t


def latents(
    *shape: int, dtype: torch.dtype = torch.float16, seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """Standard-normal latents of ``shape`` and ``dtype`` (seeded, CPU, contiguous)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)
