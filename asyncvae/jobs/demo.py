"""Procedural sample images for ``asyncvae encode --demo`` (no downloads, deterministic)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_demo_images", "make_image"]

_SIZES = ((512, 384), (384, 512), (448, 448), (640, 360), (320, 320), (500, 333))


def make_image(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A deterministic RGB test picture: a colour gradient, rings and a checkerboard."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x / max(1, w - 1))[..., None]
    img = c0 * (1 - t) + c1 * t
    cx, cy, period = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 40)
    rings = np.sin(np.hypot(x - cx, y - cy) / period * 2 * np.pi)[..., None]
    img = img * (0.75 + 0.25 * rings)
    cell = int(rng.integers(8, 48))
    checker = (((x // cell) + (y // cell)) % 2)[..., None]
    img = np.where(checker > 0, img, 255 - img * 0.5)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_demo_images(folder: str | os.PathLike[str], n: int = 32) -> Path:
    """Write ``n`` sample images (JPEG and PNG, several sizes) into ``folder``; returns it.

    Files that already exist are kept, so re-running the demo resumes."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ext = "png" if i % 4 == 3 else "jpg"
        path = root / f"sample-{i:03d}.{ext}"
        if path.exists():
            continue
        im = make_image(i, _SIZES[i % len(_SIZES)])
        tmp = path.with_name(f".{path.name}.tmp")
        im.save(tmp, format="PNG" if ext == "png" else "JPEG", quality=92)
        os.replace(tmp, path)
    return root
