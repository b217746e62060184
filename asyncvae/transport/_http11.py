"""HTTP/1.1 message framing as pure functions: no sockets, no event loop.

- :func:`request_head_prefix` builds the request line and header block of a request up
  to (not including) ``Content-Length``; :func:`request_head_end` closes it. The native
  transport caches the prefix per (method, URL, headers), so per request only the length
  line is formatted.
- :func:`find_head_end` / :func:`parse_response_head` read a response head (status line
  and header fields) and decide how its body is framed (RFC 9112 §6.3).
- :class:`ChunkedDecoder` decodes a ``Transfer-Encoding: chunked`` body incrementally,
  from pieces of any size, handing back views of the payload without copying it.

Every malformed input raises a retryable :class:`~asyncvae.ProtocolError` (a proxy or
another replica may answer properly next time); limits keep a hostile peer from making
the parser buffer more than :data:`MAX_HEAD` bytes or :data:`MAX_HEADERS` fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from ..errors import InputError, ProtocolError

__all__ = [
    "BODY_CHUNKED",
    "BODY_EOF",
    "BODY_LENGTH",
    "BODY_NONE",
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "MAX_HEADERS",
    "ChunkedDecoder",
    "ResponseHead",
    "find_head_end",
    "parse_response_head",
    "request_head_end",
    "request_head_prefix",
    "sends_content_length",
]

#: Largest response head (status line + fields + the empty line), and largest trailer block.
MAX_HEAD = 64 * 1024
#: Most header fields in a head (and trailer fields after a chunked body).
MAX_HEADERS = 100
#: Longest chunk-size line (size, extensions and line end).
MAX_CHUNK_LINE = 4096

#: How a response body is framed.
BODY_NONE = 0  # no body (HEAD, 1xx, 204, 304)
BODY_LENGTH = 1  # Content-Length
BODY_CHUNKED = 2  # Transfer-Encoding: chunked
BODY_EOF = 3  # until the server closes the connection

#: Methods whose request carries ``Content-Length`` even with an empty body (as aiohttp;
#: native.py inlines the same rule).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
# Unambiguous patterns only (no two adjacent quantifiers that can match the same
# character): a hostile head of 64 KiB must not make the regex engine backtrack
# quadratically. Optional whitespace around values is stripped in Python.
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\x00-\x08\x0a-\x1f\x7f]*)")
_FIELD_LINE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n"
#: a whole well-formed head (CRLF line ends): the fast path, one regex call
_HEAD = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?\r\n((?:" + _FIELD_LINE + rb")*)\r\n"
)
_FIELDS = re.compile(r"([^:]+):[ \t]*([^\r]*)\r\n")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CHUNK_EXT = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")


def _bad(message: str) -> ProtocolError:
    return ProtocolError(f"malformed HTTP response: {message}", retryable=True)


# --------------------------------------------------------------------------- requests


def sends_content_length(method: str, body_length: int) -> bool:
    """Whether a request carries ``Content-Length``: always with a body, and for
    POST/PUT/PATCH also with an empty one (a GET without a body sends none)."""
    return body_length > 0 or method in _BODY_METHODS


def request_head_prefix(method: str, url: URL, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line, ``Host`` and the given header fields, each line ending in CRLF;
    the caller appends :func:`request_head_end`. Header fields go out in the given order,
    byte for byte; a given ``Host`` replaces the one derived from the URL.

    Raises :class:`~asyncvae.InputError` for what would break the framing: a method that
    is not a token, a URL that is not absolute http(s) or holds whitespace, a field name
    that is not a token, a value with CR, LF or another control character (header
    injection), or a ``Content-Length``/``Transfer-Encoding`` field (the transport frames
    the body itself)."""
    if not _TOKEN.fullmatch(method):
        raise InputError(f"invalid HTTP method {method!r}")
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise InputError(f"not an absolute http(s) URL: {str(url)[:200]!r}")
    target = url.raw_path_qs or "/"
    if _BAD_TARGET.search(target):
        raise InputError(f"URL path/query holds whitespace or control characters: {target[:200]!r}")
    host = url.host_port_subcomponent or url.raw_host
    lines = []
    for name, value in headers:
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise InputError(f"invalid header name {name!r}")
        if not isinstance(value, str) or _BAD_VALUE.search(value):
            raise InputError(f"invalid value for header {name}: {value!r} (control characters)")
        lname = name.lower()
        if lname in ("content-length", "transfer-encoding"):
            raise InputError(f"header {name} is set by the transport, not the caller")
        if lname == "host":
            host = value
            continue
        lines.append(f"{name}: {value}\r\n")
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{''.join(lines)}".encode()


