"""Operating the server: dynamic batching, readiness, overload, auth, admin routes,
Prometheus metrics, the access log and graceful shutdown — all over real HTTP on
127.0.0.1 (requests, aiohttp, raw sockets, and the project's client for auth), with
gates instead of sleeps wherever an order of events matters."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import numpy as np
import pytest
import requests
import torch
from conftest import ServeProcess
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import assert_json_error, decode_params, post_decode, post_encode, read_tensor

import asyncvae
from asyncvae import protocol as P
from asyncvae.errors import InputError
from asyncvae.server import BuiltinVAE, Faults, LocalServer, ServerConfig, start_server
from asyncvae.server.auth import bearer_matches

TOKEN = "s3cret-token-for-tests"
U8 = {"output_type": "pt", "partial_postprocess": True, "return_type": "pt"}


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond`` until true (no timing assertion: the timeout only stops a hang)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class GatedVAE(BuiltinVAE):
    """The built-in model, but every decode waits for ``gate`` (a request can be held
    in service for as long as a test needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.gate.wait(60):
            raise RuntimeError("gate never opened")
        return super().decode(latents)


async def post_many(url: str, tensors: list[torch.Tensor], **headers: str) -> list[tuple[int, bytes]]:
    """POST every latent at once (one connection each); returns (status, body) in order."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(z: torch.Tensor) -> tuple[int, bytes]:
            params = decode_params(z.shape, P.dtype_name(z.dtype), "pt")
            h = {"Accept": P.CONTENT_TYPE_TENSOR, **headers}
            async with s.post(url, params=params, data=bytes(P.tensor_body(z)), headers=h) as r:
                return r.status, await r.read()

        return list(await asyncio.gather(*(one(z) for z in tensors)))


def as_tensor(body: bytes, like: torch.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(body), dtype=like.dtype).reshape(like.shape)


def headers_only(url: str, path_query: str, content_length: int, extra: str = "") -> tuple[int, str]:
    """Send a POST's headers announcing ``content_length`` body bytes but send no body;
    returns the status and text the server answers anyway (it must not wait to read)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(
            f"POST {path_query} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: tensor/binary\r\n"
            f"Content-Length: {content_length}\r\n{extra}\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), (head + b"\n" + body).decode("latin-1")


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --------------------------------------------------------------------------- batching


async def test_same_shape_requests_share_one_forward_pass(make_server: Any) -> None:
    srv = make_server(max_batch=8, batch_wait_ms=30_000)  # a full batch runs at once
    zs = [torch.randn(1, 4, 8, 8) for _ in range(8)]
    answers = await post_many(srv.url, zs)
    assert [s for s, _ in answers] == [200] * 8
    vae = BuiltinVAE()
    for z, (_, body) in zip(zs, answers, strict=True):  # each gets its own slice back
        torch.testing.assert_close(as_tensor(body, torch.empty(1, 3, 64, 64)), vae.decode(z))
    s = srv.stats()
    assert s["batches"] == 1 and s["batch_sizes"] == {"8": 1}


async def test_batches_never_mix_shapes_and_count_items(make_server: Any) -> None:
    srv = make_server(max_batch=4, batch_wait_ms=30_000)
    a = [torch.randn(1, 4, 8, 8) for _ in range(4)]
    b = [torch.randn(2, 4, 4, 4) for _ in range(2)]  # 2 items each: two fill a batch of 4
    answers = await post_many(srv.url, [*a, *b])
    assert [s for s, _ in answers] == [200] * 6
    vae = BuiltinVAE()
    for z, (_, body) in zip([*a, *b], answers, strict=True):
        ref = vae.decode(z)
        torch.testing.assert_close(as_tensor(body, ref), ref)
    assert srv.stats()["batch_sizes"] == {"4": 1, "2": 1}


async def test_batching_is_off_by_default(make_server: Any) -> None:
    srv = make_server(replicas=2)
    answers = await post_many(srv.url, [torch.randn(1, 4, 4, 4) for _ in range(6)])
    assert [s for s, _ in answers] == [200] * 6
    assert srv.stats()["batch_sizes"] == {"1": 6}


class PickyVAE(BuiltinVAE):
    """Refuses any batch holding a latent whose first value is exactly 7."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if (latents[:, 0, 0, 0] == 7).any():
            raise InputError("a latent starts with 7")
        return super().decode(latents)


async def test_errors_stay_with_their_request(make_server: Any) -> None:
    srv = make_server(model=PickyVAE(), max_batch=4, batch_wait_ms=30_000)
    zs = [torch.randn(1, 4, 4, 4) for _ in range(4)]
    zs[2][0, 0, 0, 0] = 7  # the stacked forward pass fails; each is retried alone
    answers = await post_many(srv.url, zs)
    assert [s for s, _ in answers] == [200, 200, 400, 200]
    assert b"starts with 7" in answers[2][1]
    # a request that fails while being prepared (an unreadable image of the right size)
    srv2 = make_server(max_batch=3, batch_wait_ms=30_000)
    good = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(good, format="PNG")
    bad = good.getvalue()[:60]  # the header (16x16) survives, the pixels don't

    def enc(body: bytes) -> requests.Response:
        return requests.post(srv2.url + "encode", data=body, timeout=30)

    with ThreadPoolExecutor(3) as pool:
        codes = [r.status_code for r in pool.map(enc, [good.getvalue(), bad, good.getvalue()])]
    assert codes == [200, 400, 200]
    assert srv2.stats()["batch_sizes"] == {"3": 1}


async def test_batched_answers_match_a_real_model_run_alone(tmp_path: Any, make_server: Any) -> None:
    pytest.importorskip("diffusers")
    from server_helpers import save_tiny_vae

    from asyncvae.server import DiffusersVAE

    vae = save_tiny_vae("AutoencoderKL", tmp_path / "vae")
    srv = make_server(model=DiffusersVAE(tmp_path / "vae", device="cpu", dtype="fp32"),
                      max_batch=6, batch_wait_ms=30_000)
    zs = [torch.randn(1, 4, 6, 6) for _ in range(6)]
    answers = await post_many(srv.url, zs)
    assert srv.stats()["batch_sizes"] == {"6": 1}
    for z, (status, body) in zip(zs, answers, strict=True):
        assert status == 200
        with torch.inference_mode():
            ref = vae.decode(z).sample.clamp(-1, 1)
        torch.testing.assert_close(as_tensor(body, ref), ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- readiness


def test_health_is_live_ready_waits_for_the_model(make_server: Any) -> None:
    gate = threading.Event()

    def load() -> BuiltinVAE:
        gate.wait(60)
        return BuiltinVAE()

    srv = make_server(model=load, busy_retry_after=2)
    assert requests.get(srv.url + "health", timeout=5).json() == {"status": "ok"}
    r = requests.get(srv.url + "ready", timeout=5)
    assert r.status_code == 503 and r.json() == {"status": "loading"} and r.headers["Retry-After"] == "2"
    r = post_decode(srv.url, torch.zeros(1, 4, 2, 2))
    assert_json_error(r, 503, "loading")
    assert r.headers["Retry-After"] == "2"
    status, text = headers_only(srv.url, "/?" + urlencode(decode_params([1, 4, 8, 8], "float16")), 10**8)
    assert status == 503 and "loading" in text  # answered without reading the body
    gate.set()
    srv.wait_ready(30)
    assert requests.get(srv.url + "ready", timeout=5).json()["status"] == "ready"
    assert post_decode(srv.url, torch.zeros(1, 4, 2, 2)).status_code == 200
    assert srv.stats()["ready"] is True


def test_a_model_that_fails_to_load_says_why(make_server: Any) -> None:
    def load() -> BuiltinVAE:
        raise InputError("--model: could not load AutoencoderKL from /x (no weights)")

    srv = make_server(model=load)
    with pytest.raises(RuntimeError, match="no weights"):
        srv.wait_ready(30)
    r = requests.get(srv.url + "ready", timeout=5)
    assert r.status_code == 503 and r.json()["status"] == "failed" and "no weights" in r.json()["error"]
    assert_json_error(post_decode(srv.url, torch.zeros(1, 4, 2, 2)), 500, "failed to load", "no weights")


def test_cli_exits_1_when_the_model_fails_to_load(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from asyncvae.cli import main

    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    rc = main(["serve", "--port", "0", "--model", str(folder), "--device", "cpu"])  # binds, then loads
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.startswith("asyncvae serve: listening on http://127.0.0.1:")
    assert "asyncvae serve: error: --model: could not load AutoencoderKL" in err
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------- overload


def test_max_queue_answers_429_before_reading_the_body(make_server: Any) -> None:
    model = GatedVAE()
    srv = make_server(model=model, max_queue=2, busy_retry_after=3)
    z = torch.zeros(1, 4, 2, 2)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(post_decode, srv.url, z)
        wait_for(lambda: srv.stats()["in_service"] == 1, what="one request in service")
        queued = [pool.submit(post_decode, srv.url, z) for _ in range(2)]
        wait_for(lambda: srv.stats()["queue_depth"] == 2, what="two requests waiting")
        r = post_decode(srv.url, z)
        assert_json_error(r, 429, "max_queue=2")
        assert r.headers["Retry-After"] == "3"
        status, text = headers_only(srv.url, "/?" + urlencode(decode_params([1, 4, 8, 8], "float16")), 10**8)
        assert status == 429 and "Retry-After: 3" in text
        model.gate.set()
        assert [f.result(30).status_code for f in [first, *queued]] == [200, 200, 200]
    assert post_decode(srv.url, z).status_code == 200
    assert srv.stats()["responses"] == {"200": 4, "429": 2}


def test_client_retries_429_and_gets_through(make_server: Any) -> None:
    """A client that honours Retry-After rides out a full queue."""
    model = GatedVAE()
    srv = make_server(model=model, max_queue=1, busy_retry_after=0.05)
    z = torch.zeros(1, 4, 2, 2, dtype=torch.float16)
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(post_decode, srv.url, z)]
        wait_for(lambda: srv.stats()["in_service"] == 1, what="one request in service")
        held.append(pool.submit(post_decode, srv.url, z))
        wait_for(lambda: srv.stats()["queue_depth"] == 1, what="the queue full")

        def open_after_first_429() -> None:
            wait_for(lambda: srv.stats()["responses"].get("429", 0) >= 1, what="a 429")
            model.gate.set()

        pool.submit(open_after_first_429)
        got = asyncvae.remote_decode(srv.url, z, **U8)
        assert got.shape == (1, 16, 16, 3)
        assert all(f.result(30).status_code == 200 for f in held)
    assert srv.stats()["responses"].get("429", 0) >= 1


# --------------------------------------------------------------------------- auth and admin


def test_bearer_matches() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_matches(f"bearer  {TOKEN} ", TOKEN)
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", f"Bearer {TOKEN[:-1]}"):
        assert not bearer_matches(header, TOKEN), header


async def test_token_required_everywhere_but_the_probes(make_server: Any) -> None:
    srv = make_server(token=TOKEN)
    z = torch.zeros(1, 4, 2, 2)
    for headers, why in (({}, "no Authorization"), ({"Authorization": "Bearer nope"}, "wrong token")):
        r = requests.post(srv.url, params=decode_params(z.shape, "float32"), data=bytes(P.tensor_body(z)),
                          headers=headers, timeout=10)
        assert_json_error(r, 401, why, "Bearer")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in r.text
        for route in ("stats", "metrics"):
            assert requests.get(srv.url + route, headers=headers, timeout=5).status_code == 401
    for probe in ("health", "ready"):
        assert requests.get(srv.url + probe, timeout=5).status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(srv.url + "stats", headers=auth, timeout=5).status_code == 200
    ok = await post_many(srv.url, [z], **auth)
    assert ok[0][0] == 200
    # refused before the body is read
    status, _ = headers_only(srv.url, "/?" + urlencode(decode_params([1, 4, 8, 8], "float16")), 10**8)
    assert status == 401
    # the project's client sends the token
    async with asyncvae.Client(srv.url, token=TOKEN) as client:
        out = await client.decode(z.half(), **U8)
    assert out.shape == (1, 16, 16, 3)
    assert srv.stats()["responses"]["401"] == 7


def test_open_server_beyond_loopback_warns() -> None:
    from asyncvae.server.cli import open_server_warning

    assert open_server_warning(ServerConfig(host="127.0.0.1")) is None
    assert open_server_warning(ServerConfig(host="0.0.0.0", token=TOKEN)) is None
    msg = open_server_warning(ServerConfig(host="0.0.0.0"))
    assert msg is not None and "without a token" in msg and "ASYNCVAE_SERVE_TOKEN" in msg


def test_admin_routes_need_admin_or_faults(make_server: Any) -> None:
    plain = make_server()
    for route, body in (("faults", {"fault_503": 1.0}), ("stats/reset", None)):
        assert_json_error(requests.post(plain.url + route, json=body, timeout=5), 403, "--admin")
    assert post_decode(plain.url, torch.zeros(1, 4, 2, 2)).status_code == 200  # faults untouched
    plain.set_faults(Faults(fault_503=1.0))  # in-process control always works
    assert post_decode(plain.url, torch.zeros(1, 4, 2, 2)).status_code == 503
    for srv in (make_server(admin=True), make_server(faults=Faults(fault_429=0.5), seed=1)):
        assert requests.post(srv.url + "faults", json={"fault_503": 1.0}, timeout=5).status_code == 200
        assert post_decode(srv.url, torch.zeros(1, 4, 2, 2)).status_code == 503
        assert requests.post(srv.url + "stats/reset", timeout=5).status_code == 200
    off = make_server(faults=Faults(fault_503=1.0), admin=False)
    assert requests.post(off.url + "faults", json={}, timeout=5).status_code == 403


def test_cli_token_from_env_and_fault_flags_turn_on_admin(serve_subprocess: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("ASYNCVAE_SERVE_TOKEN", TOKEN)
    sp = serve_subprocess("--fault-503", "0", "--access-log")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(sp.url + "stats", timeout=5).status_code == 401
    assert requests.post(sp.url + "faults", json={"fault_429": 1.0}, headers=auth, timeout=5).status_code == 200
    z = torch.zeros(1, 4, 2, 2)
    r = requests.post(sp.url, params=decode_params(z.shape, "float32"), data=bytes(P.tensor_body(z)),
                      headers=auth, timeout=10)
    assert r.status_code == 429
    monkeypatch.delenv("ASYNCVAE_SERVE_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    sp2 = serve_subprocess("--token-file", str(token_file))
    assert requests.get(sp2.url + "stats", headers={"Authorization": "Bearer from-a-file"}, timeout=5).status_code == 200
    assert requests.post(sp2.url + "faults", json={}, headers={"Authorization": "Bearer from-a-file"},
                         timeout=5).status_code == 403
    assert sp.terminate() == 0
    out = "".join(sp.output)
    assert '"POST /faults HTTP/1.1" 200' in out and '"GET /stats HTTP/1.1" 401' in out  # access log
    assert TOKEN not in out


# --------------------------------------------------------------------------- metrics


async def test_metrics_count_requests_batches_and_queue(make_server: Any) -> None:
    srv = make_server(max_batch=4, batch_wait_ms=30_000)
    other = make_server()  # its own registry: nothing leaks between servers
    answers = await post_many(srv.url, [torch.randn(1, 4, 4, 4) for _ in range(4)])
    assert [s for s, _ in answers] == [200] * 4
    assert post_encode(srv.url, b"not an image").status_code == 400
    r = requests.get(srv.url + "metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    m = metric_samples(r.text)
    assert m[("asyncvae_requests_total", (("op", "decode"), ("status", "200")))] == 4
    assert m[("asyncvae_requests_total", (("op", "encode"), ("status", "400")))] == 1
    assert m[("asyncvae_request_duration_seconds_count", (("op", "decode"),))] == 4
    assert m[("asyncvae_batch_size_count", ())] == 1 and m[("asyncvae_batch_size_sum", ())] == 4
    assert m[("asyncvae_batch_items_sum", ())] == 4
    assert m[("asyncvae_model_compute_seconds_count", (("fn", "decode"),))] == 1
    assert m[("asyncvae_queue_depth", ())] == 0 and m[("asyncvae_model_ready", ())] == 1
    assert ("asyncvae_in_flight", ()) in m and ("asyncvae_in_service", ()) in m
    theirs = metric_samples(requests.get(other.url + "metrics", timeout=5).text)
    assert ("asyncvae_requests_total", (("op", "decode"), ("status", "200"))) not in theirs


def test_metrics_show_the_queue_while_it_waits(make_server: Any) -> None:
    model = GatedVAE()
    srv = make_server(model=model)
    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(post_decode, srv.url, torch.zeros(1, 4, 2, 2)) for _ in range(3)]
        wait_for(lambda: srv.stats()["queue_depth"] == 2, what="two waiting")
        m = metric_samples(requests.get(srv.url + "metrics", timeout=5).text)
        assert m[("asyncvae_queue_depth", ())] == 2 and m[("asyncvae_in_service", ())] == 1
        assert m[("asyncvae_in_flight", ())] == 3
        model.gate.set()
        assert all(f.result(30).status_code == 200 for f in futs)


# --------------------------------------------------------------------------- shutdown


async def test_drain_stops_accepting_and_finishes_what_is_in_flight() -> None:
    model = GatedVAE()
    server = await start_server(ServerConfig(replicas=2), model)
    try:
        tasks = [asyncio.create_task(post_many(server.url, [torch.randn(1, 4, 4, 4)])) for _ in range(6)]
        while server.state.stats.in_flight < 6:
            await asyncio.sleep(0.01)
        drain = asyncio.create_task(server.drain(60))
        while server.runner.sites:
            await asyncio.sleep(0.01)
        assert server.state.draining and not server.state.ready
        u = urlsplit(server.url)
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.open_connection(u.hostname, u.port)
        model.gate.set()
        assert await drain == 0
        assert [r[0][0] for r in await asyncio.gather(*tasks)] == [200] * 6
    finally:
        model.gate.set()
        await server.close()


async def test_drain_gives_up_after_its_timeout() -> None:
    model = GatedVAE()
    server = await start_server(ServerConfig(), model)
    task = asyncio.create_task(post_many(server.url, [torch.zeros(1, 4, 2, 2)]))
    try:
        while server.state.stats.in_flight < 1:
            await asyncio.sleep(0.01)
        assert await server.drain(0.2) == 1
        await server.close()  # what is still running is cut off
        with pytest.raises(aiohttp.ClientError):
            await task
    finally:
        model.gate.set()
        await server.close()


async def test_sigterm_drains_50_requests_in_flight(serve_subprocess: Any) -> None:
    # 10 rounds of 400 ms: longer than aiohttp's own short close, so only the drain saves them
    sp = serve_subprocess("--delay-ms", "400", "--replicas", "5", "--drain-timeout", "120")
    zs = [torch.randn(1, 4, 8, 8, dtype=torch.float16) for _ in range(50)]
    sending = asyncio.create_task(post_many(sp.url, zs))

    def in_flight() -> int:
        return int(requests.get(sp.url + "stats", timeout=5).json()["in_flight"])

    deadline = time.monotonic() + 60
    while await asyncio.to_thread(in_flight) < 50:
        assert time.monotonic() < deadline, "the 50 requests never all arrived"
        await asyncio.sleep(0.01)
    assert sp.proc is not None
    sp.proc.send_signal(signal.SIGTERM)
    answers = await sending  # a reset would raise here
    assert [s for s, _ in answers] == [200] * 50
    vae = BuiltinVAE()
    for z, (_, body) in zip(zs, answers, strict=True):
        ref = vae.decode(z.float()).half()
        torch.testing.assert_close(as_tensor(body, ref), ref)
    assert await asyncio.to_thread(sp.proc.wait, 60) == 0
    assert any("draining" in line for line in sp.output)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")
def test_reuse_port_lets_two_processes_share_a_port(serve_subprocess: Any) -> None:
    a = serve_subprocess("--reuse-port")
    b = ServeProcess(["--reuse-port"])
    try:
        b.start(a.port)  # the same port: would fail with "address in use" without SO_REUSEPORT
        assert b.port == a.port
        for _ in range(4):
            assert post_decode(a.url, torch.zeros(1, 4, 2, 2)).status_code == 200
        assert a.terminate() == 0 and b.terminate() == 0
    finally:
        b.kill()


def test_local_server_keeps_its_test_api() -> None:
    with LocalServer(ServerConfig(replicas=2, faults=Faults(fault_503=1.0))) as srv:
        assert post_decode(srv.url, torch.zeros(1, 4, 2, 2)).status_code == 503
        srv.set_faults(Faults())
        assert read_tensor(post_decode(srv.url, torch.zeros(1, 4, 2, 2))).shape == (1, 3, 16, 16)
        srv.reset_stats()
        assert srv.stats()["requests"] == {}
