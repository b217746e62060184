"""One HTTP exchange and nothing else: send a request body view, stream the answer.

The response body is streamed in chunks straight into a preallocated buffer whose
size was checked first against the ``shape``/``dtype`` headers, ``Content-Length``
and the caller's maximum, so a broken or hostile server can't make us allocate more
than it actually sends and we agreed to take. Failures are mapped onto the error
hierarchy with ``retryable`` set, so the retry policy above needs no aiohttp knowledge.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
import torch
from yarl import URL

from .. import protocol
from ..errors import EndpointError, InputError, ProtocolError
from ..protocol import TensorSpec, WireRequest
from .aiohttp import map_error

#: Most of an error body that is read (and kept in the exception).
MAX_ERROR_BODY = 64 * 1024
#: Redirects followed for one attempt.
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

ProgressCallback = Callable[[int, "int | None"], None]


class Budget(Protocol):
    """Room for response bytes (see ``Limits.max_inflight_bytes``)."""

    async def acquire(self, n: int) -> None: ...

    def release(self, n: int) -> None: ...


@dataclass
class Reply:
    """A successful answer. ``held`` bytes of the budget stay taken until released."""

    spec: TensorSpec | None
    tensor: torch.Tensor | None
    data: bytes | None
    held: int
    ttfb: float
    elapsed: float
    bytes_in: int


def origin(url: URL) -> tuple[str, str | None, int | None]:
    """The (scheme, host, port) a credential belongs to."""
    return (url.scheme, url.host, url.port)


def parse_endpoint(endpoint: str) -> URL:
    """Check an endpoint URL (raises :class:`InputError` with what to fix)."""
    if not isinstance(endpoint, (str, URL)):
        raise InputError(f"endpoint must be an http(s) URL string, got {type(endpoint).__name__}")
    try:
        url = URL(str(endpoint))
    except (ValueError, TypeError) as e:
        raise InputError(f"endpoint {endpoint!r} is not a valid URL: {e}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InputError(
            f"endpoint {endpoint!r} is not an http(s) URL; expected e.g. "
            "'https://xxxx.endpoints.huggingface.cloud/' or 'http://127.0.0.1:8000/'"
        )
    return url


@functools.lru_cache(maxsize=256)
def request_url(url: URL, params: tuple[tuple[str, str], ...]) -> URL:
    """The endpoint URL with the request's query appended (cached: bulk jobs repeat it)."""
    return url.extend_query(params) if params else url


def _map_client_error(e: BaseException, url: URL, *, in_body: bool) -> Exception:
    return map_error(e, url, in_body=in_body)