def request_head_end(method: str, body_length: int) -> bytes:
    """The end of a request head: ``Content-Length`` where one is sent, then the empty line."""
    if sends_content_length(method, body_length):
        return b"Content-Length: %d\r\n\r\n" % body_length
    return b"\r\n"


# --------------------------------------------------------------------------- responses


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head and how its body is framed."""

    #: minor version: 0 for HTTP/1.0, 1 for HTTP/1.1
    minor: int
    status: int
    reason: str
    headers: CIMultiDict[str]
    #: BODY_NONE, BODY_LENGTH, BODY_CHUNKED or BODY_EOF
    framing: int
    #: the body length where framing is BODY_LENGTH (0 for BODY_NONE), else None
    length: int | None
    #: whether the connection may carry another request after this response
    keep_alive: bool


def find_head_end(buf: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """The index just past the empty line that ends a head in ``buf[start:end]`` (lines end
    in CRLF, or a bare LF, RFC 9112 §2.2), or -1 when it has not arrived yet."""
    if end is None:
        end = len(buf)
    i = buf.find(b"\n\r\n", start, end)
    j = buf.find(b"\n\n", start, end if i < 0 else i + 2)
    if j >= 0:
        return j + 2
    return i + 3 if i >= 0 else -1


def _split_lines(block: bytes) -> list[bytes]:
    lines = block.split(b"\n")
    for k, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = lines[k] = line[:-1]
        if b"\r" in line:
            raise _bad("bare CR in the head")
    return lines


def parse_fields(lines: list[bytes], into: CIMultiDict[str], *, what: str = "header") -> None:
    """Parse ``name: value`` lines into ``into`` (values decoded as UTF-8 with
    surrogateescape, like aiohttp). Obsolete line folding, a missing colon, whitespace
    before the colon, or a control character raise a retryable ProtocolError."""
    if len(lines) > MAX_HEADERS:
        raise _bad(f"more than {MAX_HEADERS} {what} fields")
    field = _FIELD.fullmatch
    for line in lines:
        m = field(line)
        if m is None:
            if line[:1] in (b" ", b"\t"):
                raise _bad(f"obsolete line folding in a {what} field")
            raise _bad(f"invalid {what} line {line[:80]!r}")
        value = m.group(2).decode("utf-8", "surrogateescape").strip(" \t")
        into.add(m.group(1).decode("ascii"), value)


def _content_length(values: list[str]) -> int:
    found: int | None = None
    for value in values:
        for part in value.split(","):
            raw = part.strip().encode("utf-8", "surrogateescape")
            if not _DIGITS.fullmatch(raw):
                raise _bad(f"Content-Length is not a decimal number: {value[:40]!r}")
            n = int(raw)
            if found is not None and n != found:
                raise _bad(f"conflicting Content-Length values {found} and {n}")
            found = n
    assert found is not None
    return found


def parse_response_head(head: bytes, *, request_method: str = "GET") -> ResponseHead:
    """Parse a response head (``head`` up to and including its empty line, at most
    :data:`MAX_HEAD` bytes) and decide the body framing for a request of
    ``request_method`` (RFC 9112 §6.3):

    - HEAD requests, 1xx, 204 and 304 answers have no body;
    - ``Transfer-Encoding: chunked`` wins over ``Content-Length`` (the connection is then
      not reused: such a message may be a smuggling attempt); any other transfer coding,
      or one on an HTTP/1.0 answer, is refused;
    - ``Content-Length`` (repeated values must agree) frames the body;
    - otherwise the body runs until the server closes the connection.

    HTTP/1.0 answers, ``Connection: close`` and read-to-EOF bodies are not kept alive.
    """
    if len(head) > MAX_HEAD:
        raise _bad(f"response head longer than {MAX_HEAD} bytes")
    m = _HEAD.fullmatch(head)
    if m is not None:  # the usual case: one regex validates it all
        minor = int(m.group(1))
        status = int(m.group(2))
        raw_reason = m.group(3)
        reason = raw_reason.decode("utf-8", "surrogateescape") if raw_reason else ""
        block = m.group(4).decode("utf-8", "surrogateescape")
        pairs = _FIELDS.findall(block)
        if len(pairs) > MAX_HEADERS:
            raise _bad(f"more than {MAX_HEADERS} header fields")
        if " \r" in block or "\t\r" in block:
            pairs = [(k, v.rstrip(" \t")) for k, v in pairs]
        headers: CIMultiDict[str] = CIMultiDict(pairs)
    else:
        minor, status, reason, headers = _parse_head_slowly(head)
    if status < 100:
        raise _bad(f"invalid status code {status}")

    keep_alive = minor == 1
    conn = headers.getall("Connection", None) if "Connection" in headers else None
    if conn is not None:
        tokens = {t.strip().lower() for v in conn for t in v.split(",")}
        if "close" in tokens:
            keep_alive = False

    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return ResponseHead(minor, status, reason, headers, BODY_NONE, 0, keep_alive)
    te = headers.getall("Transfer-Encoding", None) if "Transfer-Encoding" in headers else None
    if te is not None:
        codings = [t.strip().lower() for v in te for t in v.split(",") if t.strip()]
        if minor == 0:
            raise _bad("Transfer-Encoding in an HTTP/1.0 response")
        if codings != ["chunked"]:
            raise _bad(f"unsupported Transfer-Encoding {', '.join(te)[:80]!r}")
        if "Content-Length" in headers:
            keep_alive = False
        return ResponseHead(minor, status, reason, headers, BODY_CHUNKED, None, keep_alive)
    cl = headers.getall("Content-Length", None)
    if cl is not None:
        v = cl[0]
        if len(cl) == 1 and v.isascii() and v.isdigit() and len(v) <= 19:
            n = int(v)
        else:
            n = _content_length(cl)
        return ResponseHead(minor, status, reason, headers, BODY_LENGTH, n, keep_alive)
    return ResponseHead(minor, status, reason, headers, BODY_EOF, None, False)


def _parse_head_slowly(head: bytes) -> tuple[int, int, str, CIMultiDict[str]]:
    """Line by line: bare-LF line ends, and a precise error for what is malformed."""
    lines = _split_lines(head)
    # the block ends with an empty line (and the split leaves one more empty string)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise _bad("empty response head")
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise _bad(f"invalid status line {lines[0][:80]!r}")
    reason = (m.group(3) or b"").decode("utf-8", "surrogateescape")
    headers: CIMultiDict[str] = CIMultiDict()
    parse_fields(lines[1:], headers)
    return int(m.group(1)), int(m.group(2)), reason, headers


# --------------------------------------------------------------------------- chunked bodies

_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _DONE = range(6)


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder (RFC 9112 §7.1).

    :meth:`feed` takes the next bytes of the body as they arrive, in pieces of any size,
    and returns the payload they hold as views of the given data (no copy) with the
    number of bytes it consumed. Once the last chunk and the trailer section have been
    read, :attr:`done` is true, :attr:`trailers` holds the trailer fields, and bytes after
    the end are left unconsumed. Chunk sizes are hex (at most 16 digits) and may carry
    extensions (ignored); a size line is at most :data:`MAX_CHUNK_LINE` bytes and the
    trailer section at most :data:`MAX_HEAD` bytes and :data:`MAX_HEADERS` fields.
    Malformed framing raises a retryable :class:`~asyncvae.ProtocolError`.
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_lines", "_trailer_size", "trailers")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_lines: list[bytes] = []
        self._trailer_size = 0
        #: trailer fields, once :attr:`done`
        self.trailers: CIMultiDict[str] = CIMultiDict()

    @property
    def done(self) -> bool:
        """Whether the whole body (last chunk and trailers) has been read."""
        return self._state == _DONE

    def _size_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        size, sep, ext = line.partition(b";")
        size = size.rstrip(b" \t")
        if not _HEX.fullmatch(size):
            raise _bad(f"invalid chunk size line {line[:40]!r}")
        if sep and not _CHUNK_EXT.fullmatch(ext):
            raise _bad("control character in a chunk extension")
        n = int(size, 16)
        if n:
            self._remaining = n
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise _bad("bare CR in the trailer section")
        if line:
            self._trailer_lines.append(line)
            if len(self._trailer_lines) > MAX_HEADERS:
                raise _bad(f"more than {MAX_HEADERS} trailer fields")
            return
        parse_fields(self._trailer_lines, self.trailers, what="trailer")
        self._trailer_lines = []
        self._state = _DONE

    def feed(
        self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
    ) -> tuple[list[memoryview], int]:
        """Decode ``data[start:end]``; returns the payload pieces in it (views of ``data``,
        no copy) and the number of bytes consumed (all of them unless the body ended)."""
        mv = data if isinstance(data, memoryview) else memoryview(data)
        flat = None if isinstance(data, memoryview) else data
        n = len(mv) if end is None else end
        pos = start
        out: list[memoryview] = []
        while pos < n:
            state = self._state
            if state == _DATA:
                k = min(self._remaining, n - pos)
                out.append(mv[pos : pos + k])
                pos += k
                self._remaining -= k
                if not self._remaining:
                    self._state = _DATA_CR
            elif state in (_SIZE, _TRAILER):
                # room left for this line (size line) or for the whole trailer section
                if state == _SIZE:
                    room = MAX_CHUNK_LINE - len(self._line)
                else:
                    room = MAX_HEAD - self._trailer_size
                stop = min(n, pos + room)
                if flat is not None:
                    nl = flat.find(b"\n", pos, stop)
                else:  # search a bounded window: never copies more than the limit
                    nl = bytes(mv[pos:stop]).find(b"\n")
                    nl = nl + pos if nl >= 0 else -1
                if nl < 0:
                    if n - pos >= room:
                        raise _bad(
                            "chunk size line too long" if state == _SIZE
                            else f"trailer section longer than {MAX_HEAD} bytes"
                        )
                    self._line += mv[pos:n]
                    if state == _TRAILER:
                        self._trailer_size += n - pos
                    pos = n
                    break
                line = bytes(self._line) + bytes(mv[pos:nl]) if self._line else bytes(mv[pos:nl])
                self._line.clear()
                if state == _SIZE:
                    pos = nl + 1
                    self._size_line(line)
                else:
                    self._trailer_size += nl + 1 - pos
                    pos = nl + 1
                    self._trailer_line(line)
                    if self._state == _DONE:
                        break
            elif state == _DATA_CR:
                b = mv[pos]
                pos += 1
                if b == 13:
                    self._state = _DATA_LF
                elif b == 10:
                    self._state = _SIZE
                else:
                    raise _bad("chunk data not followed by CRLF")
            elif state == _DATA_LF:
                b = mv[pos]
                pos += 1
                if b != 10:
                    raise _bad("chunk data not followed by CRLF")
                self._state = _SIZE
            else:  # _DONE
                break
        return out, pos - start
