"""One protocol exchange over any :class:`~asyncvae.transport.Transport`: the request
goes out, redirects are followed under the credential rules, and the answer comes back
checked and sized — a tensor streamed into its final buffer, or image/mp4 bytes.

Small parts, each with one job:

- :func:`next_hop` — pure: where a redirect leads, with which method, body and
  headers (every credential header is dropped when the origin changes);
- :func:`raise_for_status` — a non-2xx answer becomes :class:`EndpointError` with its
  whole (bounded) body, however many TCP segments it came in;
- :func:`read_tensor` / :func:`read_bytes` — the body, sized from the headers and
  checked against ``max_response_bytes`` *before* anything is allocated; the byte
  budget's lease is resized to what the answer really holds;
- :func:`exchange` — the sequence of the above.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from yarl import URL

from . import protocol
from ._budget import Lease
from .errors import EndpointError, ProtocolError
from .protocol import TensorSpec, WireRequest
from .transport import Request, Response, Transport

__all__ = [
    "MAX_ERROR_BODY",
    "MAX_REDIRECTS",
    "Reply",
    "exchange",
    "next_hop",
    "raise_for_status",
    "read_bytes",
    "read_tensor",
]

#: Most of an error body that is read (and kept in the exception).
MAX_ERROR_BODY = 64 * 1024
#: Redirects followed within one attempt.
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Request headers that may follow a redirect to another origin; every other one
#: (``Authorization``, ``Cookie``, API keys, anything given with ``headers=``) stays
#: with the endpoint it was meant for.
CROSS_ORIGIN_HEADERS = frozenset(
    {"content-type", "accept", "user-agent", "accept-encoding", protocol.HEADER_SCALE_UP_TIMEOUT.lower()}
)
#: Progress callbacks are told at least this often while a large body streams in.
PROGRESS_STEP = 1 << 20

ProgressCallback = Callable[[int, "int | None"], None]

_NP_DTYPES = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "uint8": np.dtype(np.uint8),
    "bfloat16": np.dtype(np.int16),  # viewed as bfloat16 by torch afterwards
}


class Reply:
    """A checked 2xx answer: ``tensor`` (tensor answers) or ``data`` (image/mp4 bytes)."""

    __slots__ = ("bytes_in", "data", "spec", "tensor", "ttfb")

    def __init__(self, spec: TensorSpec | None, tensor: torch.Tensor | None, data: bytes | None,
                 bytes_in: int, ttfb: float) -> None:
        self.spec = spec
        self.tensor = tensor
        self.data = data
        self.bytes_in = bytes_in
        self.ttfb = ttfb


def origin(url: URL) -> tuple[str, str | None, int | None]:
    """The (scheme, host, port) a credential belongs to."""
    return (url.scheme, url.host, url.port)


def next_hop(
    url: URL,
    method: str,
    body: bytes | memoryview,
    headers: Sequence[tuple[str, str]],
    status: int,
    location: str | None,
    params: tuple[tuple[str, str], ...],
) -> tuple[URL, str, bytes | memoryview, tuple[tuple[str, str], ...]]:
    """Where a redirect answer leads: ``(url, method, body, headers)`` of the next request.

    - 303 (and 301/302 after a POST, as browsers, ``requests`` and aiohttp do) turn
      into a GET without a body; 307/308 repeat the method and body;
    - protocol parameters the ``Location`` dropped are added back (one it kept is left
      as it is);
    - a different origin (scheme, host or port) gets only :data:`CROSS_ORIGIN_HEADERS`.

    Raises :class:`ProtocolError` for a missing, malformed or non-http(s) ``Location``.
    """
    if not location:
        raise ProtocolError(f"redirect ({status}) without a Location header from {url.with_query(None)}")
    try:
        target = url.join(URL(location))
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"redirect ({status}) to a malformed Location {location[:200]!r}: {e}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise ProtocolError(f"redirect ({status}) to an unsupported URL {location[:200]!r}")
    if status == 303 or (status in (301, 302) and method == "POST"):
        method, body = "GET", b""
    if params:
        have = set(target.query.keys())
        missing = tuple((k, v) for k, v in params if k not in have)
        if missing:
            target = target.extend_query(missing)
    if origin(target) != origin(url):
        headers = tuple((k, v) for k, v in headers if k.lower() in CROSS_ORIGIN_HEADERS)
    else:
        headers = tuple(headers)
    return target, method, body, headers


async def raise_for_status(resp: Response, endpoint: URL) -> None:
    """Raise :class:`EndpointError` for a non-2xx answer (its body read whole, up to
    :data:`MAX_ERROR_BODY` bytes)."""
    if 200 <= resp.status < 300:
        return
    body = await resp.read(MAX_ERROR_BODY)
    raise EndpointError(
        protocol.error_body(resp.status, body, resp.headers.get(protocol.HEADER_CONTENT_TYPE)),
        status=resp.status,
        url=str(endpoint.with_query(None)),
        retry_after=protocol.parse_retry_after(resp.headers.get(protocol.HEADER_RETRY_AFTER)),
    )


async def _fill(resp: Response, view: memoryview, total: int, on_progress: ProgressCallback | None) -> int:
    if on_progress is None:
        return await resp.read_into(view)
    got = 0
    n = len(view)
    while got < n:
        step = await resp.read_into(view[got : min(n, got + PROGRESS_STEP)])
        if not step:
            break
        got += step
        on_progress(got, total)
    return got


async def read_tensor(
    resp: Response, *, max_bytes: int, lease: Lease | None, on_progress: ProgressCallback | None = None
) -> tuple[TensorSpec, torch.Tensor]:
    """The tensor of a 2xx tensor answer, streamed into its final buffer.

    The ``shape``/``dtype`` headers are checked against ``Content-Length`` and
    ``max_bytes`` before the buffer exists; a body shorter or longer than declared is
    a retryable :class:`ProtocolError`.
    """
    spec = protocol.parse_tensor_headers(resp.headers, max_bytes=max_bytes)
    nbytes = spec.nbytes
    clen = resp.content_length
    protocol.check_body_length(nbytes, clen)
    if lease is not None:
        lease.resize(nbytes)
    arr = np.empty(nbytes, dtype=np.uint8)  # untouched pages cost no memory until written
    got = await _fill(resp, memoryview(arr), nbytes, on_progress) if nbytes else 0
    if got != nbytes:
        raise ProtocolError(
            f"response body was cut short: got {got} of the {nbytes} bytes its shape/dtype headers declare",
            retryable=True,
        )
    if clen is None and await resp.read_chunk():  # chunked or read-to-EOF framing
        raise ProtocolError(
            f"response body is longer than the {nbytes} bytes its shape/dtype headers declare",
            retryable=True,
        )
    if spec.dtype == "uint8":
        t = torch.from_numpy(arr.reshape(spec.shape))
    else:
        t = torch.from_numpy(arr.view(_NP_DTYPES[spec.dtype]).reshape(spec.shape))
        if spec.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
    return spec, t


async def read_bytes(
    resp: Response, *, max_bytes: int, lease: Lease | None, on_progress: ProgressCallback | None = None
) -> bytes:
    """The body of a 2xx image/mp4 answer, refused (:class:`ProtocolError`) as soon
    as it is known to exceed ``max_bytes`` — from ``Content-Length`` before reading,
    or while chunks arrive — never after buffering it."""
    clen = resp.content_length
    # The body is written into a BytesIO and handed back with getvalue(): CPython
    # then returns the BytesIO's own bytes object instead of copying it, so a body
    # costs its size once, not twice (a bytearray turned into bytes at the end).
    # Where that no-copy path is not taken getvalue() copies: same result.
    out = io.BytesIO()
    if clen is not None:
        if clen > max_bytes:
            raise ProtocolError(f"response declares {clen} bytes, over the client's max_response_bytes={max_bytes}")
        if lease is not None:
            lease.resize(clen)
        if not clen:
            return b""
        out.seek(clen - 1)
        out.write(b"\0")  # sized (zero-filled) to the body
        with out.getbuffer() as view:
            got = await _fill(resp, view, clen, on_progress)
        if got != clen:
            raise ProtocolError(f"response body was cut short: got {got} of {clen} bytes", retryable=True)
        return out.getvalue()
    got = 0
    while True:
        chunk = await resp.read_chunk()
        if not chunk:
            break
        got += len(chunk)
        if got > max_bytes:
            raise ProtocolError(f"response body exceeds the client's max_response_bytes={max_bytes}")
        if lease is not None and got > lease.nbytes:
            lease.resize(got)
        out.write(chunk)
        if on_progress is not None:
            on_progress(got, None)
    if lease is not None:
        lease.resize(got)
    return out.getvalue()


async def exchange(
    transport: Transport,
    url: URL,
    wire: WireRequest,
    headers: Sequence[tuple[str, str]],
    *,
    deadline: float | None,
    max_response_bytes: int,
    lease: Lease | None = None,
    on_progress: ProgressCallback | None = None,
) -> Reply:
    """POST ``wire`` to ``url`` (its query already applied) and return the checked answer.

    ``headers`` are the full request headers (credentials included); ``deadline`` is
    on the running loop's clock. Raises :class:`EndpointError` for non-2xx answers,
    :class:`ProtocolError` for answers that break the protocol, and whatever the
    transport raises (:class:`TransportError`).
    """
    t0 = time.perf_counter()
    req = Request("POST", url, headers, wire.body)
    for _ in range(MAX_REDIRECTS + 1):
        resp = await transport.send(req, deadline=deadline)
        try:
            if resp.status in REDIRECT_STATUSES:
                loc = resp.headers.get("Location")
                target, method, body, hop_headers = next_hop(
                    req.url, req.method, req.body, req.headers, resp.status, loc, wire.params
                )
                req = Request(method, target, hop_headers, body)
                continue
            ttfb = time.perf_counter() - t0
            await raise_for_status(resp, url)
            if wire.expect == "tensor":
                spec, tensor = await read_tensor(
                    resp, max_bytes=max_response_bytes, lease=lease, on_progress=on_progress
                )
                return Reply(spec, tensor, None, spec.nbytes, ttfb)
            data = await read_bytes(resp, max_bytes=max_response_bytes, lease=lease, on_progress=on_progress)
            return Reply(None, None, data, len(data), ttfb)
        finally:
            resp.close()
    raise ProtocolError(f"too many redirects (more than {MAX_REDIRECTS}) from {url.with_query(None)}")
