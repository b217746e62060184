"""Token safety and TLS: the token goes to the endpoint's own origin only, never into
reprs, errors or logs; TLS verification is on unless explicitly turned off."""

from __future__ import annotations

import logging
import ssl

import pytest
import torch
from aiohttp import web

import asyncvae
from asyncvae import Client, Retry
from asyncvae.server import ServerConfig, start_server

TOKEN = "hf_TOPSECRET_1234567890"
PT = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}


class Recorder:
    """A plain aiohttp server that records the Authorization header of each request and
    either redirects (307) to ``target`` or proxies to a real endpoint."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.target: str | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Authorization"))
        await request.read()
        if self.target:
            raise web.HTTPTemporaryRedirect(self.target + "?" + request.query_string)
        return web.json_response({"error": "nope"}, status=400)

    async def start(self) -> Recorder:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    async def close(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_token_sent_only_to_own_origin_not_after_cross_host_redirect(caplog):
    caplog.set_level(logging.DEBUG)
    other = await Recorder().start()  # another origin (different port)
    front = await Recorder().start()
    front.target = other.url
    try:
        async with Client(front.url, token=TOKEN, retry=Retry.none()) as c:
            with pytest.raises(asyncvae.EndpointError) as ei:
                await c.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16), **PT)
            text = f"{ei.value!r} {ei.value} {c!r} {c.stats.snapshot()}"
    finally:
        await front.close()
        await other.close()
    assert front.seen == [f"Bearer {TOKEN}"]
    assert other.seen == [None]  # followed, but without the token
    assert TOKEN not in text
    assert TOKEN not in caplog.text


async def test_token_kept_on_same_origin_redirect():
    rec = await Recorder().start()
    rec.target = rec.url + "moved"  # same scheme, host and port
    try:
        async with Client(rec.url, token=TOKEN, retry=Retry.none()) as c:
            with pytest.raises(asyncvae.ProtocolError, match="too many redirects"):
                await c.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16), **PT)
    finally:
        await rec.close()
    assert len(rec.seen) == 6 and set(rec.seen) == {f"Bearer {TOKEN}"}


async def test_hf_token_env_is_used_and_false_disables(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rec = await Recorder().start()
    try:
        for token, expected in ((None, f"Bearer {TOKEN}"), (False, None)):
            async with Client(rec.url, token=token, retry=Retry.none()) as c:
                with pytest.raises(asyncvae.EndpointError):
                    await c.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16), **PT)
            assert rec.seen[-1] == expected
    finally:
        await rec.close()


@pytest.fixture
async def https_server():
    """The reference server behind real TLS, with a certificate from a throwaway CA
    (``trustme``): yields ``(url, ca)``."""
    import trustme

    from asyncvae.server import create_app

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    runner = web.AppRunner(create_app(ServerConfig()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}/", ca
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("transport", ["native", "aiohttp"])
async def test_tls_verified_by_default_against_a_real_https_server(https_server, transport):
    url, ca = https_server
    z = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    # an untrusted (self-signed CA) certificate: refused, not retried
    async with Client(url, retry=Retry(attempts=3, backoff_base=0.001), transport=transport) as c:
        with pytest.raises(asyncvae.TransportError) as ei:
            await c.decode(z, **PT)
    assert ei.value.kind == "tls" and not ei.value.retryable
    assert "certificate" in str(ei.value).lower()
    assert c.stats.requests == 1
    # trusting the CA through an SSLContext: verified, and it works
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with Client(url, verify=trusting, token=TOKEN, transport=transport) as c:
        out = await c.decode(z, **PT)
    assert out.shape == (1, 64, 64, 3)
    # verification off: works, with a warning that says what that means
    with pytest.warns(UserWarning, match="verification is off"):
        c = Client(url, verify=False, transport=transport)
    async with c:
        assert (await c.decode(z, **PT)).shape == (1, 64, 64, 3)


async def test_tls_failure_is_a_clear_non_retryable_error():
    # a plain-HTTP server spoken to over https: the TLS handshake fails
    real = await start_server(ServerConfig())
    try:
        url = real.url.replace("http://", "https://")
        async with Client(url, retry=Retry(attempts=3, backoff_base=0.001)) as c:
            with pytest.raises((asyncvae.TransportError, asyncvae.RetryExhausted)) as ei:
                await c.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16), **PT)
        err = ei.value
        assert isinstance(err, asyncvae.TransportError) and err.kind == "tls", repr(err)
        assert "TLS" in str(err)
    finally:
        await real.close()
