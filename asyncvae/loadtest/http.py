"""The load tester's only door to HTTP: send one request through the transport seam
(:class:`asyncvae.transport.native.NativeTransport`, the client's own), validate the
answer while reading it chunk by chunk, keep none of it. Redirects follow the client's
rules (``asyncvae._exchange.next_hop``: credentials stay with their origin), and error
answers become the client's :class:`EndpointError` (``_exchange.raise_for_status``).

:class:`BodyCheck` / :func:`validate_body` are pure (no sockets): given the status
headers and the body's chunks they count bytes, check the declared shape/dtype size
against the bytes received, the tensor shape against the request, image/mp4 magic
bytes on the first bytes, and never hold more than 12 bytes of the body — a 120 MB
video answer costs one socket chunk of memory per request in flight.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Iterable, Mapping

from .. import protocol
from .._exchange import MAX_ERROR_BODY, MAX_REDIRECTS, REDIRECT_STATUSES, next_hop, raise_for_status
from ..client import parse_endpoint
from ..errors import AsyncVAEError, EndpointError, ProtocolError
from ..transport import Request, Timeouts
from ..transport.native import NativeTransport
from .engine import Answer, ClientSideError, InvalidAnswer
from .requests import RequestPlan

__all__ = ["MAX_ERROR_BODY", "MAX_RESPONSE_BYTES", "BodyCheck", "HttpSender", "validate_body"]

#: Largest answer the load tester accepts (declared tensor size or Content-Length).
MAX_RESPONSE_BYTES = 4 << 30

_HEAD = 12  # bytes kept of a body: enough for PNG/JPEG magic and an mp4 ftyp box


class BodyCheck:
    """Validates one 2xx answer to ``plan`` as its body streams past (see :func:`validate_body`).

    ``BodyCheck(plan, headers)`` checks the headers (and raises at once for a bad
    or oversized declaration); ``feed(chunk)`` for each chunk; ``finish()`` returns
    the bytes received. Raises :class:`ProtocolError` for a body whose size
    disagrees with its headers, :class:`InvalidAnswer` for an answer that is not
    what the request asked for (shape, image type, mp4).
    """

    __slots__ = ("_expected", "_head", "_tensor", "got", "plan")

    def __init__(self, plan: RequestPlan, headers: Mapping[str, str], *, max_bytes: int = MAX_RESPONSE_BYTES):
        self.plan = plan
        self.got = 0
        self._head = b""
        clen = protocol.parse_content_length(headers)
        self._tensor = plan.request.expect == "tensor"
        if self._tensor:
            spec = protocol.parse_tensor_headers(headers, max_bytes=max_bytes)
            protocol.check_body_length(spec.nbytes, clen)
            why = _shape_mismatch(plan, spec.shape)
            if why:
                raise InvalidAnswer(why)
            self._expected: int | None = spec.nbytes
        else:
            if plan.expect_shape is not None:
                raise InvalidAnswer("expected a tensor answer")
            if clen is not None and clen > max_bytes:
                raise ProtocolError(f"response declares {clen} bytes, over the load tester's limit of {max_bytes}")
            self._expected = clen

    def feed(self, chunk: bytes | memoryview) -> None:
        """Count one chunk of the body (and look at the first bytes)."""
        n = len(chunk)
        self.got += n
        if self._expected is not None and self.got > self._expected:
            raise ProtocolError(
                f"response body is longer than the {self._expected} bytes its headers declare", retryable=True
            )
        if len(self._head) < _HEAD:
            self._head += bytes(chunk[: _HEAD - len(self._head)])

    def finish(self) -> int:
        """Check the whole body was there and is what was asked for; the bytes received."""
        if self._expected is not None and self.got != self._expected:
            raise ProtocolError(
                f"response body was truncated: got {self.got} of the {self._expected} bytes its headers declare",
                retryable=True,
            )
        if not self._tensor:
            why = _bytes_mismatch(self.plan, self._head)
            if why:
                raise InvalidAnswer(why)
        return self.got


def _shape_mismatch(plan: RequestPlan, shape: tuple[int, ...]) -> str | None:
    exp = plan.expect_shape
    if exp is None:
        return "expected image/video bytes, got a tensor"
    if len(shape) != len(exp) or any(e is not None and e != s for e, s in zip(exp, shape, strict=False)):
        return f"answer shape {list(shape)} != expected {[e if e is not None else '*' for e in exp]}"
    return None


def _bytes_mismatch(plan: RequestPlan, head: bytes) -> str | None:
    if plan.expect_magic and not any(head.startswith(m) for m in plan.expect_magic):
        return f"answer bytes are not the expected format (starts {head[:8]!r})"
    if plan.expect_mp4 and (len(head) < 12 or head[4:8] != b"ftyp"):
        return "answer is not an mp4 (no ftyp box)"
    return None


def validate_body(plan: RequestPlan, headers: Mapping[str, str], chunks: Iterable[bytes | memoryview],
                  *, max_bytes: int = MAX_RESPONSE_BYTES) -> int:
    """Validate a 2xx answer to ``plan`` from its headers and body chunks; returns the
    bytes received. Pure: the chunks are counted and dropped (see :class:`BodyCheck`)."""
    check = BodyCheck(plan, headers, max_bytes=max_bytes)
    for c in chunks:
        check.feed(c)
    return check.finish()


# --------------------------------------------------------------------------- errors


def _os_error(e: BaseException | None) -> OSError | None:
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def classify_client_error(e: BaseException) -> ClientSideError | None:
    """The generator's own failure hiding in ``e`` (out of file descriptors or ports), or None."""
    os_err = _os_error(e)
    if os_err is None:
        return None
    if os_err.errno in (errno.EMFILE, errno.ENFILE):
        return ClientSideError(
            "client_fd_limit", f"the load generator ran out of file descriptors ({os_err}); raise `ulimit -n` "
            "or lower --max-inflight: this failure is the client's, not the endpoint's")
    if os_err.errno == errno.EADDRNOTAVAIL:
        return ClientSideError(
            "client_ports", f"the load generator ran out of local ports ({os_err}); spread the load over more "
            "client machines or lower the rate: this failure is the client's, not the endpoint's")
    return None


