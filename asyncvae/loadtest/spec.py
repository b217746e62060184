"""What a load test sends and how: :class:`LoadSpec`, request presets, ramp stages and
the one :class:`~asyncvae.protocol.WireRequest` built from them (once, then reused).

Pure apart from reading a ``--latent`` file: no sockets, no event loop.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .. import protocol
from ..errors import InputError
from ..protocol import DecodeOptions, WireRequest

__all__ = [
    "OUTPUTS",
    "PRESETS",
    "FindMaxSpec",
    "LoadSpec",
    "Preset",
    "RequestPlan",
    "Stage",
    "build_request",
    "parse_duration",
    "parse_ramp",
    "parse_warmup",
]

Op = Literal["decode", "encode"]
#: ``--output`` values and what they mean on the wire.
OUTPUTS = ("pt", "pt-uint8", "jpg", "png", "mp4")


@dataclass(frozen=True)
class Preset:
    """A model family's latent facts (see PROTOCOL.md, "Models")."""

    name: str
    channels: int
    dtype: torch.dtype
    scaling_factor: float
    shift_factor: float | None
    height: int
    width: int
    packed: bool = False
    frames: int | None = None  # pixel frames of a video model

    @property
    def video(self) -> bool:
        return self.frames is not None


PRESETS: dict[str, Preset] = {
    "sd": Preset("sd", 4, torch.float16, 0.18215, None, 512, 512),
    "sdxl": Preset("sdxl", 4, torch.float16, 0.13025, None, 1024, 1024),
    "flux": Preset("flux", 16, torch.bfloat16, 0.3611, 0.1159, 1024, 1024),
    "flux-packed": Preset("flux-packed", 16, torch.bfloat16, 0.3611, 0.1159, 1024, 1024, packed=True),
    "hunyuan-video": Preset("hunyuan-video", 16, torch.float16, 0.476986, None, 320, 512, frames=61),
}


@dataclass(frozen=True)
class Stage:
    """One stage of an open-loop schedule: the arrival rate goes linearly from
    ``start_rate`` to ``end_rate`` (per second) over ``duration`` seconds
    (``None``: forever, for ``--requests`` without ``--duration``)."""

    start_rate: float
    end_rate: float
    duration: float | None

    def __post_init__(self) -> None:
        for n in ("start_rate", "end_rate"):
            v = getattr(self, n)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"stage {n}={v!r} must be a rate >= 0 per second")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise InputError(f"stage duration={self.duration!r} must be > 0 seconds")
        if self.duration is None and self.start_rate != self.end_rate:
            raise InputError("an endless stage must hold a constant rate")

    def scaled(self, factor: float) -> Stage:
        """The same stage with its rates multiplied by ``factor`` (one of N workers)."""
        return Stage(self.start_rate * factor, self.end_rate * factor, self.duration)


@dataclass(frozen=True)
class FindMaxSpec:
    """``--find-max``: the highest arrival rate whose p99 stays under ``slo_p99_ms`` with
    an error rate under ``max_error_rate``. Steps of ``step_duration`` s (after
    ``step_warmup`` s) double the rate from ``start_rate`` until one fails, then bisect
    until the bracket is narrower than ``precision`` (relative) or ``max_steps`` ran.
    With ``confirm`` a failing step is run once more and fails only if it fails again
    (one stall on a busy machine shouldn't end the search; a real limit fails twice)."""

    slo_p99_ms: float
    max_error_rate: float = 0.01
    start_rate: float = 10.0
    step_duration: float = 3.0
    step_warmup: float = 0.5
    precision: float = 0.05
    max_steps: int = 24
    max_rate: float = 1e6
    confirm: bool = True

    def __post_init__(self) -> None:
        if not self.slo_p99_ms > 0:
            raise InputError(f"slo_p99_ms={self.slo_p99_ms!r} must be > 0")
        if not 0 <= self.max_error_rate < 1:
            raise InputError(f"max_error_rate={self.max_error_rate!r} must be in [0, 1)")
        if not (self.start_rate > 0 and self.step_duration > 0 and self.precision > 0):
            raise InputError("start_rate, step_duration and precision must be > 0")


