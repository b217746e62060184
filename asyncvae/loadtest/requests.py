"""The requests of a load test, built once from a :class:`~asyncvae.loadtest.spec.LoadSpec`
with :mod:`asyncvae.protocol` and reused for every send: one :class:`RequestPlan` per
kind of request (``--mix`` gives several), with what a valid answer must look like.

Pure apart from reading a ``--latent`` file: no sockets, no event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import protocol
from ..errors import InputError
from ..protocol import DecodeOptions, WireRequest
from .spec import PRESETS, LoadSpec, MixEntry, Preset

__all__ = ["Mixer", "RequestPlan", "build_plans", "build_request", "describe_plans"]

JPEG_MAGIC = (b"\xff\xd8\xff",)
PNG_MAGIC = (b"\x89PNG\r\n\x1a\n",)


@dataclass(frozen=True)
class RequestPlan:
    """A request every send of its kind reuses, and what a valid answer looks like.

    ``expect_shape`` is the tensor shape an answer must have (``None`` entries match
    any size; the whole is ``None`` for image/mp4 answers, which are checked by their
    magic bytes: ``expect_magic``, or an ``ftyp`` box for mp4). ``index`` is the
    plan's position in the mix, ``label`` its name in the report.
    """

    request: WireRequest
    expect_shape: tuple[int | None, ...] | None
    expect_magic: tuple[bytes, ...] = ()
    description: str = ""
    label: str = ""
    weight: float = 1.0
    index: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the request body."""
        return self.request.nbytes

    @property
    def expect_mp4(self) -> bool:
        return self.request.expect == "bytes"


@dataclass(frozen=True)
class _Geometry:
    """What a decode request is made of: latents, pixel size, batch, frames."""

    latents: torch.Tensor
    height: int
    width: int
    batch: int
    frames: int | None
    packed: bool
    video: bool


