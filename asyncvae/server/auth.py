"""Who may call what: the bearer token and the admin routes.

- With a token configured (``--token``, ``--token-file`` or ``$ASYNCVAE_SERVE_TOKEN``)
  every route but the probes (``/health``, ``/ready``) needs ``Authorization: Bearer
  <token>``; the check runs before the body is read and compares in constant time
  (:func:`hmac.compare_digest`). A miss answers 401 JSON with ``WWW-Authenticate``.
- The admin routes (``POST /faults``, ``POST /stats/reset``) answer only when the
  server was started with fault flags or ``--admin``; otherwise 403 JSON.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import protocol as P
from .codec import HTTPFail

__all__ = ["OPEN_PATHS", "auth_middleware", "bearer_matches", "require_admin"]

#: Routes answered without a token (liveness and readiness probes).
OPEN_PATHS = frozenset({"/health", "/ready"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="asyncvae"'}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """A middleware that refuses requests without the bearer ``token`` (401)."""

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            header = request.headers.get(P.HEADER_AUTHORIZATION)
            if not bearer_matches(header, token):
                why = "a wrong token" if header else "no Authorization header"
                raise HTTPFail(
                    401,
                    f"401 Unauthorized: this endpoint needs `Authorization: Bearer <token>` and got "
                    f"{why}; pass the server's token (asyncvae: Client(url, token=...) or HF_TOKEN)",
                    CHALLENGE,
                )
        return await handler(request)

    return check_token


def require_admin(enabled: bool, route: str) -> None:
    """Raise 403 unless the admin routes are on."""
    if not enabled:
        raise HTTPFail(
            403,
            f"{route} is an admin route and this server was started without admin routes; "
            "start it with --admin (or any fault flag) to use it",
        )
