"""What a load test sends and how: :class:`LoadSpec`, :class:`MixEntry` (one kind of
request), ramp :class:`Stage` s, :class:`FindMaxSpec`, and the parsers of the CLI's
values (durations, ramps, warm-ups, start times, mix files).

Pure: no sockets, no event loop. Requests are built from a spec in
:mod:`asyncvae.loadtest.requests`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from .._resolution import Resolution, parse_resolution
from ..config import Retry
from ..errors import InputError

__all__ = [
    "OUTPUTS",
    "PRESETS",
    "FindMaxSpec",
    "LoadSpec",
    "MixEntry",
    "Preset",
    "Stage",
    "Warmup",
    "load_mix",
    "parse_duration",
    "parse_ramp",
    "parse_start_at",
    "parse_warmup",
]

Op = Literal["decode", "encode"]
#: ``--output`` values and what they mean on the wire.
OUTPUTS = ("pt", "pt-uint8", "jpg", "png", "mp4")
#: Resolutions must be multiples of this many pixels (packed Flux latents need 16).
RESOLUTION_MULTIPLE = 16


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

    def rate_at(self, t: float) -> float:
        """The arrival rate ``t`` seconds into the stage."""
        if self.duration is None:
            return self.start_rate
        return self.start_rate + (self.end_rate - self.start_rate) * min(max(t / self.duration, 0.0), 1.0)

    def cut(self, t: float) -> Stage:
        """The first ``t`` seconds of this stage (``t`` within it)."""
        return Stage(self.start_rate, self.rate_at(t), t)


@dataclass(frozen=True)
class FindMaxSpec:
    """``--find-max``: the highest arrival rate whose p99 stays under ``slo_p99_ms``
    with an error rate under ``max_error_rate``.

    Steps double the rate from ``start_rate`` until one fails, then bisect until the
    bracket is narrower than ``precision`` (relative) or ``max_steps`` ran. A step
    lasts ``step_duration`` s, longer where needed for ``min_samples`` answers or
    ``step_slos`` times the SLO (so a 10 % overload builds a visible queue), after
    ``step_warmup`` s. With ``confirm`` every step is run twice, passing and failing
    alike, and a third time when the two disagree (majority verdict). A step whose
    generator fell behind its schedule, or whose own in-flight/fd cap held it back,
    ends the search as *client-bound*. The found rate is run once more for
    ``final_duration`` s (default 3 steps) and reported only when it passes again
    (otherwise the search steps down by ``precision``, up to 3 times).
    """

    slo_p99_ms: float
    max_error_rate: float = 0.01
    start_rate: float = 10.0
    step_duration: float = 3.0
    step_warmup: float = 0.5
    precision: float = 0.05
    max_steps: int = 40
    max_rate: float = 1e6
    confirm: bool = True
    min_samples: int = 100
    step_slos: float = 3.0
    #: a passing step's ok answers per second while its schedule ran, as a share of its rate
    min_sustained: float = 0.95
    final_duration: float | None = None

    def __post_init__(self) -> None:
        if not self.slo_p99_ms > 0:
            raise InputError(f"slo_p99_ms={self.slo_p99_ms!r} must be > 0")
        if not 0 <= self.max_error_rate < 1:
            raise InputError(f"max_error_rate={self.max_error_rate!r} must be in [0, 1)")
        if not (self.start_rate > 0 and self.step_duration > 0 and self.precision > 0):
            raise InputError("start_rate, step_duration and precision must be > 0")
        if not (isinstance(self.min_samples, int) and self.min_samples >= 1):
            raise InputError(f"min_samples={self.min_samples!r} must be an int >= 1")
        if not 0 < self.min_sustained <= 1:
            raise InputError(f"min_sustained={self.min_sustained!r} must be in (0, 1]")
        if self.final_duration is not None and not self.final_duration > 0:
            raise InputError(f"final_duration={self.final_duration!r} must be > 0 seconds")

    def step_length(self, rate: float) -> float:
        """Measured seconds of a step at ``rate``: enough time for ``min_samples``
        answers and for ``step_slos`` SLOs."""
        return max(self.step_duration, self.min_samples / rate, self.step_slos * self.slo_p99_ms / 1000)


def _check_choice(name: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise InputError(f"{name}={value!r}; use one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class MixEntry:
    """One kind of request of a run (``--mix`` lists several, with weights).

    ``resolution`` is ``(width, height)`` in pixels, ``"WxH"`` or one number for a
    square (default: the preset's). ``latent`` (a tensor or a ``.pt`` /
    ``.safetensors`` path) replaces the preset's random latents. ``name`` labels
    the entry in the report (default: a description).
    """

    weight: float = 1.0
    name: str = ""
    op: Op = "decode"
    preset: str = "sd"
    resolution: Any = None
    frames: int | None = None
    batch: int = 1
    output: str = "pt-uint8"
    latent: Any = None
    scaling_factor: float | None = None
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise InputError(f"mix weight={self.weight!r} must be a number > 0")
        _check_choice("op", self.op, ("decode", "encode"))
        _check_choice("preset", self.preset, PRESETS)
        _check_choice("output", self.output, OUTPUTS)
        if not (isinstance(self.batch, int) and not isinstance(self.batch, bool) and self.batch >= 1):
            raise InputError(f"batch={self.batch!r} must be an int >= 1")
        if self.frames is not None and not (isinstance(self.frames, int) and self.frames >= 1):
            raise InputError(f"frames={self.frames!r} must be an int >= 1 (4k+1, e.g. 61)")
        if self.resolution is not None and not isinstance(self.resolution, Resolution):
            object.__setattr__(self, "resolution", parse_resolution(self.resolution, multiple=RESOLUTION_MULTIPLE))

    @property
    def label(self) -> str:
        """``name``, or a short description: ``sd pt-uint8 512x512``."""
        if self.name:
            return self.name
        p = PRESETS[self.preset]
        res = self.resolution or Resolution(p.width, p.height)
        parts = [self.preset, "encode" if self.op == "encode" else self.output, str(res)]
        if self.batch != 1:
            parts.append(f"b{self.batch}")
        if self.frames:
            parts.append(f"f{self.frames}")
        if self.latent is not None:
            parts.append("latent" if not isinstance(self.latent, str) else Path(self.latent).name)
        return " ".join(parts)

    def redacted(self) -> dict[str, Any]:
        d = dataclasses.asdict(self) if not isinstance(self.latent, torch.Tensor) else {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)
        }
        if self.resolution is not None:
            d["resolution"] = str(self.resolution)
        if self.latent is not None and not isinstance(self.latent, str):
            d["latent"] = f"<tensor {list(self.latent.shape)}>"
        d["label"] = self.label
        return d


_REQUEST_FIELDS = ("op", "preset", "resolution", "frames", "batch", "output", "latent",
                   "scaling_factor", "shift_factor")


@dataclass(frozen=True)
class LoadSpec:
    """Everything one load test needs (the CLI builds one from its flags).

    Request: ``op`` with ``preset``, ``resolution`` (``(width, height)``, ``"WxH"``
    or one number; pixels), ``frames`` (video), ``batch``, ``output``; or ``latent``
    (a tensor or a ``.pt`` / ``.safetensors`` path). ``mix`` (a tuple of
    :class:`MixEntry`) replaces them with several weighted kinds of request.

    Load (one of): ``rate`` (open loop, arrivals per second; ``stages`` for a ramp),
    ``concurrency`` (closed loop), ``find_max``. Length: ``duration`` seconds and/or
    ``requests``. Warm-up, left out of every figure: ``warmup`` seconds or
    ``warmup_requests`` requests (an open-loop warm-up replays the start of the
    schedule, so a ramp from 0 warms up from 0). ``start_at``: wall-clock time (Unix
    seconds) at which the schedule starts, so runs on several machines line up.

    Sending: ``workers`` processes (each with ``rate / workers``), ``max_inflight``
    (open-loop cap per worker; also capped by the process's file-descriptor limit;
    sends over it wait, are counted as ``capped`` and measured from their schedule),
    ``timeout`` per attempt, ``retry`` (an :class:`asyncvae.Retry`, the client's
    policy object) or its shorthand ``retries`` (``Retry(attempts=retries + 1)``;
    0, the default, counts what the endpoint really did), ``token`` (never
    reported), ``late_ms`` (a send later than this after its schedule is late),
    ``interval`` (seconds per timeline interval).
    """

    url: str
    op: Op = "decode"
    preset: str = "sd"
    resolution: Any = None
    frames: int | None = None
    batch: int = 1
    output: str = "pt-uint8"
    latent: Any = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    mix: tuple[MixEntry, ...] = ()
    # load model
    rate: float | None = None
    stages: tuple[Stage, ...] = ()
    concurrency: int | None = None
    find_max: FindMaxSpec | None = None
    arrival: Literal["uniform", "poisson"] = "uniform"
    seed: int = 0
    duration: float | None = None
    requests: int | None = None
    warmup: float = 0.0
    warmup_requests: int = 0
    start_at: float | None = None
    # sending
    workers: int = 1
    max_inflight: int = 10_000
    timeout: float = 60.0
    connect_timeout: float = 10.0
    retries: int = 0
    retry: Retry | None = None
    token: str | None = field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    late_ms: float = 5.0
    drain_timeout: float | None = None
    interval: float = 1.0

    def __post_init__(self) -> None:
        if self.resolution is not None and not isinstance(self.resolution, Resolution):
            object.__setattr__(self, "resolution", parse_resolution(self.resolution, multiple=RESOLUTION_MULTIPLE))
        if self.mix and any(getattr(self, n) != f.default for n, f in _request_defaults().items()):
            raise InputError("pass either --mix or the request flags (--preset, --output, ...), not both")
        self.request_entries()  # validates the request fields
        self._check_load()
        self._check_length()
        self._check_sending()

    def _check_load(self) -> None:
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
        _check_choice("arrival", self.arrival, ("uniform", "poisson"))

    def _check_length(self) -> None:
        if self.duration is not None and not self.duration > 0:
            raise InputError(f"duration={self.duration!r} must be > 0 seconds")
        if self.requests is not None and not (isinstance(self.requests, int) and self.requests >= 1):
            raise InputError(f"requests={self.requests!r} must be an int >= 1")
        if self.find_max is None and not self.stages and self.duration is None and self.requests is None:
            raise InputError("say how long: pass --duration (e.g. 10s) and/or --requests N")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float)) or self.warmup < 0:
            raise InputError(f"warmup={self.warmup!r} must be seconds >= 0 (for a request count use warmup_requests)")
        if not (isinstance(self.warmup_requests, int) and not isinstance(self.warmup_requests, bool)
                and self.warmup_requests >= 0):
            raise InputError(f"warmup_requests={self.warmup_requests!r} must be an int >= 0")
        if self.warmup and self.warmup_requests:
            raise InputError("pass a warm-up in seconds or in requests, not both")
        if self.start_at is not None and not (isinstance(self.start_at, (int, float)) and self.start_at > 0):
            raise InputError(f"start_at={self.start_at!r} must be a Unix time in seconds")

    def _check_sending(self) -> None:
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise InputError(f"workers={self.workers!r} must be an int >= 1")
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise InputError(f"retries={self.retries!r} must be an int >= 0")
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise InputError(f"retry={self.retry!r} must be an asyncvae.Retry")
        if self.retry is not None and self.retries:
            raise InputError("pass retry=Retry(...) or retries=N, not both")
        if self.max_inflight < 1 or self.timeout <= 0 or self.late_ms < 0 or self.interval <= 0:
            raise InputError("max_inflight, timeout and interval must be > 0 and late_ms >= 0")

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

    def request_entries(self) -> tuple[MixEntry, ...]:
        """The kinds of request sent: ``mix``, or one entry from the request fields."""
        if self.mix:
            return self.mix
        return (MixEntry(**{n: getattr(self, n) for n in _REQUEST_FIELDS}),)

    def retry_policy(self) -> Retry | None:
        """The retry policy: ``retry``, ``Retry(attempts=retries + 1)``, or ``None``."""
        if self.retry is not None:
            return self.retry
        return Retry(attempts=self.retries + 1) if self.retries else None

    def schedule_stages(self) -> tuple[Stage, ...]:
        """The measured open-loop stages (without warm-up and before ``duration`` cuts them)."""
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
                d["headers"] = {k: ("***" if k.lower() in ("authorization", "cookie", "x-api-key") else val)
                                for k, val in v}
            elif f.name == "url":
                d["url"] = redact_url(v)
            elif f.name == "latent":
                d["latent"] = v if isinstance(v, (str, type(None))) else f"<tensor {list(v.shape)}>"
            elif f.name == "resolution":
                d["resolution"] = str(v) if v is not None else None
            elif f.name == "mix":
                d["mix"] = [m.redacted() for m in v]
            elif f.name in ("stages",):
                d["stages"] = [dataclasses.asdict(s) for s in v]
            elif f.name in ("find_max", "retry"):
                d[f.name] = _jsonable(dataclasses.asdict(v)) if v is not None else None
            else:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in d.items()}


def _request_defaults() -> dict[str, dataclasses.Field[Any]]:
    fields = {f.name: f for f in dataclasses.fields(LoadSpec)}
    return {n: fields[n] for n in _REQUEST_FIELDS}


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


class Warmup(NamedTuple):
    """A parsed ``--warmup``: seconds or requests (the other is 0)."""

    seconds: float = 0.0
    requests: int = 0


def parse_warmup(text: str) -> Warmup:
    """``--warmup``: a duration with its unit (``"2s"``, ``"500ms"``) or a request count
    with ``req`` (``"50req"``). A bare number is refused: ``2`` and ``2.0`` must not
    mean different things."""
    t = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]+)\s*(req|reqs|request|requests|r)", t)
    if m:
        return Warmup(requests=int(m.group(1)))
    if re.fullmatch(r"[0-9]*\.?[0-9]+", t):
        raise InputError(f"--warmup {text} is ambiguous: write {t}s for seconds or {t}req for requests")
    return Warmup(seconds=parse_duration(t))


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


def parse_start_at(text: str, *, now: float | None = None) -> float:
    """``--start-at``: when the schedule starts, as Unix seconds. Accepts an ISO 8601
    time (``2025-06-01T12:00:00Z``; without a zone: local time), a clock time today
    (``14:30`` or ``14:30:15``, local), Unix seconds (``1748779200``), or ``+DUR``
    from now (``+30s``). Raises :class:`InputError` for a time in the past."""
    now = time.time() if now is None else now
    t = str(text).strip()
    if t.startswith("+"):
        return now + parse_duration(t[1:])
    if re.fullmatch(r"[0-9]{9,}(\.[0-9]+)?", t):
        at = float(t)
    elif re.fullmatch(r"[0-9]{1,2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?", t):
        hh, mm, *ss = t.split(":")
        if int(hh) > 23 or int(mm) > 59 or (ss and float(ss[0]) >= 60):
            raise InputError(f"bad --start-at {text!r}: not a clock time")
        today = _dt.datetime.fromtimestamp(now).date()
        at = _dt.datetime.combine(today, _dt.time(int(hh), int(mm))).timestamp() + (float(ss[0]) if ss else 0.0)
    else:
        try:
            when = _dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            raise InputError(
                f"bad --start-at {text!r}; use an ISO time (2025-06-01T12:00:00Z), a clock time (14:30:00), "
                "Unix seconds or +DURATION (+30s)"
            ) from None
        at = when.timestamp()
    if at < now - 1.0:
        raise InputError(f"--start-at {text!r} is {now - at:.0f} s in the past; give a time ahead of every machine's start")
    return at


# --------------------------------------------------------------------------- mix files

_MIX_KEYS = {f.name for f in dataclasses.fields(MixEntry)}


def load_mix(path: str | Path) -> tuple[MixEntry, ...]:
    """Read a ``--mix`` file: TOML (``[[request]]`` tables) or JSON (a list of objects,
    or ``{"request": [...]}``), each with ``weight`` and request fields (``preset``,
    ``output``, ``resolution``, ``batch``, ``frames``, ``op``, ``latent``,
    ``scaling_factor``, ``shift_factor``, ``name``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"mix file {str(p)!r} does not exist")
    try:
        raw: Any = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"mix file {p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    items = raw.get("request") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise InputError(f"mix file {p}: expected a list of requests ([[request]] tables in TOML, a JSON list)")
    entries = []
    for k, item in enumerate(items, 1):
        unknown = set(item) - _MIX_KEYS
        if unknown:
            raise InputError(f"mix file {p}, request {k}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"use {', '.join(sorted(_MIX_KEYS))}")
        try:
            entries.append(MixEntry(**item))
        except InputError as e:
            raise InputError(f"mix file {p}, request {k}: {e}") from None
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise InputError(f"mix file {p}: two requests have the same label; give them distinct 'name's")
    return tuple(entries)
