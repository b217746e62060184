"""Models the reference server runs: a weightless built-in "VAE" and a diffusers adapter.

Every model works in float32 on CPU and speaks in pixels in [-1, 1], channels first:

- ``encode(images [B,3,H,W]) -> latents [B,C,H/f,W/f]`` (unscaled),
- ``decode(latents [B,C,h,w]) -> images [B,3,h*f,w*f]`` (clamped to [-1, 1]),
- ``decode_video(latents [B,C,T,h,w]) -> video [B,3,F,h*f,w*f]`` with
  ``F = frames_for_latent_frames(T)``.

Scaling (``scaling_factor``/``shift_factor``) is the server's job, not the model's;
the attributes here are the defaults used for the deprecated ``do_scaling=True``
without a ``scaling_factor``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..protocol import SPATIAL_FACTOR, TEMPORAL_FACTOR, frames_for_latent_frames

__all__ = ["BuiltinVAE", "DiffusersVAE", "VAEModel", "interpolate_latent_frames", "unpack_latents"]


def unpack_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unpack Flux-style packed latents ``[B, (H/16)*(W/16), D]`` into ``[B, D/4, H/8, W/8]``.

    ``height``/``width`` are in pixels and must be multiples of 16; raises
    :class:`InputError` when the sizes don't agree.
    """
    if latents.dim() != 3:
        raise InputError(f"packed latents must be 3-D [B, N, D], got shape {list(latents.shape)}")
    b, n, d = latents.shape
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise InputError(
            f"height={height} and width={width} must be positive multiples of 16 for packed latents"
        )
    if d % 4:
        raise InputError(f"packed latents' last dimension {d} must be a multiple of 4 (16 x 2 x 2)")
    hh, ww = height // 16, width // 16
    if n != hh * ww:
        raise InputError(
            f"packed latents have {n} tokens but height={height}, width={width} needs "
            f"(H/16)*(W/16) = {hh * ww}"
        )
    c = d // 4
    x = latents.reshape(b, hh, ww, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, hh * 2, ww * 2)


def interpolate_latent_frames(latents: torch.Tensor) -> torch.Tensor:
    """Expand video latents ``[B,C,T,h,w]`` to ``[B,C,F,h,w]``, ``F = (T-1)*4+1``, by
    linear interpolation in time (frame ``f`` sits at latent time ``f/4``)."""
    t = latents.shape[2]
    n = frames_for_latent_frames(t)
    if t == 1:
        return latents
    pos = torch.arange(n, dtype=torch.float32) / TEMPORAL_FACTOR
    i0 = pos.floor().long().clamp(max=t - 1)
    i1 = (i0 + 1).clamp(max=t - 1)
    a = (pos - i0.float()).view(1, 1, n, 1, 1).to(latents.dtype)
    return latents[:, :, i0] * (1 - a) + latents[:, :, i1] * a


