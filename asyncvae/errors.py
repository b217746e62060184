"""The exception hierarchy of asyncvae: one place for every error the library raises.

::

    AsyncVAEError
    ├── InputError          (also ValueError)   bad arguments; nothing was sent
    ├── EndpointError       (also RuntimeError) the endpoint answered non-2xx
    ├── ProtocolError                            the response broke the wire contract
    ├── TransportError                           connection refused/reset, timeout, TLS
    ├── RetryExhausted      (also RuntimeError) every attempt failed; ``.last`` is the cause
    └── ClientClosedError                        the Client was closed while the call waited or ran

``EndpointError`` and ``RetryExhausted`` of an HTTP failure keep the contract of
``diffusers.utils.remote_decode``: they are ``RuntimeError`` instances whose
``args[0]`` is the decoded JSON error body (or, where the body is not JSON, a dict
naming the status and text), so ``except RuntimeError`` keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AsyncVAEError",
    "ClientClosedError",
    "EndpointError",
    "InputError",
    "ItemError",
    "ProtocolError",
    "RetryExhausted",
    "TransportError",
    "error_kind",
]


class AsyncVAEError(Exception):
    """Base class of every error asyncvae raises on purpose."""

    #: Whether a new attempt of the same request could succeed.
    retryable: bool = False


class InputError(AsyncVAEError, ValueError):
    """The caller's arguments are invalid; no request was sent.

    The message says what was wrong and how to fix it.
    """


class EndpointError(AsyncVAEError, RuntimeError):
    """The endpoint answered with a non-2xx status.

    ``args[0]`` is the decoded JSON body (e.g. ``{"error": "..."}``) like the
    reference client's ``RuntimeError(response.json())``; for a body that is not
    JSON it is ``{"error": "<text>", "status": <code>}``.
    """

    def __init__(self, body: Any, *, status: int, url: str = "", retry_after: float | None = None):
        super().__init__(body)
        self.status = status
        self.body = body
        self.url = url
        self.retry_after = retry_after
        self.retryable = status in RETRYABLE_STATUSES

    def __str__(self) -> str:
        body = self.body
        text = str(body["error"]) if isinstance(body, dict) and "error" in body else str(body)
        if len(text) > 500:
            text = text[:500] + "…"
        return f"HTTP {self.status} from {self.url or 'endpoint'}: {text}"


class ProtocolError(AsyncVAEError):
    """The response does not follow the wire protocol (missing or bad ``shape``/``dtype``
    headers, a body of the wrong size, a truncated body, bytes that are not an image).

    ``retryable`` is true where a new attempt can help (a truncated body, headers that
    disagree with the body — a proxy or a replica may do better next time), false where
    the client refuses the answer whatever happens (over ``max_response_bytes``, bytes
    that are no image).
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class TransportError(AsyncVAEError):
    """The exchange failed below HTTP: connection refused or reset, a timeout, TLS."""

    def __init__(self, message: str, *, retryable: bool = True, kind: str = "connection"):
        super().__init__(message)
        self.retryable = retryable
        #: ``connection``, ``timeout`` or ``tls``: used for ``Client.stats``.
        self.kind = kind


class RetryExhausted(AsyncVAEError, RuntimeError):
    """Every allowed attempt failed (or the deadline passed); ``last`` is the final cause.

    When the last cause was an HTTP error, ``args[0]`` is its body (so it reads like
    the reference client's ``RuntimeError``); otherwise it is a message.
    """

    def __init__(self, last: BaseException, attempts: int, *, reason: str = "retries exhausted"):
        first = last.args[0] if isinstance(last, EndpointError) else (
            f"{reason} after {attempts} attempt(s); last error: {type(last).__name__}: {last}"
        )
        super().__init__(first)
        self.last = last
        self.attempts = attempts
        self.reason = reason
        self.__cause__ = last

    @property
    def status(self) -> int | None:
        """The HTTP status of the last attempt, if it got one."""
        return getattr(self.last, "status", None)

    def __str__(self) -> str:
        return f"{self.reason} after {self.attempts} attempt(s); last error: {type(self.last).__name__}: {self.last}"


class ClientClosedError(AsyncVAEError):
    """The :class:`~asyncvae.Client` was closed (``aclose()``, leaving ``async with``,
    ``asyncvae.shutdown()``) while this call waited for room or ran; nothing more is
    sent for it. A closed client stays closed: make a new one."""


class ItemError:
    """A failed item of a batch (``decode_many``/``encode_many``/``*_batch``), yielded in
    its place instead of raising, so that the other items are neither lost nor reordered.

    Not an exception itself: ``error`` holds the exception, ``index`` the item's position
    in the input. ``raise item.error`` re-raises it.
    """

    __slots__ = ("error", "index")

    def __init__(self, index: int, error: BaseException):
        self.index = index
        self.error = error

    def __repr__(self) -> str:
        return f"ItemError(index={self.index}, error={type(self.error).__name__}: {self.error})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemError) and other.index == self.index and other.error is self.error

    __hash__ = None  # type: ignore[assignment]


#: HTTP statuses a retry can cure (PROTOCOL.md, "Errors").
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


def error_kind(e: BaseException) -> str:
    """The one word an error is counted under, everywhere (``Client.stats``, the load
    tester's reports, the dataset jobs' failure records).

    ``http_<status>`` (e.g. ``http_503``), ``timeout``, ``connection``, ``tls``,
    ``protocol``, ``input``, ``closed``, ``cancelled``; a :class:`RetryExhausted` counts as its last
    cause; anything else as ``exception_<TypeName>``.
    """
    if isinstance(e, RetryExhausted):
        return error_kind(e.last)
    if isinstance(e, EndpointError):
        return f"http_{e.status}"
    if isinstance(e, TransportError):
        return e.kind
    if isinstance(e, ProtocolError):
        return "protocol"
    if isinstance(e, InputError):
        return "input"
    if isinstance(e, ClientClosedError):
        return "closed"
    if isinstance(e, BaseException) and type(e).__name__ == "CancelledError":
        return "cancelled"
    return f"exception_{type(e).__name__}"
