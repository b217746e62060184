"""What the reference server is told: :class:`ServerConfig` and the injectable
:class:`Faults` (frozen value objects; the CLI builds them from flags).

Every default lives here once; ``asyncvae serve --help`` shows the same values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

__all__ = ["FAULT_KINDS", "TOKEN_ENV", "Faults", "ServerConfig"]

#: Names of the injectable faults, as counted in ``/stats["faults"]``.
FAULT_KINDS = (
    "fault_503",
    "fault_429",
    "fault_502_html",
    "fault_stall",
    "fault_reset",
    "fault_truncate",
    "fault_bad_headers",
)

#: Environment variable read for the bearer token when ``--token`` is not given.
TOKEN_ENV = "ASYNCVAE_SERVE_TOKEN"

#: ``--device`` values besides ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda", "mps")
#: ``--dtype`` spellings → canonical names.
DTYPE_ALIASES = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


@dataclass(frozen=True)
class Faults:
    """Per-request probabilities of injected faults (all off by default).

    Faults are drawn after the request body was read, from the server's seeded RNG,
    one draw per configured kind per request, and take effect in this precedence:
    503 / 429 / 502-HTML answer at once; a stall sleeps ``stall_seconds`` (without
    holding a replica) and then answers normally; reset / truncate / bad headers
    spoil the successful answer.
    """

    #: 503 ``{"error": "503 Service Unavailable"}`` (a replica starting).
    fault_503: float = 0.0
    #: 429 with ``Retry-After: retry_after`` and a JSON error.
    fault_429: float = 0.0
    #: Seconds in the ``Retry-After`` header of a 429.
    retry_after: float = 1.0
    #: Send headers and part of the body, then abort the connection.
    fault_reset: float = 0.0
    #: Declare the full Content-Length, send about half the body, then close.
    fault_truncate: float = 0.0
    #: Sleep ``stall_seconds`` before answering (exceed a client's read timeout).
    fault_stall: float = 0.0
    stall_seconds: float = 0.0
    #: Tensor answers with a wrong shape, a missing dtype or a non-JSON shape header.
    fault_bad_headers: float = 0.0
    #: 502 with an HTML body (``text/html``), like a gateway.
    fault_502_html: float = 0.0
    #: Send 200 bodies with chunked transfer encoding instead of Content-Length.
    chunked: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("fault_") and not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"{f.name}={v!r} must be a probability in [0, 1]")
        if self.retry_after < 0 or self.stall_seconds < 0:
            raise ValueError("retry_after and stall_seconds must be >= 0")

    @property
    def any(self) -> bool:
        """True when any fault (or chunked answers) is configured."""
        return self != Faults()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        """Build from a JSON-like dict; unknown keys raise :class:`InputError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(f"unknown fault settings {sorted(unknown)}; known: {sorted(names)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise InputError(str(e)) from None


@dataclass(frozen=True)
class ServerConfig:
    """Configuration of the reference server (one field per ``asyncvae serve`` flag)."""

    host: str = "127.0.0.1"
    #: 0 picks a free ephemeral port.
    port: int = 0
    #: Replica slots: batches computed at once; each slot runs one batch at a time.
    replicas: int = 1
    #: Service time a batch holds its slot for at least: ``delay_ms + items * delay_per_item_ms``
    #: (the compute runs inside that time; a slower compute holds the slot longer).
    delay_ms: float = 0.0
    delay_per_item_ms: float = 0.0
    #: Compute once per request signature and replay the stored answer (benchmarks).
    cache: bool = False
    faults: Faults = field(default_factory=Faults)
    #: Largest request body accepted (413 above it).
    max_body_bytes: int = 512 * 1024 * 1024
    #: Largest number of output pixels (B x F x H x W for decode, B x H x W for encode).
    max_output_pixels: int = 1 << 26
    #: Seed of the fault RNG.
    seed: int = 0
    #: Channels of the built-in model's latents.
    latent_channels: int = 4
    #: ``"builtin"``, a local diffusers VAE folder or a pipeline root holding ``vae/``
    #: (used when no model object is passed; loaded in the background after binding).
    model: str = "builtin"
    #: Where and in what precision a diffusers model runs (``auto``: cuda, else mps, else cpu;
    #: dtype ``auto``: bfloat16 on CUDA with bf16 support, float16 on mps, else float32).
    device: str = "auto"
    dtype: str = "auto"
    #: diffusers ``enable_tiling()`` / ``enable_slicing()`` (large frames / large batches).
    tiling: bool = False
    slicing: bool = False
    #: Dynamic batching: items (leading dimensions summed) run as one forward pass at most;
    #: 1 turns batching off.
    max_batch: int = 1
    #: How long the first request of a partial batch waits for company, in ms.
    batch_wait_ms: float = 2.0
    #: Requests admitted but not yet computing (including those still sending their
    #: body); beyond it new requests get 429 with ``Retry-After`` before their body is read.
    #: 0 = unbounded.
    max_queue: int = 512
    #: ``Retry-After`` seconds of the server's own 429/503 (queue full, model loading, draining).
    busy_retry_after: float = 1.0
    #: Bearer token every route but ``/health`` and ``/ready`` requires (None: open).
    token: str | None = field(default=None, repr=False)
    #: Admin routes (``POST /faults``, ``POST /stats/reset``): True, False, or None =
    #: on exactly when faults are configured.
    admin: bool | None = None
    #: Seconds a graceful shutdown (SIGTERM) waits for requests in flight.
    drain_timeout: float = 30.0
    #: Seconds a plain close (``LocalServer.stop()``, or after a drain) waits for handlers
    #: before cancelling them.
    shutdown_timeout: float = 1.0
    #: Log one line per request (``asyncvae.access`` logger) when True.
    access_log: bool = False
    #: Bind with SO_REUSEPORT so several processes share the port (one per GPU).
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.delay_ms < 0 or self.delay_per_item_ms < 0:
            raise ValueError("delay_ms and delay_per_item_ms must be >= 0")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (1 = no batching), got {self.max_batch}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 (0 = unbounded), got {self.max_queue}")
        if self.busy_retry_after < 0 or self.drain_timeout < 0 or self.shutdown_timeout < 0:
            raise ValueError("busy_retry_after, drain_timeout and shutdown_timeout must be >= 0")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty; leave it unset for an open server")
        check_device(self.device)
        if self.dtype not in DTYPE_ALIASES:
            raise ValueError(
                f"dtype={self.dtype!r} is not one of {', '.join(sorted(DTYPE_ALIASES))}"
            )

    @property
    def admin_enabled(self) -> bool:
        """Whether the admin routes answer: ``admin`` when set, else "faults configured"."""
        return self.faults.any if self.admin is None else self.admin

    @classmethod
    def token_from_env(cls) -> str | None:
        """The token in ``$ASYNCVAE_SERVE_TOKEN`` (None when unset or empty)."""
        return os.environ.get(TOKEN_ENV) or None


def check_device(device: str) -> None:
    """Raise :class:`ValueError` unless ``device`` is auto, cpu, cuda, cuda:N or mps."""
    if device in DEVICES:
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ValueError(f"device={device!r} must be auto, cpu, cuda, cuda:N or mps")
