"""The bad-input catalogue of docs/errors.md: one test row per documented case, asserting
the exception type and a fragment of the real message. Keep the two in step: every
``CASES`` id appears in the doc's table."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from aiohttp import web
from PIL import Image

import asyncvae
from asyncvae import (
    Client,
    EndpointError,
    InputError,
    Limits,
    ProtocolError,
    Retry,
    RetryExhausted,
    Timeout,
    TransportError,
    protocol,
)
from asyncvae.server import Faults, LocalServer, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
PT = {"output_type": "pt", "return_type": "pt"}
PT_U8 = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}
LAT = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
MAX_PIXELS = 1 << 16  # the module server's max_output_pixels: 256x256
MAX_BODY = 100_000
#: No retries at all. (``Retry.none()`` still retries 503 for ``unavailable_patience``:
#: see test_retry_none_does_not_retry_503.)
NO_RETRY = Retry(attempts=1, unavailable_patience=0)


@pytest.fixture(scope="module")
def srv() -> Iterator[LocalServer]:
    with LocalServer(ServerConfig(max_output_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY)) as s:
        yield s


class OddServer:
    """An aiohttp.web app answering fixed (status, content type, body) per path."""

    ROUTES: ClassVar[dict[str, tuple[int, str, bytes]]] = {
        "json400": (
            400,
            "application/json",
            b'{"error": "latents have 3 channels, model needs 4"}',
        ),
        "json500": (500, "application/json", b'{"error": "CUDA out of memory"}'),
        "html502": (
            502,
            "text/html",
            b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
            b"<hr>nginx</body></html>",
        ),
        "empty404": (404, "text/plain", b""),
        "empty503": (503, "text/plain", b""),
        "notimage": (200, "image/jpeg", b"\xff\xd8 this is not really a jpeg"),
        "bigimage": (200, "image/png", b""),  # filled in below: a PNG declaring 100000x100000
        "stall": (200, "image/png", b""),
    }

    def __init__(self) -> None:
        import struct
        import zlib

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data))
            )

        def png(w: int, h: int) -> bytes:  # a tiny PNG that declares w x h
            return (
                b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                + chunk(b"IEND", b"")
            )

        self.routes = dict(
            self.ROUTES,
            bigimage=(200, "image/png", png(1000, 1000)),
            bomb=(200, "image/png", png(100000, 100000)),
        )
        self.loop = asyncio.new_event_loop()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        name = request.match_info["name"]
        if name == "stall":
            await asyncio.sleep(5)
        status, ctype, body = self.routes[name]
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    def __enter__(self) -> OddServer:
        ready = threading.Event()

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/{name}", self.handle)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def odd() -> Iterator[OddServer]:
    with OddServer() as s:
        yield s


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


async def decode(
    url: str,
    tensor: Any = LAT,
    *,
    retry: Retry | None = None,
    limits: Limits | None = None,
    timeout: Timeout | None = None,
    **opts: Any,
) -> Any:
    async with Client(url, retry=retry or NO_RETRY, limits=limits, timeout=timeout) as c:
        return await c.decode(tensor, **opts)


async def encode(url: str, image: Any, **opts: Any) -> Any:
    async with Client(url, retry=NO_RETRY) as c:
        return await c.encode(image, **opts)


def png_of(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (10, 20, 30))


# id -> (call(urls) -> result or awaitable, exception type, message fragment).
# ``urls`` has "srv" (the reference server) and "odd" (fixed odd answers).
Case = tuple[Callable[[dict[str, str]], Any], type[BaseException], str]
CASES: dict[str, Case] = {
    # ---- tensors (decode input)
    "rank-2": (
        lambda u: decode(u["srv"], torch.zeros(8, 8)),
        InputError,
        "latents must be 4-D [B,C,H,W] (image), 3-D [B,seq,C] (packed, with height/width) or 5-D",
    ),
    "rank-6": (
        lambda u: decode(u["srv"], torch.zeros(1, 1, 1, 1, 1, 1)),
        InputError,
        "got 6-D shape [1, 1, 1, 1, 1, 1]",
    ),
    "packed-without-size": (
        lambda u: decode(u["srv"], torch.zeros(1, 16, 64)),
        InputError,
        "`height` and `width` required for packed latents",
    ),
    "dtype-float64": (
        lambda u: decode(u["srv"], torch.zeros(1, 4, 8, 8, dtype=torch.float64)),
        InputError,
        "latents of dtype float64 can't be sent; convert them first",
    ),
    "dtype-int": (
        lambda u: decode(u["srv"], torch.zeros(1, 4, 8, 8, dtype=torch.int8)),
        InputError,
        "latents of dtype int8 can't be sent",
    ),
    "empty-tensor": (
        lambda u: decode(u["srv"], torch.zeros(1, 4, 0, 8)),
        InputError,
        "latents are empty (shape [1, 4, 0, 8]); nothing to decode",
    ),
    "not-a-tensor": (
        lambda u: decode(u["srv"], [[1.0, 2.0]]),
        InputError,
        "tensor must be a torch.Tensor of latents, got list",
    ),
    # ---- options
    "output-type": (
        lambda u: decode(u["srv"], output_type="webp"),
        InputError,
        "output_type='webp' is not supported; use one of 'pil', 'pt', 'mp4'",
    ),
    "image-format": (
        lambda u: decode(u["srv"], image_format="gif"),
        InputError,
        "image_format='gif' is not supported",
    ),
    "pt-to-pil-without-processor": (
        lambda u: decode(u["srv"], output_type="pt"),
        InputError,
        "`processor` is required",
    ),
    "return-mp4-without-mp4": (
        lambda u: decode(u["srv"], return_type="mp4"),
        InputError,
        "return_type='mp4' needs output_type='mp4'",
    ),
    "mp4-of-image-latents": (
        lambda u: decode(u["srv"], output_type="mp4"),
        InputError,
        "output_type='mp4' needs 5-D video latents, got 4-D",
    ),
    "height-without-width": (
        lambda u: decode(u["srv"], height=64),
        InputError,
        "pass both height and width",
    ),
    "scaling-nan": (
        lambda u: decode(u["srv"], scaling_factor=float("nan")),
        InputError,
        "scaling_factor=nan must be a finite number or None",
    ),
    "scaling-string": (
        lambda u: decode(u["srv"], scaling_factor="0.18215"),
        InputError,
        "scaling_factor='0.18215' must be a finite number or None",
    ),
    "tensor-type-unknown": (
        lambda u: decode(u["srv"], input_tensor_type="hex", **PT),
        InputError,
        "input_tensor_type='hex' is not supported; use 'binary'",
    ),
    "on-error-unknown": (
        lambda u: _drain_many(u["srv"], on_error="ignore"),
        InputError,
        "on_error='ignore' must be 'yield' or 'raise'",
    ),
    # ---- unknown keywords
    "decode-unknown-keyword": (
        lambda u: decode(u["srv"], outputtype="pt"),
        InputError,
        "unknown decode option(s) outputtype; valid: do_scaling, height",
    ),
    "encode-unknown-keyword": (
        lambda u: encode(u["srv"], png_of(16, 16), scale=0.18),
        InputError,
        "unknown encode option(s) scale; valid: scaling_factor, shift_factor",
    ),
    "sync-unknown-keyword": (
        lambda u: asyncvae.remote_decode(u["srv"], LAT, outputtype="pt"),
        TypeError,
        "unexpected keyword argument 'outputtype'",
    ),
    "sync-batch-unknown-keyword": (
        lambda u: asyncvae.remote_decode_batch(u["srv"], [LAT], outputtype="pt"),
        InputError,
        "unknown decode option(s) outputtype",
    ),
    "configure-unknown-keyword": (
        lambda u: asyncvae.configure(retries=3),
        InputError,
        "unknown option(s) retries; valid: headers, limits, retry, timeout, token, transport, verify",
    ),
    # ---- configuration values
    "limits-zero": (
        lambda u: Limits(max_concurrency=0),
        InputError,
        "Limits.max_concurrency=0 must be a positive number",
    ),
    "retry-zero": (
        lambda u: Retry(attempts=0),
        InputError,
        "Retry.attempts=0 must be an int >= 1 (1 means no retry)",
    ),
    "timeout-negative": (
        lambda u: Timeout(read=-1),
        InputError,
        "Timeout.read=-1 must be a positive number or None",
    ),
    "limits-wrong-type": (
        lambda u: Client(u["srv"], limits=5),
        InputError,
        "limits must be an asyncvae.Limits, got int",
    ),
    # ---- images (encode input)
    "encode-not-an-image": (
        lambda u: encode(u["srv"], "cat.png"),
        InputError,
        "image must be a PIL.Image.Image or a torch.Tensor, got str",
    ),
    "encode-channels": (
        lambda u: encode(u["srv"], torch.zeros(1, 4, 16, 16)),
        InputError,
        "image tensor must be [3,H,W] or [B,3,H,W] (channels first), got shape [1, 4, 16, 16]",
    ),
    "encode-not-multiple-of-8": (
        lambda u: encode(u["srv"], torch.zeros(1, 3, 10, 16)),
        InputError,
        "image tensor height and width must be multiples of 8, got 10x16",
    ),
    "encode-empty": (
        lambda u: encode(u["srv"], torch.zeros(0, 3, 16, 16)),
        InputError,
        "image tensor is empty",
    ),
    "encode-dtype": (
        lambda u: encode(u["srv"], torch.zeros(1, 3, 16, 16, dtype=torch.int64)),
        InputError,
        "image tensors of dtype int64 can't be sent",
    ),
    "encode-tiny-image": (
        lambda u: encode(u["srv"], png_of(4, 4)),
        InputError,
        "image is 4x4; it must be at least 8x8 pixels",
    ),
    # ---- endpoints
    "url-scheme": (
        lambda u: Client("ftp://example.com/vae"),
        InputError,
        "endpoint 'ftp://example.com/vae' is not an http(s) URL; expected e.g.",
    ),
    "url-garbage": (
        lambda u: Client("not a url"),
        InputError,
        "endpoint 'not a url' is not an http(s) URL",
    ),
    "url-wrong-type": (
        lambda u: Client(8000),
        InputError,
        "endpoints must be an http(s) URL string or a list of them, got int",
    ),
    "url-none-given": (lambda u: Client([]), InputError, "Client needs at least one endpoint URL"),
    "url-sync": (
        lambda u: asyncvae.remote_decode("localhost:8000", LAT),
        InputError,
        "endpoint 'localhost:8000' is not an http(s) URL",
    ),
    "connection-refused": (
        lambda u: decode(
            f"http://127.0.0.1:{free_port()}/", retry=Retry(attempts=2, backoff_base=0.001)
        ),
        RetryExhausted,
        "retries exhausted after 2 attempt(s); last error: TransportError: cannot connect to 127.0.0.1:",
    ),
    "tls-failure": (
        lambda u: decode(u["srv"].replace("http://", "https://")),
        TransportError,
        "TLS failure talking to 127.0.0.1",
    ),
    "read-timeout": (
        lambda u: decode(u["odd"] + "stall", timeout=Timeout(read=0.2)),
        RetryExhausted,
        "last error: TransportError: timed out talking to 127.0.0.1:",
    ),
    # ---- the server says no
    "server-output-too-large": (
        lambda u: decode(u["srv"], torch.zeros(1, 4, 64, 64, dtype=torch.float16), **PT),
        EndpointError,
        "HTTP 413 from http://127.0.0.1:",
    ),
    "server-body-too-large": (
        lambda u: decode(u["srv"], torch.zeros(1, 4, 128, 128), **PT),
        EndpointError,
        f"request body of 262144 bytes is over max_body_bytes={MAX_BODY}",
    ),
    "http-400-json": (
        lambda u: decode(u["odd"] + "json400"),
        EndpointError,
        "HTTP 400 from http://127.0.0.1:",
    ),
    "http-500-json": (
        lambda u: decode(u["odd"] + "json500"),
        RetryExhausted,
        "retries exhausted after 1 attempt(s); last error: EndpointError: HTTP 500 from",
    ),
    "http-502-html": (
        lambda u: decode(u["odd"] + "html502"),
        RetryExhausted,
        "last error: EndpointError: HTTP 502 from http://127.0.0.1:",
    ),
    "http-404-empty": (
        lambda u: decode(u["odd"] + "empty404"),
        EndpointError,
        "HTTP 404 with an empty body",
    ),
    "http-503-empty": (
        lambda u: decode(u["odd"] + "empty503"),
        RetryExhausted,
        "HTTP 503 with an empty body",
    ),
    "server-unreadable-image": (
        lambda u: _send_raw_encode(u["srv"], b"GIF89a not really"),
        EndpointError,
        "body is not a readable image (detected type: gif, 17 bytes)",
    ),
    # ---- the answer is wrong
    "answer-not-an-image": (
        lambda u: decode(u["odd"] + "notimage"),
        ProtocolError,
        "response body (28 bytes, looks like jpeg) is not a readable image: no image format recognised",
    ),
    "answer-image-over-limit": (
        lambda u: decode(u["odd"] + "bigimage", limits=Limits(max_response_bytes=300_000)),
        ProtocolError,
        "response image is 1000x1000, over the 100000-pixel limit implied by "
        "Limits.max_response_bytes; refusing to decode it",
    ),
    "answer-decompression-bomb": (
        lambda u: decode(u["odd"] + "bomb"),
        ProtocolError,
        "is not a readable image: Image size (10000000000 pixels) exceeds limit",
    ),
    "answer-over-max-response-bytes": (
        lambda u: decode(u["srv"], limits=Limits(max_response_bytes=1000), **PT),
        ProtocolError,
        "over the client's max_response_bytes=1000",
    ),
}


async def _drain_many(url: str, **kw: Any) -> list[Any]:
    async with Client(url) as c:
        return [x async for x in c.decode_many([LAT], **kw, **PT)]


async def _send_raw_encode(url: str, body: bytes) -> Any:
    """What ``remote_encode`` can't send: bytes that are no image (as another client might),
    posted through the public transport seam; the server's answer becomes the error the
    client would raise for it."""
    from yarl import URL

    from asyncvae.transport import Request
    from asyncvae.transport.native import NativeTransport

    t = NativeTransport()
    try:
        async with await t.send(Request("POST", URL(url), (), body)) as resp:
            text = await resp.read(1 << 16)
            raise asyncvae.EndpointError(protocol.error_body(resp.status, text), status=resp.status, url=url)
    finally:
        await t.aclose()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_catalogue(case: str, srv: LocalServer, odd: OddServer) -> None:
    call, etype, fragment = CASES[case]
    urls = {"srv": srv.url, "odd": odd.url}
    with pytest.raises(etype) as ei:
        result = await asyncio.to_thread(call, urls)  # sync calls may not run on this loop
        if asyncio.iscoroutine(result):
            await result
    assert fragment in str(ei.value), str(ei.value)


def test_catalogue_is_documented() -> None:
    doc = (ROOT / "docs" / "errors.md").read_text()
    missing = [c for c in CASES if f"`{c}`" not in doc]
    assert not missing, f"cases without a row in docs/errors.md: {missing}"


# ---- details of some rows


async def test_http_errors_keep_the_diffusers_contract(odd: OddServer) -> None:
    """``except RuntimeError`` works and ``args[0]`` is the JSON body or a status/text dict."""
    cases = {
        "json400": {"error": "latents have 3 channels, model needs 4"},
        "json500": {"error": "CUDA out of memory"},
        "html502": {
            "error": "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
            "<hr>nginx</body></html>",
            "status": 502,
        },
        "empty404": {"error": "HTTP 404 with an empty body", "status": 404},
        "empty503": {"error": "HTTP 503 with an empty body", "status": 503},
    }
    for name, body in cases.items():
        with pytest.raises(RuntimeError) as ei:
            await decode(odd.url + name)
        e = ei.value
        assert e.args[0] == body, (name, e.args)
        status = int(e.status)
        assert (
            status
            == {"json400": 400, "json500": 500, "html502": 502, "empty404": 404, "empty503": 503}[
                name
            ]
        )
        # 4xx fail at once; 5xx were retryable, so Retry.none() reports exhaustion of its one attempt
        assert isinstance(e, EndpointError if status < 500 else RetryExhausted)
        assert isinstance(getattr(e, "last", e), EndpointError)


async def test_connection_refused_wraps_a_transport_error() -> None:
    with pytest.raises(RetryExhausted) as ei:
        await decode(
            f"http://127.0.0.1:{free_port()}/", retry=Retry(attempts=2, backoff_base=0.001)
        )
    last = ei.value.last
    assert isinstance(last, TransportError) and last.kind == "connection" and last.retryable
    assert ei.value.attempts == 2 and ei.value.status is None


async def test_server_limits_answer_413_with_the_server_message(srv: LocalServer) -> None:
    with pytest.raises(EndpointError) as ei:
        await decode(srv.url, torch.zeros(1, 4, 64, 64, dtype=torch.float16), **PT)
    assert ei.value.status == 413 and not ei.value.retryable
    assert ei.value.args[0] == {
        "error": f"the decoded output (1x1x512x512) is 262144 pixels, over this server's "
        f"max_output_pixels={MAX_PIXELS}; send smaller batches or sizes"
    }


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_nan_and_inf_latents_are_sent_as_is(srv: LocalServer, value: float) -> None:
    """Decision: non-finite latents are not checked client-side (a scan would cost a pass
    over every tensor, and NaN can be deliberate); they go to the endpoint unchanged."""
    lat = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    lat[0, 0, 0, 0] = value
    assert bytes(protocol.tensor_body(lat)) == lat.numpy().tobytes()
    out = await decode(srv.url, lat, **PT)
    assert out.shape == (1, 3, 64, 64)


async def test_non_contiguous_tensor_is_sent_by_its_values(srv: LocalServer) -> None:
    base = torch.randn(1, 8, 8, 4).to(torch.float16)
    lat = base.permute(0, 3, 1, 2)
    assert not lat.is_contiguous()
    assert torch.equal(
        await decode(srv.url, lat, **PT_U8), await decode(srv.url, lat.contiguous(), **PT_U8)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_tensor_is_copied_to_cpu(srv: LocalServer) -> None:
    lat = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    assert torch.equal(
        await decode(srv.url, lat.cuda(), **PT_U8), await decode(srv.url, lat, **PT_U8)
    )


def test_deprecated_base64_warns_and_works(srv: LocalServer) -> None:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = asyncio.run(decode(srv.url, input_tensor_type="base64", **PT))
    assert out.shape == (1, 3, 64, 64)
    assert any(issubclass(x.category, FutureWarning) and "deprecated" in str(x.message) for x in w)


async def test_retry_none_does_not_retry_503(odd: OddServer) -> None:
    async with Client(odd.url + "empty503", retry=Retry.none()) as c:
        with pytest.raises(RetryExhausted) as ei:
            await asyncio.wait_for(c.decode(LAT), 3)
    assert ei.value.attempts == 1


async def test_retry_after_fault_is_not_an_error(make_server: Callable[..., LocalServer]) -> None:
    """429 + Retry-After is retried (not in the table: it is no error unless retries run out)."""
    s = make_server(faults=Faults(fault_429=1.0, retry_after=0.01))
    with pytest.raises(RetryExhausted) as ei:
        await decode(s.url, retry=Retry(attempts=2), **PT)
    assert ei.value.status == 429 and "429 Too Many Requests" in str(ei.value)


# ---- command line


def _cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from asyncvae.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def test_cli_missing_input_path_subprocess(tmp_path: Path) -> None:
    """The documented command, as a user runs it: one line on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "asyncvae",
            "encode",
            "/nonexistent",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert p.returncode == 1
    assert p.stderr.strip() == "asyncvae encode: error: input path '/nonexistent' does not exist"
    assert "Traceback" not in p.stderr + p.stdout


