"""asyncvae — a high-throughput client for remote VAE encode/decode endpoints.

The public namespace is flat and curated (``tests/test_public_api.py`` pins it):

- sync drop-ins: :func:`remote_decode`, :func:`remote_encode` (diffusers' signatures),
  :func:`remote_decode_batch`, :func:`remote_encode_batch`;
- async: :class:`Client` with ``decode``/``encode``/``decode_many``/``encode_many``;
- configuration values: :class:`Limits`, :class:`Timeout`, :class:`Retry`;
- errors: :class:`AsyncVAEError` and its subclasses, :class:`ItemError`.

Subpackages: ``asyncvae.server`` (reference endpoint), ``asyncvae.jobs`` (dataset
jobs), ``asyncvae.loadtest`` (load generation), ``asyncvae.integrations.ray``.
"""

from ._stats import Stats
from .client import Client
from .config import Limits, Retry, Timeout
from .errors import (
    AsyncVAEError,
    ClientClosedError,
    EndpointError,
    InputError,
    ItemError,
    ProtocolError,
    RetryExhausted,
    TransportError,
)
from .sync import (
    configure,
    remote_decode,
    remote_decode_batch,
    remote_encode,
    remote_encode_batch,
    shutdown,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncVAEError",
    "Client",
    "ClientClosedError",
    "EndpointError",
    "InputError",
    "ItemError",
    "Limits",
    "ProtocolError",
    "Retry",
    "RetryExhausted",
    "Stats",
    "Timeout",
    "TransportError",
    "__version__",
    "configure",
    "remote_decode",
    "remote_decode_batch",
    "remote_encode",
    "remote_encode_batch",
    "shutdown",
]
