"""The reference endpoint (``asyncvae serve``): an aiohttp.web server that speaks the
Hybrid Inference protocol, with a weightless built-in model or a real diffusers VAE
(image or video, any device and dtype), replica slots with dynamic batching, bearer
token auth, readiness and overload answers, graceful drain, Prometheus metrics, a
response cache and fault injection for testing clients.

::

    from asyncvae.server import LocalServer, ServerConfig, Faults

    with LocalServer(ServerConfig(replicas=2, faults=Faults(fault_503=0.1))) as srv:
        ...  # talk to srv.url
"""

from __future__ import annotations

from .app import create_app
from .config import FAULT_KINDS, TOKEN_ENV, Faults, ServerConfig
from .diffusers_model import DiffusersVAE, load_model
from .model import BuiltinVAE, VAEModel
from .runner import LocalServer, RunningServer, run_server, start_server

__all__ = [
    "FAULT_KINDS",
    "TOKEN_ENV",
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
