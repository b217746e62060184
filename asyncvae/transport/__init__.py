"""Transports: the seam between the engine and the network (see :mod:`._base`)."""

from ._base import Request, Response, Timeouts, Transport
from ._legacy import (  # noqa: F401  (the engine's exchange until it moves onto the seam)
    MAX_ERROR_BODY,
    Reply,
    client_timeout,
    exchange,
    make_session,
    origin,
    parse_endpoint,
    request_url,
)

__all__ = ["Request", "Response", "Timeouts", "Transport"]
