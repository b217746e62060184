"""Scenario definitions shared by the orchestrator (``run.py``) and the workers
(``contenders.py``): latent shapes, decode options, the server each scenario runs
against, and the ``Limits`` that the "tuned" asyncvae contender uses there.

Everything here is plain data so the worker process can import it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name of the latents
    out_shape: tuple[int, ...]  # uint8 answer (partial_postprocess=True)
    scaling_factor: float
    server_args: tuple[str, ...] = ("--cache",)
    #: request cap per cell (quick, full); each cell also stops at its time budget
    max_requests: tuple[int, int] = (2000, 20000)
    #: seconds per cell (quick, full)
    seconds: tuple[float, float] = (1.5, 5.0)
    #: every item a distinct latent (results depend on content: S7 verification)
    distinct: bool = False
    #: Limits(...) kwargs of the "tuned" asyncvae contender
    tuned: dict[str, Any] = field(default_factory=dict)
    #: a throughput the scenario's server allows at most (req/s), if bounded
    ceiling_rps: float | None = None

    @property
    def in_nbytes(self) -> int:
        return math.prod(self.shape) * (4 if self.dtype == "float32" else 2)

    @property
    def out_nbytes(self) -> int:
        return math.prod(self.out_shape)

    def decode_options(self) -> dict[str, Any]:
        """The ``remote_decode`` keywords every contender uses (uint8 tensor answers)."""
        return {
            "output_type": "pt",
            "partial_postprocess": True,
            "return_type": "pt",
            "scaling_factor": self.scaling_factor,
        }


_FAST = ("--cache", "--replicas", "8")
_S5 = ("--cache", "--delay-ms", "25", "--replicas", "8")

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "S1", "tiny [1,4,8,8] fp16 -> uint8 64x64", (1, 4, 8, 8), "float16", (1, 64, 64, 3), 0.18215,
            server_args=_FAST, max_requests=(3000, 30000),
            tuned={"max_concurrency": 16, "max_queued": 32},
        ),
        Scenario(
            "S2", "SD 512 [1,4,64,64] -> uint8 512^2", (1, 4, 64, 64), "float16", (1, 512, 512, 3), 0.18215,
            server_args=_FAST, max_requests=(2000, 20000),
            tuned={"max_concurrency": 8, "max_queued": 16},
        ),
        Scenario(
            "S3", "SDXL 1024 [1,4,128,128] -> uint8 1024^2 (3 MiB)", (1, 4, 128, 128), "float16",
            (1, 1024, 1024, 3), 0.13025, server_args=_FAST, max_requests=(600, 6000),
            tuned={"max_concurrency": 4, "max_queued": 8},
        ),
        Scenario(
            "S4", "video [1,16,13,60,104] bf16 -> uint8 49x480x832x3 (56 MiB)", (1, 16, 13, 60, 104),
            "bfloat16", (49, 480, 832, 3), 0.476986, server_args=_FAST, max_requests=(40, 300),
            seconds=(2.0, 6.0),
            tuned={"max_concurrency": 4, "max_queued": 4, "max_inflight_bytes": 256 * MiB},
        ),
        Scenario(
            "S5", "S1 latents, server --delay-ms 25 --replicas 8 (ceiling 320 req/s)", (1, 4, 8, 8),
            "float16", (1, 64, 64, 3), 0.18215, server_args=_S5, max_requests=(1000, 3000),
            seconds=(2.0, 5.0), tuned={"max_concurrency": 32, "max_queued": 64}, ceiling_rps=320.0,
        ),
        Scenario(
            "S6", "S5 + 2% 503s + 1% connection resets", (1, 4, 8, 8), "float16", (1, 64, 64, 3), 0.18215,
            server_args=(*_S5, "--fault-503", "0.02", "--fault-reset", "0.01", "--seed", "7"),
            max_requests=(1000, 3000), seconds=(2.0, 5.0),
            tuned={"max_concurrency": 32, "max_queued": 64}, ceiling_rps=320.0,
        ),
        Scenario(
            # no --cache: every latent differs, so results really depend on the batch split
            "S7", "coalescing: distinct S1 latents, --delay-ms 10.6 --delay-per-item-ms 13.9 --replicas 8",
            (1, 4, 8, 8), "float16", (1, 64, 64, 3), 0.18215,
            server_args=("--delay-ms", "10.6", "--delay-per-item-ms", "13.9", "--replicas", "8"),
            max_requests=(600, 3000), seconds=(2.0, 5.0), distinct=True,
            tuned={"max_concurrency": 16, "max_queued": 128, "max_batch": 8, "max_batch_wait": 0.005},
        ),
    ]
}

#: S7's sides: every Limits field at its default except coalescing (a user turns it on and
#: nothing else), through ``decode_many`` and through 64 concurrent ``decode()`` callers.
S7_SIDES: dict[str, dict[str, Any]] = {
    "asyncvae_many_b1": {},
    "asyncvae_many_b8": {"max_batch": 8},
    "asyncvae_calls_b1": {},
    "asyncvae_calls_b8": {"max_batch": 8},
}
#: Concurrent ``decode()`` callers of the ``asyncvae_calls_*`` contenders.
S7_CALLERS = 64
