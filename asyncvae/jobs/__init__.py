"""Dataset jobs: images → latent shards and back (``asyncvae encode`` / ``asyncvae decode``).

::

    from asyncvae.jobs import encode_dataset, decode_dataset

    summary = encode_dataset("images/", "latents/", endpoint="https://…", resolution=512,
                             scaling_factor=0.18215)
    print(summary.line())
    decode_dataset("latents/", "recon/", endpoint="https://…", format="png")

An endpoint is required (``endpoint="builtin"`` runs the built-in demo model). The
``*_async`` variants are the same jobs as coroutines (pass ``client=`` to share a
:class:`~asyncvae.Client`); settings can be given as :class:`EncodeSettings` /
:class:`DecodeSettings` / :class:`RunSettings` or as keywords. Layout, resume and
failure classes: :mod:`asyncvae.jobs.encode`, ``docs/jobs.md``.
"""

from .accounting import JobSummary
from .decode import decode_dataset, decode_dataset_async
from .demo import make_demo_images
from .encode import encode_dataset, encode_dataset_async
from .endpoint import JobAborted
from .formats import read_safetensors
from .preprocess import Prepared, load_image, parse_resolution, prepare, to_wire_tensor
from .settings import DecodeSettings, EncodeSettings, RunSettings
from .sources import Item, list_inputs, scan_inputs, select_shards

__all__ = [
    "DecodeSettings",
    "EncodeSettings",
    "Item",
    "JobAborted",
    "JobSummary",
    "Prepared",
    "RunSettings",
    "decode_dataset",
    "decode_dataset_async",
    "encode_dataset",
    "encode_dataset_async",
    "list_inputs",
    "load_image",
    "make_demo_images",
    "parse_resolution",
    "prepare",
    "read_safetensors",
    "scan_inputs",
    "select_shards",
    "to_wire_tensor",
]
