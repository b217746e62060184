"""Settings of a dataset job, as small frozen dataclasses instead of long parameter lists.

- :class:`RunSettings`: how a job runs (client, pool, resume, failure policy, splits);
  shared by encode and decode.
- :class:`EncodeSettings` / :class:`DecodeSettings`: what a job produces; recorded in
  ``job.json`` and checked on resume.

The ``encode_dataset``/``decode_dataset`` functions also take every field as a keyword
(``resolution=512, concurrency=64, ...``) and build these for you.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import Retry, Timeout
from ..errors import InputError
from .formats import FORMATS
from .preprocess import (
    ALPHA_MODES,
    CROP_MODES,
    DEFAULT_MAX_PIXELS,
    RESAMPLE,
    WIRE_DTYPES,
    parse_resolution,
)

__all__ = ["IMAGE_FORMATS", "LATENT_DTYPES", "DecodeSettings", "EncodeSettings", "RunSettings", "split_kwargs"]

LATENT_DTYPES = ("float16", "bfloat16", "float32")
IMAGE_FORMATS = ("png", "jpg", "webdataset")


@dataclass(frozen=True)
class RunSettings:
    """How a job runs.

    Attributes:
        concurrency: requests in flight.
        workers: preprocessing workers (default: the CPUs this process may use).
        pool: ``"thread"`` (the Python API's default: works anywhere), ``"process"`` (every
            CPU, no GIL; a script must guard its top level with ``if __name__ ==
            "__main__":``) or ``"auto"`` (processes for runs of 256+ images: the CLI's
            default).
        writers: shards written at once; results wait when all are busy (backpressure).
        shard_index, num_shards: this machine takes the shards at positions
            ``p % num_shards == shard_index``.
        overwrite: redo everything and remove the files of shards no longer planned.
        retry_failed: also resend items that failed as bad input.
        allow_endpoint_change: resume against another endpoint than ``job.json`` names.
        skip_bad_inputs: go on when listing met problems (unreadable folders, corrupt
            tars); they are listed in the failures file.
        max_failure_rate: abort when more than this share of recent items fail at the
            endpoint (``1`` turns it off).
        quiet: no progress bar and no notices.
        retry, timeout, token: for the client the job makes.
    """

    concurrency: int = 32
    workers: int | None = None
    pool: str = "thread"
    writers: int = 2
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    retry_failed: bool = False
    allow_endpoint_change: bool = False
    skip_bad_inputs: bool = False
    max_failure_rate: float = 0.5
    quiet: bool = False
    retry: Retry | None = None
    timeout: Timeout | None = None
    token: str | bool | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise InputError(f"concurrency {self.concurrency} must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers {self.workers} must be >= 1")
        if self.writers < 1:
            raise InputError(f"writers {self.writers} must be >= 1")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise InputError(f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        if not 0.0 < self.max_failure_rate <= 1.0:
            raise InputError(f"--max-failure-rate {self.max_failure_rate} must be in (0, 1]")
        if self.pool not in ("auto", "process", "thread"):
            raise InputError(f"pool={self.pool!r} must be auto, process or thread")


@dataclass(frozen=True)
class EncodeSettings:
    """What an encode job produces (recorded in ``job.json``; a resume must match).

    Attributes:
        resolution: ``(width, height)``, multiples of 8 (``512`` or ``"768x512"`` accepted).
        crop: ``"center"`` or ``"none"``; alpha: ``"white"``, ``"black"`` or ``"drop"``.
        scaling_factor, shift_factor: sent to the endpoint, which stores ``(z - shift) * scale``.
        dtype: stored latent dtype; wire_dtype: how pixels are sent.
        shard_size: items per loose shard (a WebDataset input tar is one shard of its own).
        format: ``"safetensors"``, ``"webdataset"`` or ``"parquet"`` (🤗 datasets-loadable).
        max_pixels: largest source image, checked from its header before decoding.
        resample: ``"lanczos"`` (default), ``"bicubic"`` or ``"bilinear"`` (fastest).
    """

    resolution: tuple[int, int] = (512, 512)
    crop: str = "center"
    alpha: str = "white"
    scaling_factor: float | None = None
    shift_factor: float | None = None
    dtype: str = "float16"
    wire_dtype: str = "float16"
    shard_size: int = 1000
    format: str = "safetensors"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    resample: str = "lanczos"

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        if self.resample not in RESAMPLE:
            raise InputError(f"resample={self.resample!r} must be one of {', '.join(RESAMPLE)}")
        for name, value, allowed in (
            ("crop", self.crop, CROP_MODES), ("alpha", self.alpha, ALPHA_MODES),
            ("dtype", self.dtype, LATENT_DTYPES), ("wire_dtype", self.wire_dtype, WIRE_DTYPES),
            ("format", self.format, FORMATS),
        ):
            if value not in allowed:
                raise InputError(f"{name}={value!r} must be one of {', '.join(allowed)}")
        if self.shard_size < 1:
            raise InputError(f"shard size {self.shard_size} must be >= 1")
        if self.max_pixels is not None and self.max_pixels < 64:
            raise InputError(f"max_pixels {self.max_pixels} must be >= 64")
        if self.format == "parquet" and self.dtype == "bfloat16":
            raise InputError("--format parquet cannot hold bfloat16 latents; use --dtype float16 or float32")

    def record(self) -> dict[str, Any]:
        """The JSON form kept in ``job.json``."""
        d = dataclasses.asdict(self)
        d["resolution"] = f"{self.resolution[0]}x{self.resolution[1]}"
        return d


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode job produces.

    Attributes:
        format: ``"png"``, ``"jpg"`` (``OUT/<key>.<ext>``) or ``"webdataset"`` (one tar of
            ``<key>.png`` per input file).
        scaling_factor, shift_factor: override the scaling recorded in the shards (a shift
            alone is undone too).
        jpeg_quality: for ``format="jpg"``.
    """

    format: str = "png"
    scaling_factor: float | None = None
    shift_factor: float | None = None
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.format not in IMAGE_FORMATS:
            raise InputError(f"format={self.format!r} must be one of {', '.join(IMAGE_FORMATS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"jpeg quality {self.jpeg_quality} must be in [1, 100]")

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_kwargs(kwargs: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Sort keyword arguments into one dict per settings class; an unknown one is an
    :class:`InputError` naming the accepted ones."""
    out: list[dict[str, Any]] = [{} for _ in classes]
    fields = [{f.name for f in dataclasses.fields(c)} for c in classes]
    for k, v in kwargs.items():
        for i, names in enumerate(fields):
            if k in names:
                out[i][k] = v
                break
        else:
            known = sorted(set().union(*fields))
            raise InputError(f"unknown job option {k!r}; known: {', '.join(known)}")
    return out
