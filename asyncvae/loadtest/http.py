"""The load tester's only door to HTTP: send one request, validate the answer while
reading it chunk by chunk, keep none of it.

Everything here that touches :mod:`asyncvae.transport` or aiohttp is marked
``SWITCH POINT``: when the transport seam lands (request in; status, headers and
body chunks out), :meth:`HttpSender.__call__` becomes "send through the seam, feed
its chunks to :class:`BodyCheck`", and the rest of the load tester does not change.

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
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Mapping

import aiohttp
from yarl import URL

from .. import protocol, transport
from ..errors import AsyncVAEError, EndpointError, InputError, ProtocolError, TransportError
from .engine import Answer, ClientSideError, InvalidAnswer
from .requests import RequestPlan

__all__ = ["MAX_ERROR_BODY", "MAX_RESPONSE_BYTES", "BodyCheck", "HttpSender", "validate_body"]

#: Largest answer the load tester accepts (declared tensor size or Content-Length).
MAX_RESPONSE_BYTES = 4 << 30
#: Most of an error body that is read.
MAX_ERROR_BODY = 64 * 1024
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
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
        if isinstance(e, aiohttp.ClientConnectorError):
            return e.os_error
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


def _map_error(e: BaseException, url: URL, *, in_body: bool) -> Exception:
    """aiohttp/OS errors in the vocabulary of :mod:`asyncvae.errors` (SWITCH POINT:
    the transport seam will raise these itself)."""
    client = classify_client_error(e)
    if client is not None:
        return client
    where = "while reading the response body" if in_body else "before a response arrived"
    if isinstance(e, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return TransportError(f"TLS failure talking to {url.host}: {e}", retryable=False, kind="tls")
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return TransportError(f"timed out {where} from {url.host}:{url.port}", kind="timeout")
    if isinstance(e, aiohttp.ClientResponseError):
        detail = (e.message or type(e).__name__).splitlines()[0]
        return ProtocolError(f"malformed HTTP response from {url.host}:{url.port}: {detail}", retryable=True)
    if in_body and isinstance(e, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                                  aiohttp.ClientOSError, ConnectionError)):
        return ProtocolError(f"response body from {url.host}:{url.port} was cut short: {e}", retryable=True)
    return TransportError(f"connection to {url.host}:{url.port} failed {where}: {type(e).__name__}: {e}")


async def _chunks(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's chunks as received, one at a time (no joining copies)."""
    while True:
        chunk, boundary = await content.readchunk()
        if chunk:
            yield chunk
        elif not boundary:
            return


# --------------------------------------------------------------------------- sending


class HttpSender:
    """Sends :class:`RequestPlan` s to one endpoint over one pooled session and returns
    an :class:`Answer` (status, time to first byte, bytes read) for a valid answer;
    raises an :class:`~asyncvae.AsyncVAEError` otherwise. An error raised after the
    status line arrived carries it as ``answered_status``.

    ``connections`` bounds the pool (the run's in-flight cap, so no client-side queue
    hides delay). The token is sent only to the endpoint's origin.
    """

    def __init__(self, url: str, *, connections: int, timeout: float, connect_timeout: float,
                 token: str | None = None, headers: Mapping[str, str] | None = None):
        # SWITCH POINT: endpoint parsing, credentials, timeouts and the session come
        # from asyncvae.transport today; from the transport seam later.
        self.url = transport.parse_endpoint(url)
        token = token if token is not None else (os.environ.get("HF_TOKEN") or None)
        self._credential = (transport.origin(self.url), f"Bearer {token}") if token else None
        self._headers = dict(headers or {})
        self._timeout = transport.client_timeout(connect_timeout, timeout, timeout)
        self._session = transport.make_session(limit=connections, limit_per_host=connections,
                                               keepalive_timeout=30.0)
        #: per plan: (URL with query, headers, auto headers to skip), built once
        self._prepared: dict[int, tuple[URL, dict[str, str], tuple[str, ...] | None]] = {}

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._session.close()

    def _request_headers(self, plan: RequestPlan, target: URL) -> tuple[dict[str, str], tuple[str, ...] | None]:
        h = dict(self._headers)
        h.update(plan.request.headers)
        if self._credential is not None and transport.origin(target) == self._credential[0]:
            h[protocol.HEADER_AUTHORIZATION] = self._credential[1]
        # no Content-Type (encode): send none, as the reference client does
        return h, (None if protocol.HEADER_CONTENT_TYPE in h else (protocol.HEADER_CONTENT_TYPE,))

    def _prepare(self, plan: RequestPlan) -> tuple[URL, dict[str, str], tuple[str, ...] | None]:
        prepared = self._prepared.get(plan.index)
        if prepared is None:
            params = plan.request.params
            target = self.url.extend_query(params) if params else self.url
            prepared = self._prepared[plan.index] = (target, *self._request_headers(plan, target))
        return prepared

    async def __call__(self, plan: RequestPlan) -> Answer:
        """One attempt: POST ``plan``'s request, validate the answer as it streams in."""
        req = plan.request
        target, h, skip = self._prepare(plan)
        t0 = time.perf_counter()
        in_body = False
        status: int | None = None
        try:
            for hop in range(MAX_REDIRECTS + 1):
                if hop:
                    h, skip = self._request_headers(plan, target)
                # SWITCH POINT: the one HTTP exchange (status + headers + body chunks).
                async with self._session.post(target, data=req.body, headers=h, timeout=self._timeout,
                                              allow_redirects=False, skip_auto_headers=skip) as resp:
                    ttfb = time.perf_counter() - t0
                    status = resp.status
                    if status in REDIRECT_STATUSES and "Location" in resp.headers:
                        target = resp.url.join(URL(resp.headers["Location"]))
                        if target.scheme not in ("http", "https"):
                            raise ProtocolError(f"redirect to unsupported URL {target}")
                        if not target.query and req.params:
                            target = target.extend_query(req.params)
                        continue
                    in_body = True
                    if not 200 <= status < 300:
                        body = await resp.content.read(MAX_ERROR_BODY)
                        raise EndpointError(
                            protocol.error_body(status, body, resp.headers.get(protocol.HEADER_CONTENT_TYPE)),
                            status=status, url=str(self.url.with_query(None)),
                            retry_after=protocol.parse_retry_after(resp.headers.get(protocol.HEADER_RETRY_AFTER)),
                        )
                    check = BodyCheck(plan, resp.headers)
                    async for chunk in _chunks(resp.content):
                        check.feed(chunk)
                    return Answer(status, ttfb, check.finish())
            raise ProtocolError(f"too many redirects (more than {MAX_REDIRECTS})")
        except EndpointError:
            raise
        except (AsyncVAEError, InputError) as e:
            if status is not None:
                e.answered_status = status  # type: ignore[attr-defined]
            raise
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            err = _map_error(e, self.url, in_body=in_body)
            if status is not None and in_body:
                err.answered_status = status  # type: ignore[attr-defined]
            raise err from e


def describe_endpoint(url: str) -> str:
    """Validate an endpoint URL up front (raises :class:`InputError` saying what to fix)."""
    return str(transport.parse_endpoint(url))