# --------------------------------------------------------------------------- sending


class HttpSender:
    """Sends :class:`RequestPlan` s to one endpoint over one pooled transport and returns
    an :class:`Answer` (status, time to first byte, bytes read) for a valid answer;
    raises an :class:`~asyncvae.AsyncVAEError` otherwise. An error raised after the
    status line arrived carries it as ``answered_status``.

    ``connections`` bounds the pool (the run's in-flight cap, so no client-side queue
    hides delay). The token is sent only to the endpoint's origin.
    """

    def __init__(self, url: str, *, connections: int, timeout: float, connect_timeout: float,
                 token: str | None = None, headers: Mapping[str, str] | None = None):
        self.url = parse_endpoint(url)
        token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
        base = dict(headers or {})
        if token:
            base[protocol.HEADER_AUTHORIZATION] = f"Bearer {token}"
        self._headers = tuple(base.items())
        self._timeout = timeout
        self._transport = NativeTransport(
            limit=connections, limit_per_host=connections, keepalive_timeout=30.0,
            timeouts=Timeouts(connect=connect_timeout, read=timeout),
        )
        #: per plan: the Request (URL with query, every header, body), built once
        self._prepared: dict[int, Request] = {}

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._transport.aclose()

    def _prepare(self, plan: RequestPlan) -> Request:
        req = self._prepared.get(plan.index)
        if req is None:
            wire = plan.request
            target = self.url.extend_query(wire.params) if wire.params else self.url
            req = self._prepared[plan.index] = Request(
                "POST", target, self._headers + tuple(wire.headers.items()), wire.body
            )
        return req

    async def __call__(self, plan: RequestPlan) -> Answer:
        """One attempt: POST ``plan``'s request, validate the answer as it streams in."""
        req = self._prepare(plan)
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._timeout
        status: int | None = None
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with await self._transport.send(req, deadline=deadline) as resp:
                    status = resp.status
                    if status in REDIRECT_STATUSES:
                        url, method, body, hdrs = next_hop(
                            req.url, req.method, req.body, req.headers, status,
                            resp.headers.get("Location"), plan.request.params,
                        )
                        req = Request(method, url, hdrs, body)
                        continue
                    ttfb = time.perf_counter() - t0
                    await raise_for_status(resp, self.url)
                    check = BodyCheck(plan, resp.headers)
                    while chunk := await resp.read_chunk():
                        check.feed(chunk)
                    return Answer(status, ttfb, check.finish())
            raise ProtocolError(f"too many redirects (more than {MAX_REDIRECTS})")
        except EndpointError:
            raise
        except AsyncVAEError as e:
            client = classify_client_error(e)
            if client is not None:
                raise client from e
            if status is not None:
                e.answered_status = status  # type: ignore[attr-defined]
            raise


def describe_endpoint(url: str) -> str:
    """Validate an endpoint URL up front (raises :class:`InputError` saying what to fix)."""
    return str(parse_endpoint(url))
