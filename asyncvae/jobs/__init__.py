"""Dataset jobs: images → latent shards and back (``asyncvae encode`` / ``asyncvae decode``).

::

    from asyncvae.jobs import encode_dataset, decode_dataset

    summary = encode_dataset("images/", "latents/", endpoint="https://…", resolution=512,
                             scaling_factor=0.18215)
    print(summary.line())
    decode_dataset("latents/", "recon/", endpoint="https://…", format="png")

The ``*_async`` variants are the same jobs as coroutines (pass ``client=`` to share a
:class:`~asyncvae.Client`). See :mod:`asyncvae.jobs.encode` for the output layout
and :mod:`asyncvae.jobs.preprocess` for the image rules.
"""

from ._common import JobSummary
from .decode import decode_dataset, decode_dataset_async
from .demo import make_demo_images
from .encode import encode_dataset, encode_dataset_async
from .preprocess import Prepared, load_image, parse_resolution, prepare, to_wire_tensor
from .sources import Item, list_inputs, select_shards

__all__ = [
    "Item",
    "JobSummary",
    "Prepared",
    "decode_dataset",
    "decode_dataset_async",
    "encode_dataset",
    "encode_dataset_async",
    "list_inputs",
    "load_image",
    "make_demo_images",
    "parse_resolution",
    "prepare",
    "select_shards",
    "to_wire_tensor",
]
