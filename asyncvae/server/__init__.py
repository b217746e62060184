"""The reference endpoint (``asyncvae serve``): an aiohttp.web server that speaks the
Hybrid Inference protocol, with a weightless built-in model, an optional diffusers
``AutoencoderKL`` adapter, replica queueing, service delays, a response cache and
fault injection for testing clients.

::

    from asyncvae.server import LocalServer, ServerConfig, Faults

    with LocalServer(ServerConfig(replicas=2, faults=Faults(fault_503=0.1))) as srv:
        ...  # talk to srv.url
"""

from __future__ import annotations

from .app import FAULT_KINDS, Faults, ServerConfig, create_app
from .model import BuiltinVAE, DiffusersVAE, VAEModel, load_model
from .runner import LocalServer, RunningServer, run_server, start_server

__all__ = [
    "FAULT_KINDS",
    "BuiltinVAE",
    "DiffusersVAE",
    "Faults",
    "LocalServer",
    "RunningServer",
    "ServerConfig",
    "VAEModel",
    "create_app",
    "load_model",
    "run_server",
    "start_server",
]