async def _chunks(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's chunks as received, one at a time. (``iter_any()`` would
    ``b"".join()`` all chunks waiting in the buffer: under uvloop, which feeds many
    socket reads per loop iteration, that is an extra copy of nearly every body.)"""
    while True:
        chunk, boundary = await content.readchunk()
        if chunk:
            yield chunk
        elif not boundary:
            return  # end of body; (b"", True) is only a chunked-encoding boundary


async def _read_into(
    resp: aiohttp.ClientResponse,
    nbytes: int,
    on_progress: ProgressCallback | None,
) -> torch.Tensor:
    """Stream exactly ``nbytes`` into a fresh uint8 tensor (one copy per chunk)."""
    arr = np.empty(nbytes, dtype=np.uint8)  # uninitialised: every byte is written below
    view = memoryview(arr)
    off = 0
    async for chunk in _chunks(resp.content):
        end = off + len(chunk)
        if end > nbytes:
            raise ProtocolError(
                f"response body is longer than the {nbytes} bytes its shape/dtype headers declare",
                retryable=True,
            )
        view[off:end] = chunk
        off = end
        if on_progress is not None:
            on_progress(off, nbytes)
    if off != nbytes:
        raise ProtocolError(
            f"response body was truncated: got {off} of the {nbytes} bytes its headers declare",
            retryable=True,
        )
    return torch.from_numpy(arr)


async def _read_bytes(
    resp: aiohttp.ClientResponse, limit: int, on_progress: ProgressCallback | None, expected: int | None
) -> bytes:
    chunks: list[bytes] = []
    got = 0
    async for chunk in _chunks(resp.content):
        got += len(chunk)
        if got > limit:
            raise ProtocolError(f"response body exceeds the client's max_response_bytes={limit}")
        chunks.append(chunk)
        if on_progress is not None:
            on_progress(got, expected)
    if expected is not None and got != expected:
        raise ProtocolError(
            f"response body was {'truncated' if got < expected else 'longer than Content-Length'}: "
            f"got {got} of {expected} bytes",
            retryable=True,
        )
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one copy at most


async def exchange(
    session: aiohttp.ClientSession,
    url: URL,
    req: WireRequest,
    *,
    headers: Mapping[str, str] | None = None,
    credential: tuple[tuple[str, str | None, int | None], str] | None = None,
    timeout: aiohttp.ClientTimeout | None = None,
    max_response_bytes: int,
    budget: Budget | None = None,
    on_progress: ProgressCallback | None = None,
) -> Reply:
    """POST ``req`` to ``url`` once and return the checked answer.

    ``credential`` is ``(origin, authorization_value)``: the header is sent only while
    the request goes to that origin (not after a redirect to another host).
    Raises :class:`EndpointError` for non-2xx answers, :class:`ProtocolError` for
    answers that break the protocol, :class:`TransportError` below HTTP.
    """
    t0 = time.perf_counter()
    send_headers: dict[str, str] = dict(headers or {})
    send_headers.update(req.headers)
    target = request_url(url, req.params)
    held = 0
    in_body = False
    try:
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(send_headers)
            if credential is not None and origin(target) == credential[0]:
                h[protocol.HEADER_AUTHORIZATION] = credential[1]
            skip = () if protocol.HEADER_CONTENT_TYPE in h else (protocol.HEADER_CONTENT_TYPE,)
            async with session.post(
                target,
                data=req.body,
                headers=h,
                timeout=timeout,
                allow_redirects=False,
                skip_auto_headers=skip,
            ) as resp:
                ttfb = time.perf_counter() - t0
                if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                    target = resp.url.join(URL(resp.headers["Location"]))
                    if target.scheme not in ("http", "https"):
                        raise ProtocolError(f"redirect to unsupported URL {target}")
                    if not target.query:
                        target = request_url(target, req.params)
                    continue
                in_body = True
                if resp.status >= 300 or resp.status < 200:
                    body = await resp.content.read(MAX_ERROR_BODY)
                    raise EndpointError(
                        protocol.error_body(resp.status, body, resp.headers.get(protocol.HEADER_CONTENT_TYPE)),
                        status=resp.status,
                        url=str(url.with_query(None)),
                        retry_after=protocol.parse_retry_after(resp.headers.get(protocol.HEADER_RETRY_AFTER)),
                    )
                clen = protocol.parse_content_length(resp.headers)
                if req.expect == "tensor":
                    spec = protocol.parse_tensor_headers(resp.headers, max_bytes=max_response_bytes)
                    protocol.check_body_length(spec.nbytes, clen)
                    if budget is not None:
                        await budget.acquire(spec.nbytes)
                        held = spec.nbytes
                    buf = await _read_into(resp, spec.nbytes, on_progress)
                    tensor = buf.view(spec.torch_dtype).reshape(spec.shape) if spec.nbytes else torch.empty(
                        spec.shape, dtype=spec.torch_dtype
                    )
                    t1 = time.perf_counter()
                    return Reply(spec, tensor, None, held, ttfb, t1 - t0, spec.nbytes)
                if clen is not None and clen > max_response_bytes:
                    raise ProtocolError(
                        f"response declares {clen} bytes, over the client's max_response_bytes={max_response_bytes}"
                    )
                if budget is not None and clen is not None:
                    await budget.acquire(clen)
                    held = clen
                data = await _read_bytes(resp, max_response_bytes, on_progress, clen)
                t1 = time.perf_counter()
                return Reply(None, None, data, held, ttfb, t1 - t0, len(data))
        raise ProtocolError(f"too many redirects (more than {MAX_REDIRECTS}) from {url.with_query(None)}")
    except (EndpointError, ProtocolError, InputError):
        if held and budget is not None:
            budget.release(held)
        raise
    except asyncio.CancelledError:
        if held and budget is not None:
            budget.release(held)
        raise
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        if held and budget is not None:
            budget.release(held)
        raise _map_client_error(e, url, in_body=in_body) from e


def client_timeout(connect: float | None, read: float | None, attempt: float | None) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for one attempt from the :class:`~asyncvae.Timeout` fields."""
    return aiohttp.ClientTimeout(total=attempt, connect=None, sock_connect=connect, sock_read=read)


def make_session(
    *,
    limit: int,
    limit_per_host: int,
    keepalive_timeout: float,
    ssl_context: Any = True,
    read_bufsize: int = 1 << 20,
) -> aiohttp.ClientSession:
    """The pooled session of a client (one TCP pool; TLS verification on unless told)."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=limit_per_host,
        keepalive_timeout=keepalive_timeout,
        ssl=ssl_context,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        read_bufsize=read_bufsize,
        auto_decompress=False,
        trust_env=False,
        raise_for_status=False,
    )