def _load_latent(path: str | Path) -> torch.Tensor:
    p = Path(path)
    if not p.exists():
        raise InputError(f"latent file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if not tensors:
            raise InputError(f"{p} holds no tensors")
        name = "latents" if "latents" in tensors else sorted(tensors)[0]
        return tensors[name]
    if p.suffix in (".pt", ".pth"):
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj.get("latents", next(iter(obj.values()), None))
        if not isinstance(obj, torch.Tensor):
            raise InputError(f"{p} does not hold a tensor (or a dict with 'latents')")
        return obj
    raise InputError(f"latent file {str(p)!r}: use a .pt or .safetensors file")


def _pattern_image(h: int, w: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, h).view(h, 1)
    xx = torch.linspace(0, 1, w).view(1, w)
    phase = torch.rand(3, generator=g) * 6.28
    chans = [((torch.sin(8 * xx + 5 * yy + phase[i]) + 1) * 127.5).to(torch.uint8) for i in range(3)]
    return Image.fromarray(torch.stack(chans, -1).numpy(), "RGB")


def _scaling(entry: MixEntry, preset: Preset) -> tuple[float, float | None]:
    scaling = entry.scaling_factor if entry.scaling_factor is not None else preset.scaling_factor
    shift = entry.shift_factor if entry.shift_factor is not None else preset.shift_factor
    return scaling, shift


def _size(entry: MixEntry, preset: Preset) -> tuple[int, int]:
    """(height, width) in pixels of ``entry``."""
    if entry.resolution is not None:
        return entry.resolution.height, entry.resolution.width
    return preset.height, preset.width


def _geometry(entry: MixEntry, preset: Preset, seed: int) -> _Geometry:
    """The latents of a decode request (from ``latent`` or random of the preset's shape)."""
    h, w = _size(entry, preset)
    if entry.latent is not None:
        lat = entry.latent if isinstance(entry.latent, torch.Tensor) else _load_latent(entry.latent)
        packed, video = lat.dim() == 3, lat.dim() == 5
        if entry.resolution is None:
            if packed:
                raise InputError("a packed 3-D latent needs --resolution WxH (pixels)")
            h, w = lat.shape[-2] * 8, lat.shape[-1] * 8
        frames = protocol.frames_for_latent_frames(lat.shape[2]) if video else None
        return _Geometry(lat, h, w, lat.shape[0], frames, packed, video)
    b = entry.batch
    frames = entry.frames or preset.frames
    if preset.video:
        assert frames is not None
        if (frames - 1) % protocol.TEMPORAL_FACTOR:
            raise InputError(f"frames={frames} must be 4k+1 (e.g. 61)")
        shape: tuple[int, ...] = (b, preset.channels, (frames - 1) // 4 + 1, h // 8, w // 8)
    elif entry.frames is not None:
        raise InputError(f"--frames applies to video presets (hunyuan-video), not {preset.name}")
    elif preset.packed:
        shape = (b, (h // 16) * (w // 16), preset.channels * 4)
    else:
        shape = (b, preset.channels, h // 8, w // 8)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(shape, generator=g).to(preset.dtype)
    return _Geometry(lat, h, w, b, frames if preset.video else None, preset.packed, preset.video)


def _decode_options(entry: MixEntry, preset: Preset, geo: _Geometry) -> DecodeOptions:
    out = entry.output
    if out in ("jpg", "png") and geo.video:
        raise InputError("video latents decode to tensors or mp4; use --output pt, pt-uint8 or mp4")
    if out == "mp4" and not geo.video:
        raise InputError("--output mp4 needs video latents (e.g. --preset hunyuan-video)")
    scaling, shift = _scaling(entry, preset)
    kw: dict[str, Any] = {"scaling_factor": scaling, "shift_factor": shift}
    if geo.packed:
        kw.update(height=geo.height, width=geo.width)
    if out == "pt":
        return DecodeOptions(output_type="pt", return_type="pt", **kw)
    if out == "pt-uint8":
        return DecodeOptions(output_type="pt", return_type="pt", partial_postprocess=True, **kw)
    if out == "mp4":
        return DecodeOptions(output_type="mp4", return_type="mp4", **kw)
    return DecodeOptions(output_type="pil", return_type="pil", image_format=out, **kw)


def _expected_answer(output: str, geo: _Geometry) -> tuple[tuple[int | None, ...] | None, tuple[bytes, ...]]:
    """(tensor shape, magic bytes) a valid answer to a decode of ``geo`` has."""
    b, f, h, w = geo.batch, geo.frames, geo.height, geo.width
    if output == "pt":
        return ((b, 3, f, h, w) if geo.video else (b, 3, h, w)), ()
    if output == "pt-uint8":
        return ((b * (f or 1), h, w, 3) if geo.video else (b, h, w, 3)), ()
    return None, {"jpg": JPEG_MAGIC, "png": PNG_MAGIC, "mp4": ()}[output]


def _encode_plan(entry: MixEntry, preset: Preset, seed: int) -> RequestPlan:
    if preset.video:
        raise InputError("the protocol has no video encode; use an image preset with --op encode")
    if entry.output not in ("pt-uint8", "pt"):
        raise InputError("--op encode answers latents; --output does not apply (leave it out)")
    h, w = _size(entry, preset)
    scaling, shift = _scaling(entry, preset)
    req = protocol.encode_request(_pattern_image(h, w, seed), scaling_factor=scaling, shift_factor=shift)
    return RequestPlan(req, (1, None, h // 8, w // 8), description=f"encode {w}x{h} PNG ({len(req.body)} B)")


def _decode_plan(entry: MixEntry, preset: Preset, seed: int) -> RequestPlan:
    geo = _geometry(entry, preset, seed)
    req = protocol.decode_request(geo.latents, _decode_options(entry, preset, geo))
    shape, magic = _expected_answer(entry.output, geo)
    lat = geo.latents
    desc = f"decode {list(lat.shape)} {protocol.dtype_name(lat.dtype)} → {entry.output} ({req.nbytes} B)"
    return RequestPlan(req, shape, magic, desc)


def build_plan(entry: MixEntry, seed: int = 0) -> RequestPlan:
    """The request of one :class:`MixEntry` (raises :class:`InputError` for bad input)."""
    preset = PRESETS[entry.preset]
    plan = _encode_plan(entry, preset, seed) if entry.op == "encode" else _decode_plan(entry, preset, seed)
    return RequestPlan(plan.request, plan.expect_shape, plan.expect_magic, plan.description,
                       entry.label, float(entry.weight))


def build_plans(spec: LoadSpec) -> tuple[RequestPlan, ...]:
    """One :class:`RequestPlan` per kind of request of ``spec`` (its mix, or its one request)."""
    plans = []
    for k, entry in enumerate(spec.request_entries()):
        p = build_plan(entry, spec.seed + k)
        plans.append(RequestPlan(p.request, p.expect_shape, p.expect_magic, p.description, p.label, p.weight, k))
    return tuple(plans)


def build_request(spec: LoadSpec) -> RequestPlan:
    """The request of a single-request spec (the first of a mix)."""
    return build_plans(spec)[0]


def describe_plans(plans: tuple[RequestPlan, ...]) -> str:
    """``decode [1, 4, 64, 64] float16 → pt-uint8 (32768 B)``, or a mix's entries with their shares."""
    if len(plans) == 1:
        return plans[0].description
    total = sum(p.weight for p in plans)
    return "mix of " + "; ".join(f"{100 * p.weight / total:.0f}% {p.label}: {p.description}" for p in plans)


class Mixer:
    """Picks the next request of a mix: smooth weighted round-robin (nginx's), so any
    stretch of sends holds each kind in proportion to its weight, deterministically."""

    __slots__ = ("_current", "_plans", "_total", "_weights")

    def __init__(self, plans: tuple[RequestPlan, ...]):
        if not plans:
            raise InputError("no request to send")
        self._plans = plans
        self._weights = [p.weight for p in plans]
        self._current = [0.0] * len(plans)
        self._total = sum(self._weights)

    def next(self) -> RequestPlan:
        """The plan of the next send."""
        if len(self._plans) == 1:
            return self._plans[0]
        cur = self._current
        best = 0
        for i, w in enumerate(self._weights):
            cur[i] += w
            if cur[i] > cur[best]:
                best = i
        cur[best] -= self._total
        return self._plans[best]