@pytest.mark.parametrize(
    "argv, rc, fragment",
    [
        (
            ["decode", "/nonexistent", "--out", "{tmp}/out"],
            1,
            "asyncvae decode: error: input path '/nonexistent' does not exist",
        ),
        (
            ["encode", "{tmp}/images", "--out", "{tmp}/file/out"],
            1,
            "asyncvae encode: error: output folder '{tmp}/file/out' is not writable: Not a directory",
        ),
        (
            ["encode", "--demo", "--out", "{tmp}/file"],
            1,
            "asyncvae encode: error: cannot write demo images into '{tmp}/file'",
        ),
        (
            ["encode", "{tmp}/file", "--out", "{tmp}/out"],
            1,
            "asyncvae encode: error: {tmp}/file: unsupported input",
        ),
        (
            ["encode", "{tmp}/images", "--out", "{tmp}/out", "--endpoint", "ftp://x/"],
            1,
            "asyncvae encode: error: endpoint 'ftp://x/' is not an http(s) URL",
        ),
        (
            ["encode", "{tmp}/images"],
            2,
            "asyncvae encode: error: the following arguments are required: -o/--out",
        ),
        (
            ["serve", "--fault-503", "2"],
            2,
            "asyncvae serve: error: argument --fault-503: '2' must be in [0, 1]",
        ),
    ],
    ids=[
        "decode-missing-input",
        "encode-unwritable-out",
        "demo-unwritable-out",
        "encode-unsupported-input",
        "encode-bad-endpoint",
        "encode-missing-out",
        "serve-bad-probability",
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], rc: int, fragment: str
) -> None:
    (tmp_path / "images").mkdir()
    png_of(16, 16).save(tmp_path / "images" / "a.png")
    (tmp_path / "file").write_text("a regular file, not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got_rc, err = _cli(*argv, capsys=capsys)
    assert got_rc == rc
    assert fragment.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err
    if rc == 1:
        assert len(err.strip().splitlines()) == 1, err


def test_cli_unreachable_endpoint_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    png_of(16, 16).save(tmp_path / "images" / "a.png")
    rc, err = _cli(
        "encode",
        str(tmp_path / "images"),
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--retries",
        "1",
        "--endpoint",
        f"http://127.0.0.1:{free_port()}/",
        capsys=capsys,
    )
    assert rc == 3
    assert "asyncvae encode: error: 1 item(s) failed (listed in" in err and "Traceback" not in err
    assert "cannot connect" in (tmp_path / "out" / "failures.jsonl").read_text()
