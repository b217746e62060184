"""Which endpoint a job talks to, how it is recorded, and which of its errors end a job.

A job never picks an endpoint by itself: it needs ``endpoint=URL`` (or several
replicas), ``endpoint="builtin"`` for the built-in reference server started in this
process (a weightless demo model, not a real VAE), or an open ``client``. What is
recorded (``job.json``, every shard's metadata) is the endpoint's identity without
secrets — scheme, host, port and path; never user info, query or token — and the
model identity the endpoint reveals through its answers (latent channels).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from yarl import URL

from ..client import Client
from ..config import Limits, Retry, Timeout
from ..errors import AsyncVAEError, EndpointError, InputError, RetryExhausted, error_kind

__all__ = [
    "BUILTIN",
    "JobAborted",
    "classify",
    "endpoint_identity",
    "fatal_reason",
    "open_client",
    "resolve_endpoints",
]

BUILTIN = "builtin"
#: Statuses that end a job at once: the endpoint will not serve anything.
FATAL_STATUSES = {
    401: ("Unauthorized", "check the token (HF_TOKEN)"),
    403: ("Forbidden", "the token has no access to this endpoint"),
    404: ("Not Found", "check the endpoint URL (its path is used as given)"),
}

NO_ENDPOINT = (
    "no endpoint: pass --endpoint URL (your VAE endpoint; repeat it for replicas), or "
    "--endpoint builtin / --demo to use the built-in demo model (weightless, NOT a real VAE)"
)


class JobAborted(AsyncVAEError):
    """The job stopped before its end: the endpoint refused it (401/403/404), failures
    passed ``--max-failure-rate``, or the endpoint's model differs from the dataset's.
    Work finished before the stop is kept; run again once the cause is fixed."""


def resolve_endpoints(endpoint: str | Sequence[str] | None) -> list[str]:
    """The endpoint URLs, ``["builtin"]``, or :class:`InputError` naming the choices."""
    if endpoint is None or (not isinstance(endpoint, str) and not list(endpoint)):
        raise InputError(NO_ENDPOINT)
    urls = [endpoint] if isinstance(endpoint, str) else [str(u) for u in endpoint]
    if BUILTIN in urls:
        if len(urls) > 1:
            raise InputError("--endpoint builtin cannot be mixed with endpoint URLs")
        return [BUILTIN]
    for u in urls:
        try:
            parsed = URL(u)
        except (ValueError, TypeError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise InputError(f"endpoint {u!r} is not an http(s) URL; expected e.g. https://xyz.endpoints.huggingface.cloud/")
    return urls


def endpoint_identity(urls: Sequence[str]) -> list[str]:
    """What a job records of its endpoints: ``scheme://host:port/path``, sorted — no user
    info, query string, fragment or token."""
    if list(urls) == [BUILTIN]:
        return [BUILTIN]
    out = set()
    for u in urls:
        p = URL(u)
        port = f":{p.explicit_port}" if p.explicit_port else ""
        out.add(f"{p.scheme}://{p.host}{port}{p.path or '/'}")
    return sorted(out)


def same_endpoint(recorded: Sequence[str], now: Sequence[str]) -> bool:
    """Whether ``now`` is the recorded endpoint: they share at least one URL (adding or
    dropping a replica of the same endpoint is no change)."""
    return bool(set(recorded) & set(now))


def classify(e: BaseException) -> tuple[str, str]:
    """(class, kind) of a failed item: class ``input`` (the file or value is bad; final)
    or ``endpoint`` (the endpoint failed; retried by a later run); kind from
    :func:`asyncvae.errors.error_kind` (``input``, ``http_503``, ``timeout``, ...)."""
    kind = error_kind(e)
    if isinstance(e, InputError):
        return "input", kind
    status = getattr(e, "status", None)
    if isinstance(e, (EndpointError, RetryExhausted)) and status in (400, 413, 415, 422):
        return "input", kind  # the endpoint rejected this item's content
    return "endpoint", kind


def fatal_reason(e: BaseException, where: str) -> str | None:
    """A one-line reason to abort the whole job for this error, or ``None``."""
    status = getattr(e, "status", None)
    if isinstance(e, (EndpointError, RetryExhausted)) and status in FATAL_STATUSES:
        name, hint = FATAL_STATUSES[status]
        return f"the endpoint answered HTTP {status} {name} for {where}: {hint}; nothing more was sent"
    return None


def describe(e: BaseException) -> str:
    """A one-line reason for a failed item."""
    text = str(e) or type(e).__name__
    text = " ".join(text.split())
    return text if isinstance(e, (InputError, RetryExhausted)) else f"{type(e).__name__}: {text}"


def make_client(
    endpoints: str | Sequence[str],
    *,
    concurrency: int,
    retry: Retry | None = None,
    timeout: Timeout | None = None,
    token: str | bool | None = None,
) -> Client:
    """A :class:`Client` sized for a dataset job: ``concurrency`` requests in flight and as
    many queued (the reorder window, hence memory, stays ~2x concurrency items)."""
    if concurrency < 1:
        raise InputError(f"concurrency {concurrency} must be >= 1")
    return Client(
        endpoints,
        limits=Limits(max_concurrency=concurrency, max_queued=max(8, concurrency)),
        retry=retry,
        timeout=timeout,
        token=token,
    )


@contextlib.asynccontextmanager
async def open_client(
    urls: Sequence[str],
    *,
    concurrency: int,
    retry: Retry | None,
    timeout: Timeout | None,
    token: str | bool | None,
    log: Any,
) -> AsyncIterator[Client]:
    """A client for ``urls``; for ``["builtin"]`` the reference server is started in this
    process on 127.0.0.1 and an ephemeral port (and stopped afterwards)."""
    if list(urls) != [BUILTIN]:
        async with make_client(list(urls), concurrency=concurrency, retry=retry, timeout=timeout, token=token) as c:
            yield c
        return
    import os

    from ..server import LocalServer, ServerConfig

    srv = LocalServer(ServerConfig(replicas=max(1, min(4, os.cpu_count() or 1))))
    await asyncio.to_thread(srv.start)
    log(f"started the built-in reference server at {srv.url} (weightless demo model, NOT a real VAE)")
    try:
        async with make_client(srv.url, concurrency=concurrency, retry=retry, timeout=timeout, token=False) as c:
            yield c
    finally:
        await asyncio.to_thread(srv.stop)