class VAEModel:
    """Base class of the server's models (subclass and override :meth:`encode`/:meth:`decode`)."""

    #: Pixels per latent along H and W.
    spatial_factor: int = SPATIAL_FACTOR
    #: Channels of the latents :meth:`encode` produces.
    latent_channels: int = 4
    #: Defaults for ``do_scaling=True`` without ``scaling_factor``.
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    #: Human-readable name (shown in /stats).
    name: str = "model"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,H,W]`` float32 in [-1, 1] → latents ``[B,C,H/f,W/f]`` float32."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B,C,h,w]`` float32 → images ``[B,3,h*f,w*f]`` float32 in [-1, 1]."""
        raise NotImplementedError

    def check_latent_channels(self, channels: int) -> None:
        """Raise :class:`InputError` when this model can't decode ``channels`` channels."""
        if channels != self.latent_channels:
            raise InputError(
                f"this endpoint's model decodes {self.latent_channels}-channel latents, got {channels}"
            )

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Video latents ``[B,C,T,h,w]`` → ``[B,3,F,H,W]`` with ``F = (T-1)*4+1``.

        The default interpolates latent frames in time and decodes every frame as an image.
        """
        b, c, _t, h, w = latents.shape
        x = interpolate_latent_frames(latents)
        n = x.shape[2]
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w)
        out = self.decode(frames)
        _, ch, hh, ww = out.shape
        return out.reshape(b, n, ch, hh, ww).permute(0, 2, 1, 3, 4).contiguous()


class BuiltinVAE(VAEModel):
    """A deterministic, weightless stand-in for a VAE: cheap, float32, CPU.

    ``encode``: 8x8 average pooling, then a fixed full-rank channel mix ``M`` (C x 3,
    orthonormal columns from a QR of a Gaussian seeded with 0). ``decode``: un-mix
    with the pseudo-inverse of ``M`` (built for any channel count and cached), then
    8x bilinear upsampling, clamped to [-1, 1]. ``decode(encode(x))`` is the bilinear
    8x upsampling of the 8x8 average pool of ``x``.
    """

    name = "builtin"

    def __init__(
        self, latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float = 0.0
    ) -> None:
        if latent_channels < 3:
            raise ValueError(f"latent_channels must be >= 3, got {latent_channels}")
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self._lock = threading.Lock()
        self._mix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_latent_channels(self, channels: int) -> None:
        """The built-in model decodes any channel count (lossy when fewer than 3)."""
        if channels < 1:
            raise InputError("latents need at least one channel")

    def mix(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, pinv(M))`` for ``channels`` latent channels: ``M`` is C x 3, float32."""
        with self._lock:
            got = self._mix.get(channels)
            if got is None:
                g = torch.Generator().manual_seed(0)
                a = torch.randn(max(channels, 3), 3, generator=g, dtype=torch.float64)
                q, r = torch.linalg.qr(a)
                q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique, deterministic signs
                m = q[:channels].contiguous()
                got = (m.float(), torch.linalg.pinv(m).float())
                self._mix[channels] = got
            return got

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """8x8 average pool, then mix 3 → C channels."""
        m, _ = self.mix(self.latent_channels)
        pooled = F.avg_pool2d(images.float(), self.spatial_factor)
        return torch.einsum("ck,bkhw->bchw", m, pooled).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-mix C → 3 channels with the pseudo-inverse, then 8x bilinear upsample."""
        _, pinv = self.mix(latents.shape[1])
        rgb = torch.einsum("kc,bchw->bkhw", pinv, latents.float())
        up = F.interpolate(
            rgb, scale_factor=self.spatial_factor, mode="bilinear", align_corners=False
        )
        return up.clamp_(-1.0, 1.0)


class DiffusersVAE(VAEModel):
    """A diffusers ``AutoencoderKL`` loaded from a local folder (``save_pretrained`` layout).

    diffusers is imported lazily; a missing install raises :class:`ImportError` with the
    fix. Encoding takes the mode of the latent distribution (deterministic).
    """

    name = "diffusers"

    def __init__(self, path: str | Path) -> None:
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"--model {path} needs diffusers: pip install diffusers ({e})") from e
        self.path = str(path)
        self.vae: Any = AutoencoderKL.from_pretrained(self.path, torch_dtype=torch.float32)
        self.vae.eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.name = f"diffusers:{Path(self.path).name}"
        self._lock = threading.Lock()  # diffusers modules are not re-entrant-safe

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``vae.encode(x).latent_dist.mode()``."""
        with self._lock, torch.inference_mode():
            return self.vae.encode(images.float()).latent_dist.mode().float().contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z).sample`` clamped to [-1, 1]."""
        with self._lock, torch.inference_mode():
            return self.vae.decode(latents.float()).sample.float().clamp(-1.0, 1.0).contiguous()


def load_model(spec: str | None, latent_channels: int = 4) -> VAEModel:
    """``"builtin"`` (or None) → :class:`BuiltinVAE`; anything else is a local diffusers folder."""
    if spec is None or spec == "builtin":
        return BuiltinVAE(latent_channels=latent_channels)
    if not Path(spec).is_dir():
        raise InputError(
            f"--model {spec!r} is neither 'builtin' nor a local folder with a diffusers AutoencoderKL"
        )
    return DiffusersVAE(spec)
