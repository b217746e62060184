"""Transports: the seam between the engine and the network (see :mod:`._base`).

Implementations: :mod:`.native` (the default), :mod:`.aiohttp`, :mod:`.memory`.
"""

from ._base import Request, Response, Timeouts, Transport

__all__ = ["Request", "Response", "Timeouts", "Transport"]
