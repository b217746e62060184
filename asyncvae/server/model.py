"""Models the reference server runs: the interface, and a weightless built-in "VAE"
(the diffusers adapter is :mod:`asyncvae.server.diffusers_model`).

Every model takes and returns float32 CPU tensors and speaks in pixels in [-1, 1],
channels first (an adapter moves them to its device and dtype):

- ``encode(images [B,3,H,W]) -> latents [B,C,H/f,W/f]`` (unscaled),
- ``decode(latents [B,C,h,w]) -> images [B,3,h*f,w*f]`` (clamped to [-1, 1]),
- ``decode_video(latents [B,C,T,h,w]) -> video [B,3,F,h*f,w*f]`` with
  ``F = decoded_frames(T)``,
- ``encode_video(video [B,3,F,H,W]) -> latents [B,C,T,h,w]`` (video models only).

Scaling (``scaling_factor``/``shift_factor``) is the server's job, not the model's;
the attributes here are the defaults used for the deprecated ``do_scaling=True``
without a ``scaling_factor``.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..protocol import SPATIAL_FACTOR, TEMPORAL_FACTOR, frames_for_latent_frames

__all__ = ["BuiltinVAE", "VAEModel", "interpolate_latent_frames", "unpack_latents"]


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
    """Base class of the server's models (subclass and override :meth:`encode`/:meth:`decode`).

    Every method takes and returns float32 CPU tensors in the layouts of the module
    docstring, for a whole batch at once (the server stacks same-shape requests when
    dynamic batching is on and splits the answer along dim 0). A model whose methods
    are not safe to call from several threads at once sets ``thread_safe = False``
    (the server then serialises its calls).
    """

    #: Pixels per latent along H and W.
    spatial_factor: int = SPATIAL_FACTOR
    #: Pixel frames per latent frame of video latents (1 for per-frame image models).
    temporal_factor: int = TEMPORAL_FACTOR
    #: Channels of the latents :meth:`encode` produces.
    latent_channels: int = 4
    #: Defaults for ``do_scaling=True`` without ``scaling_factor``.
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    #: Human-readable name (shown in /stats).
    name: str = "model"
    #: True for a video VAE that encodes/decodes 5-D tensors natively.
    video: bool = False
    #: False when calls must not overlap (the server then takes a lock around them).
    thread_safe: bool = True
    #: torch intra-op threads on a replica thread while it runs this model (None: torch's
    #: default). Tiny ops gain nothing from threads and lose a lot to their spinning.
    intra_op_threads: int | None = None

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

    def decoded_frames(self, latent_frames: int) -> int:
        """Pixel frames that ``latent_frames`` latent frames decode to (for size limits)."""
        if self.temporal_factor <= 1:
            return latent_frames
        return (latent_frames - 1) * self.temporal_factor + 1

    def check_video_frames(self, frames: int) -> None:
        """Raise :class:`InputError` when :meth:`encode_video` can't take ``frames`` frames."""
        tf = self.temporal_factor
        if self.video and tf > 1 and (frames - 1) % tf:
            raise InputError(
                f"this endpoint's video model encodes 1 + k*{tf} frames (1, {1 + tf}, "
                f"{1 + 2 * tf}, ...), got {frames}; trim the clip"
            )

    def unscale(self, latents: torch.Tensor, shift_factor: float | None = None) -> torch.Tensor:
        """The model's default latent un-scaling, for ``do_scaling=True`` without a
        ``scaling_factor``: ``latents / scaling_factor + shift``."""
        shift = self.shift_factor if shift_factor is None else shift_factor
        return latents / self.scaling_factor + shift

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Video latents ``[B,C,T,h,w]`` → ``[B,3,F,H,W]`` with ``F = decoded_frames(T)``.

        The default interpolates latent frames in time and decodes every frame as an image.
        """
        b, c, _t, h, w = latents.shape
        x = interpolate_latent_frames(latents)
        n = x.shape[2]
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w)
        out = self.decode(frames)
        _, ch, hh, ww = out.shape
        return out.reshape(b, n, ch, hh, ww).permute(0, 2, 1, 3, 4).contiguous()

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B,3,F,H,W]`` in [-1, 1] → latents ``[B,C,T,h,w]`` (video models only)."""
        raise InputError(
            f"this endpoint's model ({self.name}) encodes images [B,3,H,W], not 5-D video; "
            "send frames as a batch of images"
        )


class BuiltinVAE(VAEModel):
    """A deterministic, weightless stand-in for a VAE: cheap, float32, CPU.

    ``encode``: 8x8 average pooling, then a fixed full-rank channel mix ``M`` (C x 3,
    orthonormal columns from a QR of a Gaussian seeded with 0). ``decode``: un-mix
    with the pseudo-inverse of ``M`` (built for any channel count and cached), then
    8x bilinear upsampling, clamped to [-1, 1]. ``decode(encode(x))`` is the bilinear
    8x upsampling of the 8x8 average pool of ``x``.
    """

    name = "builtin"
    intra_op_threads = 1

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


def __getattr__(name: str) -> Any:
    # DiffusersVAE and load_model live in .diffusers_model (it imports this module);
    # importing them from here keeps working.
    if name in ("DiffusersVAE", "load_model"):
        from . import diffusers_model

        return getattr(diffusers_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