@dataclass(frozen=True)
class LoadSpec:
    """Everything one load test needs (the CLI builds one from its flags).

    Request: ``op`` with ``preset``, ``resolution`` (``(height, width)`` in pixels),
    ``frames`` (video), ``batch``, ``output``; or ``latent`` (a tensor or a ``.pt`` /
    ``.safetensors`` path) which replaces the preset's random latents.

    Load (one of): ``rate`` (open loop, arrivals per second; ``stages`` for a ramp),
    ``concurrency`` (closed loop), ``find_max``. Length: ``duration`` seconds and/or
    ``requests``; ``warmup`` seconds (float) or requests (int) run first and are
    left out of every figure.

    Sending: ``workers`` processes (each with ``rate / workers``), ``max_inflight``
    (open-loop safety cap; sends over it wait and show up as late), ``timeout`` per
    attempt, ``retries`` (0: count what the endpoint really did), ``token`` (never
    reported), ``late_ms`` (a send later than this after its scheduled time is late).
    """

    url: str
    op: Op = "decode"
    preset: str = "sd"
    resolution: tuple[int, int] | None = None
    frames: int | None = None
    batch: int = 1
    output: str = "pt-uint8"
    latent: Any = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    # load model
    rate: float | None = None
    stages: tuple[Stage, ...] = ()
    concurrency: int | None = None
    find_max: FindMaxSpec | None = None
    arrival: Literal["uniform", "poisson"] = "uniform"
    seed: int = 0
    duration: float | None = None
    requests: int | None = None
    warmup: float | int = 0.0
    # sending
    workers: int = 1
    max_inflight: int = 10_000
    timeout: float = 60.0
    connect_timeout: float = 10.0
    retries: int = 0
    token: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    late_ms: float = 5.0
    drain_timeout: float | None = None
    interval: float = 1.0

    def __post_init__(self) -> None:
        if self.op not in ("decode", "encode"):
            raise InputError(f"op={self.op!r} must be 'decode' or 'encode'")
        if self.preset not in PRESETS:
            raise InputError(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        if self.output not in OUTPUTS:
            raise InputError(f"output={self.output!r}; use one of {', '.join(OUTPUTS)}")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise InputError(f"batch={self.batch!r} must be an int >= 1")
        if self.stages and self.rate is not None:
            raise InputError("pass --rate or --ramp, not both (a ramp stage RATE:DURATION holds a rate)")
        modes = sum(x is not None for x in (self.rate, self.concurrency, self.find_max)) + bool(self.stages)
        if modes > 1:
            raise InputError("choose one load model: rate/stages (open loop), concurrency (closed loop) or find_max")
        if modes == 0:
            raise InputError("no load given: pass --rate R (open loop), --ramp, --concurrency C or --find-max")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise InputError(f"rate={self.rate!r} must be > 0 requests per second")
        if self.concurrency is not None and not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise InputError(f"concurrency={self.concurrency!r} must be an int >= 1")
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"duration={self.duration!r} must be > 0 seconds")
        if self.requests is not None and not (isinstance(self.requests, int) and self.requests >= 1):
            raise InputError(f"requests={self.requests!r} must be an int >= 1")
        if self.find_max is None and not self.stages and self.duration is None and self.requests is None:
            raise InputError("say how long: pass --duration (e.g. 10s) and/or --requests N")
        if isinstance(self.warmup, bool) or self.warmup < 0:
            raise InputError(f"warmup={self.warmup!r} must be >= 0 (seconds as float, requests as int)")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise InputError(f"workers={self.workers!r} must be an int >= 1")
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise InputError(f"retries={self.retries!r} must be an int >= 0")
        if self.max_inflight < 1 or self.timeout <= 0 or self.late_ms < 0 or self.interval <= 0:
            raise InputError("max_inflight, timeout and interval must be > 0 and late_ms >= 0")
        if self.arrival not in ("uniform", "poisson"):
            raise InputError(f"arrival={self.arrival!r} must be 'uniform' or 'poisson'")

    # ---- derived
    @property
    def mode(self) -> str:
        """``open``, ``closed`` or ``find-max``."""
        if self.find_max is not None:
            return "find-max"
        return "closed" if self.concurrency is not None else "open"

    def replace(self, **changes: Any) -> LoadSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def schedule_stages(self) -> tuple[Stage, ...]:
        """The measured open-loop stages (without warmup)."""
        if self.stages:
            return self.stages
        assert self.rate is not None
        return (Stage(self.rate, self.rate, self.duration),)

    def redacted(self) -> dict[str, Any]:
        """The spec as JSON-able data with secrets removed (token, auth headers, URL userinfo)."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "token":
                d["token"] = "***" if v else None
            elif f.name == "headers":
                d["headers"] = {
                    k: ("***" if k.lower() in ("authorization", "cookie", "x-api-key") else val)
                    for k, val in v
                }
            elif f.name == "url":
                d["url"] = redact_url(v)
            elif f.name == "latent":
                d["latent"] = v if isinstance(v, (str, type(None))) else f"<tensor {list(v.shape)}>"
            elif f.name == "stages":
                d["stages"] = [dataclasses.asdict(s) for s in v]
            elif f.name == "find_max":
                d["find_max"] = dataclasses.asdict(v) if v is not None else None
            else:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def redact_url(url: str) -> str:
    """``url`` without user info or token-like query values."""
    from yarl import URL

    try:
        u = URL(url)
    except (ValueError, TypeError):
        return "<invalid url>"
    if u.user or u.password:
        u = u.with_user(None)
    if u.query:
        q = [(k, "***" if re.search(r"token|key|secret|auth|sig", k, re.I) else v) for k, v in u.query.items()]
        u = u.with_query(q)
    return str(u)


# --------------------------------------------------------------------------- parsing

_DUR = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|min|h)?\s*$")


def parse_duration(text: str) -> float:
    """``"10s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or a bare number of seconds → seconds."""
    m = _DUR.match(str(text))
    if not m:
        raise InputError(f"bad duration {text!r}; use e.g. 10s, 500ms, 2m")
    v = float(m.group(1))
    unit = m.group(2) or "s"
    return v * {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[unit]


def parse_warmup(text: str) -> float | int:
    """``--warmup``: a duration with a unit (``"2s"``) is seconds; a bare int (``"50"``)
    is a number of requests."""
    t = str(text).strip()
    if re.fullmatch(r"[0-9]+", t):
        return int(t)
    return parse_duration(t)


def parse_ramp(text: str) -> tuple[Stage, ...]:
    """``--ramp``: comma-separated stages. ``RATE:DURATION`` holds RATE per second for
    DURATION; ``FROM-TO:DURATION`` ramps linearly from FROM to TO per second.

    >>> parse_ramp("50:5s,100-200:10s")
    (Stage(start_rate=50.0, end_rate=50.0, duration=5.0), Stage(start_rate=100.0, end_rate=200.0, duration=10.0))
    """
    stages = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        rate, sep, dur = part.partition(":")
        if not sep:
            raise InputError(f"bad ramp stage {part!r}; use RATE:DURATION or FROM-TO:DURATION, e.g. 50:5s")
        lo, dash, hi = rate.partition("-")
        try:
            a = float(lo)
            b = float(hi) if dash else a
        except ValueError:
            raise InputError(f"bad rate in ramp stage {part!r}") from None
        stages.append(Stage(a, b, parse_duration(dur)))
    if not stages:
        raise InputError(f"empty --ramp {text!r}")
    return tuple(stages)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestPlan:
    """The request every send reuses and what a valid answer looks like.

    ``expect_shape`` is the tensor shape an answer must have (``None`` entries match
    any size; the whole is ``None`` for image/mp4 answers, checked by ``expect_magic``).
    """

    request: WireRequest
    expect_shape: tuple[int | None, ...] | None
    expect_magic: tuple[bytes, ...] = ()
    description: str = ""


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
    arr = torch.stack(chans, -1).numpy()
    return Image.fromarray(arr, "RGB")


def _decode_options(spec: LoadSpec, preset: Preset, h: int, w: int, packed: bool, video: bool) -> DecodeOptions:
    out = spec.output
    if out in ("jpg", "png") and video:
        raise InputError("video latents decode to tensors or mp4; use --output pt, pt-uint8 or mp4")
    if out == "mp4" and not video:
        raise InputError("--output mp4 needs video latents (e.g. --preset hunyuan-video)")
    scaling = spec.scaling_factor if spec.scaling_factor is not None else preset.scaling_factor
    shift = spec.shift_factor if spec.shift_factor is not None else preset.shift_factor
    kw: dict[str, Any] = {"scaling_factor": scaling, "shift_factor": shift}
    if packed:
        kw.update(height=h, width=w)
    if out == "pt":
        return DecodeOptions(output_type="pt", return_type="pt", **kw)
    if out == "pt-uint8":
        return DecodeOptions(output_type="pt", return_type="pt", partial_postprocess=True, **kw)
    if out == "mp4":
        return DecodeOptions(output_type="mp4", return_type="mp4", **kw)
    return DecodeOptions(output_type="pil", return_type="pil", image_format=out, **kw)


def build_request(spec: LoadSpec) -> RequestPlan:
    """Build the one request of a load test (raises :class:`InputError` for bad input)."""
    preset = PRESETS[spec.preset]
    b = spec.batch
    h, w = spec.resolution or (preset.height, preset.width)
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise InputError(f"resolution {h}x{w} must be positive multiples of 16 pixels")
    if spec.op == "encode":
        if preset.video:
            raise InputError("the protocol has no video encode; use an image preset with --op encode")
        if spec.output != "pt-uint8" and spec.output != "pt":
            raise InputError("--op encode answers latents; --output does not apply (leave it out)")
        img = _pattern_image(h, w, spec.seed)
        scaling = spec.scaling_factor if spec.scaling_factor is not None else preset.scaling_factor
        shift = spec.shift_factor if spec.shift_factor is not None else preset.shift_factor
        req = protocol.encode_request(img, scaling_factor=scaling, shift_factor=shift)
        return RequestPlan(req, (1, None, h // 8, w // 8), description=f"encode {w}x{h} PNG ({len(req.body)} B)")

    g = torch.Generator().manual_seed(spec.seed)
    video = preset.video
    packed = preset.packed
    if spec.latent is not None:
        lat = spec.latent if isinstance(spec.latent, torch.Tensor) else _load_latent(spec.latent)
        packed = lat.dim() == 3
        video = lat.dim() == 5
        if spec.resolution is None:
            if packed:
                raise InputError("a packed 3-D latent needs --resolution HxW (pixels)")
            h, w = lat.shape[-2] * 8, lat.shape[-1] * 8
        b = lat.shape[0]
        frames = protocol.frames_for_latent_frames(lat.shape[2]) if video else None
    else:
        frames = spec.frames or preset.frames
        if video:
            assert frames is not None
            if (frames - 1) % protocol.TEMPORAL_FACTOR:
                raise InputError(f"frames={frames} must be 4k+1 (e.g. 61)")
            shape: tuple[int, ...] = (b, preset.channels, (frames - 1) // 4 + 1, h // 8, w // 8)
        elif packed:
            shape = (b, (h // 16) * (w // 16), preset.channels * 4)
        else:
            shape = (b, preset.channels, h // 8, w // 8)
        lat = torch.randn(shape, generator=g).to(preset.dtype)
    opts = _decode_options(spec, preset, h, w, packed, video)
    req = protocol.decode_request(lat, opts)
    # what the answer must be
    magic: tuple[bytes, ...] = ()
    expect: tuple[int | None, ...] | None
    if spec.output == "pt":
        expect = (b, 3, frames, h, w) if video else (b, 3, h, w)
    elif spec.output == "pt-uint8":
        expect = (b * (frames or 1), h, w, 3) if video else (b, h, w, 3)
    else:
        expect = None
        magic = {"jpg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "mp4": ()}[spec.output]
    desc = f"decode {list(lat.shape)} {protocol.dtype_name(lat.dtype)} → {spec.output} ({req.nbytes} B)"
    return RequestPlan(req, expect, magic, desc)


def check_answer(plan: RequestPlan, shape: tuple[int, ...] | None, data: bytes | None) -> str | None:
    """Why an answer is invalid for ``plan``, or ``None`` when it is fine."""
    if plan.expect_shape is not None:
        if shape is None:
            return "expected a tensor answer"
        exp = plan.expect_shape
        if len(shape) != len(exp) or any(e is not None and e != s for e, s in zip(exp, shape, strict=False)):
            return f"answer shape {list(shape)} != expected {[e if e is not None else '*' for e in exp]}"
        return None
    if data is None:
        return "expected image/video bytes, got a tensor"
    if plan.expect_magic and not any(data.startswith(m) for m in plan.expect_magic):
        return f"answer bytes are not the expected format (starts {data[:8]!r})"
    if plan.request.expect == "bytes" and (len(data) < 12 or data[4:8] != b"ftyp"):
        return "answer is not an mp4 (no ftyp box)"
    return None
