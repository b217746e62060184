"""The pure HTTP/1.1 framing helpers of the native transport (``asyncvae.transport._http11``):
request-head builder, response-head parser with its limits and framing rules (RFC 9112),
and the incremental chunked decoder, with hypothesis properties: any split of a valid
body decodes to the same payload and trailers; garbage ends in ProtocolError or a clean
result, never anything else and never a hang."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from asyncvae import InputError, ProtocolError
from asyncvae.transport import _http11 as h

# --------------------------------------------------------------------------- request heads


def test_request_head_is_exact() -> None:
    url = URL("http://127.0.0.1:8080/decode?shape=1&shape=4&a=%2F%20", encoded=True)
    prefix = h.request_head_prefix("POST", url, [("Content-Type", "tensor/binary"), ("Accept", "tensor/binary")])
    assert prefix + h.request_head_end("POST", 12) == (
        b"POST /decode?shape=1&shape=4&a=%2F%20 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8080\r\n"
        b"Content-Type: tensor/binary\r\n"
        b"Accept: tensor/binary\r\n"
        b"Content-Length: 12\r\n\r\n"
    )


def test_request_head_host_and_length_rules() -> None:
    assert h.request_head_prefix("GET", URL("https://example.com/"), []) == (
        b"GET / HTTP/1.1\r\nHost: example.com\r\n"
    )
    assert b"Host: [::1]:8443\r\n" in h.request_head_prefix("GET", URL("https://[::1]:8443/x"), [])
    assert b"Host: example.com\r\n" in h.request_head_prefix("GET", URL("http://example.com:80"), [])
    # a given Host replaces the derived one, once
    head = h.request_head_prefix("GET", URL("http://10.0.0.1/"), [("host", "vae.example")])
    assert head.count(b"Host") + head.count(b"host") == 1 and b"Host: vae.example\r\n" in head
    # GET without a body sends no Content-Length; POST always does
    assert h.request_head_end("GET", 0) == b"\r\n"
    assert h.request_head_end("POST", 0) == b"Content-Length: 0\r\n\r\n"
    assert h.request_head_end("GET", 3) == b"Content-Length: 3\r\n\r\n"


@pytest.mark.parametrize(
    "method,url,headers",
    [
        ("PO ST", "http://h/", []),
        ("POST", "ftp://h/", []),
        ("POST", "http://h/", [("Bad Name", "x")]),
        ("POST", "http://h/", [("X-A", "a\r\nX-Injected: 1")]),
        ("POST", "http://h/", [("X-A", "a\nb")]),
        ("POST", "http://h/", [("X-A", "nul\x00")]),
        ("POST", "http://h/", [("Content-Length", "5")]),
        ("POST", "http://h/", [("transfer-encoding", "chunked")]),
    ],
)
def test_request_head_refuses_what_breaks_framing(method: str, url: str, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(InputError):
        h.request_head_prefix(method, URL(url), headers)


def test_request_target_with_whitespace_is_refused() -> None:
    with pytest.raises(InputError):
        h.request_head_prefix("GET", URL("http://h/a b?c", encoded=True), [])


# --------------------------------------------------------------------------- response heads


def parse(raw: bytes, method: str = "POST") -> h.ResponseHead:
    end = h.find_head_end(raw)
    assert end == len(raw), (end, len(raw))
    return h.parse_response_head(raw, request_method=method)


def test_parse_plain_head() -> None:
    rh = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nshape: [1, 2]\r\nX-Pad:   v  \r\nx-pad: w\r\n\r\n")
    assert (rh.status, rh.reason, rh.minor) == (200, "OK", 1)
    assert rh.framing == h.BODY_LENGTH and rh.length == 12 and rh.keep_alive
    assert rh.headers["SHAPE"] == "[1, 2]"
    assert rh.headers.getall("X-PAD") == ["v", "w"]


def test_bare_lf_heads_and_empty_reason() -> None:
    rh = parse(b"HTTP/1.1 204\nA: b\n\n")
    assert rh.status == 204 and rh.reason == "" and rh.framing == h.BODY_NONE and rh.length == 0


def test_find_head_end() -> None:
    assert h.find_head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n") == -1
    assert h.find_head_end(b"HTTP/1.1 200 OK\r\n\r\nbody\r\n\r\n") == 19
    assert h.find_head_end(b"xxHTTP/1.1 200 OK\r\n\r\n", 2) == 21
    assert h.find_head_end(b"HTTP/1.1 200 OK\r\n\r\n", 0, 18) == -1


@pytest.mark.parametrize(
    "raw,framing,length,keep",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", h.BODY_CHUNKED, None, True),
        # chunked wins over Content-Length, and such a connection is not reused
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", h.BODY_CHUNKED, None, False),
        (b"HTTP/1.1 200 OK\r\n\r\n", h.BODY_EOF, None, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", h.BODY_LENGTH, 3, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n", h.BODY_LENGTH, 3, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Keep-Alive, Close\r\n\r\n", h.BODY_LENGTH, 3, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n", h.BODY_LENGTH, 7, True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n", h.BODY_NONE, 0, True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", h.BODY_NONE, 0, True),
    ],
)
def test_framing_rules(raw: bytes, framing: int, length: int | None, keep: bool) -> None:
    rh = parse(raw)
    assert (rh.framing, rh.length, rh.keep_alive) == (framing, length, keep)


def test_head_request_has_no_body() -> None:
    rh = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", method="HEAD")
    assert rh.framing == h.BODY_NONE and rh.length == 0 and rh.headers["Content-Length"] == "99"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",  # conflicting
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nX-A : a\r\n\r\n",  # space before the colon
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_bad_heads_are_retryable_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as ei:
        h.parse_response_head(raw)
    assert ei.value.retryable


def test_head_limits() -> None:
    many = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(h.MAX_HEADERS + 1)) + b"\r\n"
    with pytest.raises(ProtocolError, match="more than 100"):
        h.parse_response_head(many)
    ok = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(h.MAX_HEADERS)) + b"\r\n"
    assert len(h.parse_response_head(ok).headers) == h.MAX_HEADERS
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * h.MAX_HEAD + b"\r\n\r\n"
    with pytest.raises(ProtocolError, match="longer than"):
        h.parse_response_head(big)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_garbage_heads_raise_only_protocol_error(raw: bytes) -> None:
    end = h.find_head_end(raw)
    head = raw if end < 0 else raw[:end]
    try:
        h.parse_response_head(b"HTTP/1.1 200 OK\r\n" + head)
    except ProtocolError:
        pass
    try:
        h.parse_response_head(head)
    except ProtocolError:
        pass


# --------------------------------------------------------------------------- chunked bodies

_ext = st.lists(
    st.tuples(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.from_regex(r"[a-z0-9]{0,5}", fullmatch=True)),
    max_size=2,
)
_trailers = st.lists(
    st.tuples(st.from_regex(r"X-[A-Za-z]{1,6}", fullmatch=True), st.from_regex(r"[ -~]{0,10}", fullmatch=True)),
    max_size=3,
)


def encode_chunked(
    chunks: list[bytes], exts: list[list[tuple[str, str]]], trailers: list[tuple[str, str]], *, lf: bool = False
) -> bytes:
    eol = b"\n" if lf else b"\r\n"
    out = bytearray()
    for i, c in enumerate(chunks):
        if not c:
            continue
        ext = b"".join(b";%s=%s" % (k.encode(), v.encode()) for k, v in exts[i % len(exts)]) if exts else b""
        out += b"%x%s%s%s%s" % (len(c), ext, eol, c, eol)
    out += b"0" + eol
    for k, v in trailers:
        out += f"{k}: {v}".encode() + eol
    out += eol
    return bytes(out)


def decode_all(data: bytes, cuts: list[int], *, as_view: bool) -> tuple[bytes, h.ChunkedDecoder, int]:
    dec = h.ChunkedDecoder()
    out = bytearray()
    consumed = 0
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(bounds):
        piece: bytes | memoryview = memoryview(data)[a:b] if as_view else data[a:b]
        pieces, used = dec.feed(piece)
        for p in pieces:
            out += p
        consumed += used
        if dec.done:
            break
    return bytes(out), dec, consumed


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=8),
    exts=st.lists(_ext, max_size=3),
    trailers=_trailers,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    lf=st.booleans(),
    as_view=st.booleans(),
)
def test_any_split_decodes_the_same(
    chunks: list[bytes], exts: list[list[tuple[str, str]]], trailers: list[tuple[str, str]],
    cuts: list[int], lf: bool, as_view: bool,
) -> None:
    wire = encode_chunked(chunks, exts, trailers, lf=lf)
    data = wire + b"NEXT"  # bytes after the body stay unconsumed
    body, dec, consumed = decode_all(data, cuts, as_view=as_view)
    assert dec.done
    assert body == b"".join(chunks)
    assert consumed == len(wire)
    assert list(dec.trailers.items()) == [(k, v.strip(" \t")) for k, v in trailers]


def test_decoder_with_offsets_into_a_buffer() -> None:
    buf = bytearray(b"JUNK" + b"3;x=y\r\nabc\r\n0\r\n\r\n" + b"TAIL")
    dec = h.ChunkedDecoder()
    pieces, used = dec.feed(buf, 4, len(buf) - 4)
    assert [bytes(p) for p in pieces] == [b"abc"] and used == len(buf) - 8 and dec.done
    dec = h.ChunkedDecoder()
    pieces, used = dec.feed(buf, 4, 6)  # only "3;"
    assert pieces == [] and used == 2 and not dec.done
    pieces, used = dec.feed(buf, 6, len(buf))
    assert [bytes(p) for p in pieces] == [b"abc"] and dec.done


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\n",
        b"-1\r\n",
        b"\r\n",
        b"5\r\nhelloXX",  # no CRLF after the data
        b"5\r\nhello3\r\nabc\r\n0\r\n\r\n",  # no CRLF after the data, valid after that
        b"5\r\nhello\rX",
        b"1" * 17 + b"\r\n",  # more than 16 hex digits
        b"5;" + b"e" * h.MAX_CHUNK_LINE + b"\r\n",  # size line too long
        b"5;a\x01b\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\n folded: x\r\n\r\n",
    ],
)
def test_bad_chunked_framing(data: bytes) -> None:
    dec = h.ChunkedDecoder()
    with pytest.raises(ProtocolError) as ei:
        dec.feed(data)
        dec.feed(b"\r\n" * 4)
    assert ei.value.retryable


def test_chunked_limits_hold_across_pieces() -> None:
    dec = h.ChunkedDecoder()
    with pytest.raises(ProtocolError, match="too long"):
        for _ in range(h.MAX_CHUNK_LINE):
            dec.feed(b"0")  # a size line that never ends
    dec = h.ChunkedDecoder()
    dec.feed(b"0\r\n")
    with pytest.raises(ProtocolError, match="trailer section"):
        for _ in range(h.MAX_HEAD // 1000 + 2):
            dec.feed(b"X-A: " + b"a" * 995 + b"\r\n")
    dec = h.ChunkedDecoder()
    dec.feed(b"0\r\n")
    with pytest.raises(ProtocolError, match="more than 100"):
        dec.feed(b"".join(b"X-%d: v\r\n" % i for i in range(h.MAX_HEADERS + 1)))


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.lists(st.sampled_from([b"0", b"5", b"a", b";x", b"\r", b"\n", b"\r\n", b"hello", b":", b" "]), max_size=60).map(b"".join),
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_garbage_chunked_ends_cleanly(data: bytes, cuts: list[int]) -> None:
    """Garbage either decodes (it happened to be valid), waits for more, or raises
    ProtocolError; every feed returns, having consumed within its input."""
    dec = h.ChunkedDecoder()
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for a, b in itertools.pairwise(bounds):
            pieces, used = dec.feed(data[a:b])
            assert 0 <= used <= b - a
            assert sum(len(p) for p in pieces) <= used
            if dec.done:
                break
    except ProtocolError as e:
        assert e.retryable


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX: a" + b" " * 60_000 + b"b\x01\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a" + b" \t" * 30_000 + b"b\r\n\r\n",
        b"HTTP/1.1 200 " + b" " * 60_000 + b"\x01\r\n\r\n",
        b"HTTP/1.1 200 OK\nX: a" + b" " * 60_000 + b"b\x01\n\n",
    ],
)
def test_hostile_whitespace_does_not_backtrack(head: bytes) -> None:
    """A 60 KB run of whitespace inside a field: parsed (or refused) in linear time; a
    backtracking pattern took ~40 s of CPU here."""
    import time

    t0 = time.process_time()
    with contextlib.suppress(ProtocolError):
        h.parse_response_head(head)
    assert time.process_time() - t0 < 5
