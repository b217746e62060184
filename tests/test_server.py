"""The reference server over real HTTP on 127.0.0.1 (requests / aiohttp / http.client,
never the project's client)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from server_helpers import (
    assert_json_error,
    decode_params,
    post_decode,
    post_encode,
    read_tensor,
)

from asyncvae import protocol as P
from asyncvae.errors import InputError
from asyncvae.server import BuiltinVAE, Faults, LocalServer, ServerConfig, load_model
from asyncvae.server.model import interpolate_latent_frames, unpack_latents


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def photo_like(size: int = 512, seed: int = 0) -> np.ndarray:
    """A procedurally generated photo-like RGB uint8 image: a smooth sky/ground
    gradient, low-frequency lighting, soft-edged shapes and fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    sky = np.stack([0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.9 - 0.2 * y], -1)
    ground = np.stack([0.35 + 0.2 * x, 0.5 - 0.1 * y, 0.2 + 0.1 * x], -1)
    horizon = 0.5 + 0.5 * np.tanh((y - 0.55 - 0.05 * np.sin(6 * x)) * 30)
    img = sky * (1 - horizon[..., None]) + ground * horizon[..., None]
    img *= (0.85 + 0.15 * np.sin(3 * x + 1) * np.cos(2 * y))[..., None]
    for _ in range(6):  # soft discs
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.04, 0.15)
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        alpha = 0.5 - 0.5 * np.tanh((d - r) * 100)
        color = rng.uniform(0.1, 0.95, 3)
        img = img * (1 - alpha[..., None]) + (color * (0.8 + 0.2 * (1 - d / r).clip(0, 1)[..., None])) * alpha[..., None]
    img += 0.03 * np.sin(40 * x + 25 * y)[..., None]  # fine texture
    img += rng.normal(0, 0.015, img.shape)  # grain
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def to_pm1(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1


# --------------------------------------------------------------------------- basics


def test_health_and_stats(server: LocalServer) -> None:
    r = requests.get(server.url + "health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    s = requests.get(server.url + "stats", timeout=5).json()
    for key in ("requests", "responses", "faults", "cache_hits", "max_queue_depth", "in_flight"):
        assert key in s
    assert s == {**server.stats(), "responses": s["responses"]}
    assert server.url.startswith("http://127.0.0.1:") and server.decode_url.endswith("/decode")


def test_unknown_route_is_json_404(server: LocalServer) -> None:
    assert_json_error(requests.get(server.url + "nope", timeout=5), 404)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_decode_pt_tensor(server: LocalServer, dtype: torch.dtype) -> None:
    z = torch.randn(2, 4, 8, 6).to(dtype)
    r = post_decode(server.url, z, "pt")
    assert r.status_code == 200
    assert r.headers["dtype"] == P.dtype_name(dtype)
    assert int(r.headers["Content-Length"]) == len(r.content)
    t = read_tensor(r)
    assert t.shape == (2, 3, 64, 48) and t.dtype == dtype
    assert t.float().min() >= -1 and t.float().max() <= 1
    ref = BuiltinVAE().decode(z.float()).to(dtype)
    torch.testing.assert_close(t, ref)


def test_decode_partial_postprocess_uint8(server: LocalServer) -> None:
    z = torch.randn(3, 4, 4, 4, dtype=torch.float16)
    r = post_decode(server.url, z, "pt", partial_postprocess=True)
    t = read_tensor(r)
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32, 3)
    ref = ((BuiltinVAE().decode(z.float()) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(t, ref.permute(0, 2, 3, 1))


@pytest.mark.parametrize("fmt,magic,ctype", [("jpg", b"\xff\xd8", "image/jpeg"), ("png", b"\x89PNG", "image/png")])
def test_decode_pil_image_bytes(server: LocalServer, fmt: str, magic: bytes, ctype: str) -> None:
    z = torch.randn(1, 4, 8, 12, dtype=torch.float16)
    r = post_decode(server.url, z, "pil", image_format=fmt)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == ctype and r.content.startswith(magic)
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (96, 64) and im.mode == "RGB"
    if fmt == "png":
        u8 = post_decode(server.url, z, "pt", partial_postprocess=True)
        assert np.array_equal(np.asarray(im), read_tensor(u8)[0].numpy())


def test_decode_pil_batch_needs_pt(server: LocalServer) -> None:
    z = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    assert_json_error(post_decode(server.url, z, "pil"), 400, "output_type='pt'")


def test_decode_pil_with_processor_answers_0_1_frames(server: LocalServer) -> None:
    z = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    t = read_tensor(post_decode(server.url, z, "pil", processor=True))
    assert t.shape == (2, 3, 32, 32) and t.dtype == torch.bfloat16
    assert t.float().min() >= 0 and t.float().max() <= 1
    v = torch.randn(1, 16, 3, 4, 4, dtype=torch.float16)
    t = read_tensor(post_decode(server.url, v, "pil", processor=True))
    assert t.shape == (9, 3, 32, 32) and t.dtype == torch.float16


def test_decode_video(server: LocalServer) -> None:
    v = torch.randn(2, 16, 3, 4, 6, dtype=torch.float16)
    frames = P.frames_for_latent_frames(3)
    t = read_tensor(post_decode(server.url, v, "pt"))
    assert t.shape == (2, 3, frames, 32, 48) and t.dtype == torch.float16
    u = read_tensor(post_decode(server.url, v, "pt", partial_postprocess=True))
    assert u.shape == (2 * frames, 32, 48, 3) and u.dtype == torch.uint8
    # frame 0 and frame 4 are latent frames 0 and 1; frame 2 is halfway
    x = interpolate_latent_frames(v.float())
    torch.testing.assert_close(x[:, :, 4], v[:, :, 1].float())
    torch.testing.assert_close(x[:, :, 2], (v[:, :, 0].float() + v[:, :, 1].float()) / 2)


def test_decode_mp4(server: LocalServer) -> None:
    v = torch.randn(1, 16, 3, 4, 6, dtype=torch.float16)
    r = post_decode(server.url, v, "mp4")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith(P.CONTENT_TYPE_MP4)
    assert r.content[4:8] == b"ftyp"
    import av

    with av.open(io.BytesIO(r.content)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (48, 32)
    assert_json_error(post_decode(server.url, torch.randn(1, 4, 4, 4), "mp4"), 400, "5-D")


def test_decode_packed_flux(server: LocalServer) -> None:
    h, w = 64, 96
    z = torch.randn(1, 16, h // 8, w // 8)
    packed = z.view(1, 16, h // 16, 2, w // 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, 64)
    torch.testing.assert_close(unpack_latents(packed, h, w), z)
    a = read_tensor(post_decode(server.url, packed, "pt", height=h, width=w))
    b = read_tensor(post_decode(server.url, z, "pt"))
    assert a.shape == (1, 3, h, w)
    torch.testing.assert_close(a, b)
    assert_json_error(post_decode(server.url, packed, "pt"), 400, "height")
    assert_json_error(post_decode(server.url, packed, "pt", height=h, width=2 * w), 400, "tokens")


def test_decode_scaling_and_shift(server: LocalServer) -> None:
    z = torch.randn(1, 4, 8, 8)
    vae = BuiltinVAE()
    got = read_tensor(post_decode(server.url, z, "pt", scaling_factor=0.5, shift_factor=0.25))
    torch.testing.assert_close(got, vae.decode(z / 0.5 + 0.25))
    got = read_tensor(post_decode(server.url, z, "pt", do_scaling=True))
    torch.testing.assert_close(got, vae.decode(z / 0.18215))
    got = read_tensor(post_decode(server.url, z * 0.1, "pt"))
    torch.testing.assert_close(got, vae.decode(z * 0.1))


def test_decode_on_root_vs_routes(server: LocalServer) -> None:
    z = torch.randn(1, 4, 4, 4)
    a = post_decode(server.url, z, "pt").content
    b = post_decode(server.decode_url, z, "pt").content
    assert a == b
    # /decode without output_type defaults to pil (a JPEG)
    r = requests.post(
        server.decode_url, params=[("shape", s) for s in "1444"] + [("dtype", "float32")],
        data=bytes(P.tensor_body(z)), timeout=10,
    )
    assert r.status_code == 200 and r.content.startswith(b"\xff\xd8")
    stats = server.stats()
    assert stats["requests"]["decode"] == 3 and stats["responses"]["200"] == 3


# --------------------------------------------------------------------------- encode


def test_encode_png_without_content_type(server: LocalServer) -> None:
    img = photo_like(64, seed=1)
    r = post_encode(server.url, png_bytes(img))
    assert r.status_code == 200
    z = read_tensor(r)
    assert z.shape == (1, 4, 8, 8) and z.dtype == torch.float16
    torch.testing.assert_close(z, BuiltinVAE().encode(to_pm1(img)).half())
    assert server.stats()["requests"] == {"encode": 1}


def test_encode_jpeg_and_resize_down(server: LocalServer) -> None:
    img = photo_like(64, seed=2)[:45, :70]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    z = read_tensor(post_encode(server.encode_url, buf.getvalue()))
    assert z.shape == (1, 4, 5, 8)  # 45x70 → 40x64 (down to multiples of 8)
    webp = io.BytesIO()
    Image.fromarray(img).save(webp, format="WEBP")
    assert read_tensor(post_encode(server.url, webp.getvalue())).shape == (1, 4, 5, 8)


def test_encode_tensor_bodies(server: LocalServer) -> None:
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = read_tensor(post_encode(server.url, x))
    assert z.shape == (2, 4, 4, 3) and z.dtype == torch.float32
    torch.testing.assert_close(z, BuiltinVAE().encode(x))
    z16 = read_tensor(post_encode(server.url, x[0].half()))
    assert z16.shape == (1, 4, 4, 3) and z16.dtype == torch.float16
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    zu = read_tensor(post_encode(server.url, u8))
    assert zu.dtype == torch.float32
    torch.testing.assert_close(zu, BuiltinVAE().encode(u8.float() / 127.5 - 1))


def test_encode_scaling_and_shift(server: LocalServer) -> None:
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    plain = read_tensor(post_encode(server.url, x))
    scaled = read_tensor(post_encode(server.url, x, scaling_factor=0.3611, shift_factor=0.1159))
    torch.testing.assert_close(scaled, (plain - 0.1159) * 0.3611)


def test_encode_decode_psnr_on_photo(server: LocalServer) -> None:
    img = photo_like(512)
    x = to_pm1(img)
    z = read_tensor(post_encode(server.url, x))
    assert z.shape == (1, 4, 64, 64)
    y = read_tensor(post_decode(server.url, z, "pt"))
    reference = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bilinear").clamp(-1, 1)
    assert psnr(y, reference) >= 40
    assert psnr(y, x) >= 20
    # the PNG path (float16 latents) gets there too
    z16 = read_tensor(post_encode(server.url, png_bytes(img)))
    assert psnr(read_tensor(post_decode(server.url, z16, "pt")).float(), x) >= 20


# --------------------------------------------------------------------------- bad input


def _raw(url: str, params: list[tuple[str, str]], body: bytes, **headers: str) -> requests.Response:
    return requests.post(url, params=params, data=body, headers=headers, timeout=10)


BAD_INPUTS: dict[str, tuple[str, list[tuple[str, str]], bytes, int, str]] = {
    "body size": ("", decode_params([1, 4, 8, 8], "float16"), b"\0" * 100, 400, "bytes"),
    "unknown dtype": ("", decode_params([1, 4, 8, 8], "float64"), b"\0" * 2048, 400, "dtype"),
    "uint8 latents": ("", decode_params([1, 4, 8, 8], "uint8"), b"\0" * 256, 400, "uint8"),
    "missing shape": ("", [("output_type", "pt"), ("dtype", "float16")], b"\0" * 8, 400, "shape"),
    "missing dtype": ("", [("output_type", "pt"), ("shape", "1"), ("shape", "4")], b"\0" * 8, 400, "dtype"),
    "bad shape": ("", [("output_type", "pt"), ("shape", "x"), ("dtype", "float16")], b"", 400, "shape"),
    "wrong rank": ("", decode_params([4, 8, 8, 1, 1, 1], "float16"), b"\0" * 512, 400, "4-D"),
    "bad output_type": ("", decode_params([1, 4, 2, 2], "float16", "gif"), b"\0" * 32, 400, "output_type"),
    "bad scaling": ("", decode_params([1, 4, 2, 2], "float16", scaling_factor="abc"), b"\0" * 32, 400, "scaling"),
    "zero scaling": ("", decode_params([1, 4, 2, 2], "float16", scaling_factor=0), b"\0" * 32, 400, "zero"),
    "garbage image": ("encode", [], b"this is not an image at all", 400, "image"),
    "truncated png": ("encode", [], png_bytes(np.zeros((16, 16, 3), np.uint8))[:40], 400, "image"),
    "empty body": ("encode", [], b"", 400, "empty"),
    "encode rank": ("encode", [("shape", "3"), ("shape", "8"), ("dtype", "uint8")], b"\0" * 24, 400, "[3,H,W]"),
    "encode channels": (
        "encode", [("shape", s) for s in ("1", "4", "8", "8")] + [("dtype", "uint8")], b"\0" * 256, 400, "RGB"
    ),
    "encode not multiple of 8": (
        "encode", [("shape", s) for s in ("3", "12", "8")] + [("dtype", "uint8")], b"\0" * 288, 400, "multiples of 8"
    ),
    "tiny image": ("encode", [], png_bytes(np.zeros((4, 4, 3), np.uint8)), 400, "8x8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_json_error(server: LocalServer, case: str) -> None:
    path, params, body, status, fragment = BAD_INPUTS[case]
    assert_json_error(_raw(server.url + path, params, body), status, fragment)
    assert server.stats()["responses"] == {str(status): 1}


def test_body_over_max_body_bytes_is_413(make_server: Any) -> None:
    srv = make_server(max_body_bytes=1000)
    z = torch.zeros(1, 4, 16, 16, dtype=torch.float16)  # 2048 bytes
    assert_json_error(post_decode(srv.url, z, "pt"), 413, "max_body_bytes")
    small = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    assert post_decode(srv.url, small, "pt").status_code == 200


def test_output_over_max_output_pixels_is_413(make_server: Any) -> None:
    srv = make_server(max_output_pixels=64 * 64)
    assert_json_error(post_decode(srv.url, torch.zeros(2, 4, 8, 8), "pt"), 413, "max_output_pixels")
    assert_json_error(post_encode(srv.url, torch.zeros(1, 3, 128, 128)), 413, "max_output_pixels")
    assert_json_error(post_encode(srv.url, png_bytes(np.zeros((80, 80, 3), np.uint8))), 413, "max_output_pixels")
    assert post_decode(srv.url, torch.zeros(1, 4, 8, 8), "pt").status_code == 200


def test_mp4_without_av_is_400(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncvae.server import codec

    monkeypatch.setattr(codec, "mp4_available", lambda: False)
    r = post_decode(server.url, torch.zeros(1, 16, 2, 2, 2), "mp4")
    assert r.status_code == 400
    assert r.json() == {"error": "mp4 output needs the 'av' package: pip install asyncvae[video]"}


@settings(max_examples=15, deadline=None)
@given(
    rank=st.sampled_from([4, 5]),
    b=st.integers(1, 2),
    c=st.integers(3, 16),
    t=st.integers(1, 3),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    dtype=st.sampled_from(["float16", "float32", "bfloat16"]),
    pp=st.booleans(),
)
def test_decode_shapes_property(
    rank: int, b: int, c: int, t: int, h: int, w: int, dtype: str, pp: bool
) -> None:
    shape = [b, c, t, h, w] if rank == 5 else [b, c, h, w]
    z = torch.randn(shape).to(P.DTYPES[dtype])
    with LocalServer() as srv:
        out = read_tensor(post_decode(srv.url, z, "pt", partial_postprocess=pp))
    n = P.frames_for_latent_frames(t) if rank == 5 else 1
    if pp:
        assert out.dtype == torch.uint8
        assert list(out.shape) == [b * n, 8 * h, 8 * w, 3]
    else:
        assert out.dtype == z.dtype
        assert list(out.shape) == ([b, 3, n, 8 * h, 8 * w] if rank == 5 else [b, 3, 8 * h, 8 * w])
        assert out.float().abs().max() <= 1


def test_unexpected_exception_is_json_500(make_server: Any) -> None:
    class Broken(BuiltinVAE):
        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    srv = make_server(model=Broken())
    msg = assert_json_error(post_decode(srv.url, torch.zeros(1, 4, 2, 2), "pt"), 500, "boom")
    assert "Traceback" not in msg


# --------------------------------------------------------------------------- faults


@contextlib.contextmanager
def _http(url: str, path_query: str, body: bytes) -> Iterator[http.client.HTTPResponse]:
    """POST with http.client, which exposes truncation and transfer encoding as they are."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("POST", path_query, body=body, headers={"Accept": P.CONTENT_TYPE_TENSOR})
        yield conn.getresponse()
    finally:
        conn.close()


def _decode_path(shape: list[int], dtype: str = "float32") -> str:
    return "/?" + urlencode(decode_params(shape, dtype, "pt"))


def test_fault_503_429_502(make_server: Any) -> None:
    srv = make_server(faults=Faults(fault_503=1.0))
    z = torch.zeros(1, 4, 2, 2)
    assert post_decode(srv.url, z).json() == {"error": "503 Service Unavailable"}
    srv.set_faults(Faults(fault_429=1.0, retry_after=2))
    r = post_decode(srv.url, z)
    assert_json_error(r, 429)
    assert r.headers["Retry-After"] == "2"
    srv.set_faults(Faults(fault_429=1.0, retry_after=0.25))
    assert post_decode(srv.url, z).headers["Retry-After"] == "0.25"
    srv.set_faults(Faults(fault_502_html=1.0))
    r = post_decode(srv.url, z)
    assert r.status_code == 502 and r.headers["Content-Type"].startswith("text/html")
    assert r.text.startswith("<html")
    srv.set_faults(Faults())
    assert post_decode(srv.url, z).status_code == 200
    s = srv.stats()
    assert s["faults"] == {"fault_503": 1, "fault_429": 2, "fault_502_html": 1}
    assert s["responses"] == {"503": 1, "429": 2, "502": 1, "200": 1}


def test_fault_probability_is_seeded(make_server: Any) -> None:
    def run() -> list[int]:
        srv = make_server(faults=Faults(fault_503=0.5), seed=7)
        codes = [post_decode(srv.url, torch.zeros(1, 4, 2, 2)).status_code for _ in range(30)]
        assert srv.stats()["faults"]["fault_503"] == codes.count(503)
        return codes

    a = run()
    assert 3 < a.count(503) < 27
    assert a == run()


def test_fault_truncate(make_server: Any) -> None:
    srv = make_server(faults=Faults(fault_truncate=1.0))
    with _http(srv.url, _decode_path([1, 4, 8, 8]), bytes(1024)) as resp:
        declared = int(resp.getheader("Content-Length") or 0)
        assert declared == 3 * 64 * 64 * 4
        with pytest.raises(http.client.IncompleteRead) as e:
            resp.read()
    assert 0 < len(e.value.partial) < declared
    assert srv.stats()["faults"] == {"fault_truncate": 1}


def test_fault_reset(make_server: Any) -> None:
    srv = make_server(faults=Faults(fault_reset=1.0))
    z = torch.zeros(1, 4, 32, 32)
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        post_decode(srv.url, z)
    assert srv.stats()["faults"] == {"fault_reset": 1}


def test_fault_stall(make_server: Any) -> None:
    srv = make_server(faults=Faults(fault_stall=1.0, stall_seconds=0.6))
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            srv.url, params=decode_params(z.shape, "float32"), data=bytes(P.tensor_body(z)), timeout=0.2
        )
    t0 = time.monotonic()
    srv.set_faults(Faults(fault_stall=1.0, stall_seconds=0.3))
    assert post_decode(srv.url, z).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    assert srv.stats()["faults"] == {"fault_stall": 2}


def test_fault_bad_headers(make_server: Any) -> None:
    srv = make_server(faults=Faults(fault_bad_headers=1.0), seed=3)
    z = torch.zeros(1, 4, 2, 2)
    kinds = set()
    for _ in range(12):
        r = post_decode(srv.url, z)
        assert r.status_code == 200
        if "dtype" not in r.headers:
            kinds.add("missing dtype")
            continue
        try:
            shape = json.loads(r.headers["shape"])
        except ValueError:
            kinds.add("non-JSON shape")
            continue
        assert math.prod(shape) * 4 != len(r.content)
        kinds.add("wrong shape")
    assert len(kinds) >= 2
    assert srv.stats()["faults"] == {"fault_bad_headers": 12}
    # image answers carry no tensor headers to spoil
    assert post_decode(srv.url, z, "pil").content.startswith(b"\xff\xd8")


def test_chunked_responses(make_server: Any) -> None:
    srv = make_server(faults=Faults(chunked=True))
    with _http(srv.url, _decode_path([1, 4, 32, 32]), bytes(1 * 4 * 32 * 32 * 4)) as resp:
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Length") is None
        body = resp.read()
        shape = json.loads(resp.getheader("shape") or "null")
    assert len(body) == 3 * 256 * 256 * 4
    t = torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(shape)
    torch.testing.assert_close(t, BuiltinVAE().decode(torch.zeros(1, 4, 32, 32)))


def test_set_faults_over_http(make_server: Any) -> None:
    server = make_server(admin=True)
    r = requests.post(server.url + "faults", json={"fault_503": 1.0}, timeout=5)
    assert r.status_code == 200 and r.json()["fault_503"] == 1.0
    assert post_decode(server.url, torch.zeros(1, 4, 2, 2)).status_code == 503
    assert_json_error(requests.post(server.url + "faults", json={"nope": 1}, timeout=5), 400, "unknown")
    requests.post(server.url + "faults", json={}, timeout=5)
    assert post_decode(server.url, torch.zeros(1, 4, 2, 2)).status_code == 200
    requests.post(server.url + "stats/reset", timeout=5)
    assert server.stats()["requests"] == {}


def test_faults_validate() -> None:
    with pytest.raises(ValueError):
        Faults(fault_503=1.5)
    with pytest.raises(ValueError):
        ServerConfig(replicas=0)


# --------------------------------------------------------------------------- service model


async def _concurrent(url: str, n: int, batch: int = 1) -> float:
    z = torch.zeros(batch, 4, 2, 2)
    params = decode_params(z.shape, "float32")
    body = bytes(P.tensor_body(z))
    async with aiohttp.ClientSession() as s:

        async def one() -> int:
            async with s.post(url, params=params, data=body, headers={"Accept": P.CONTENT_TYPE_TENSOR}) as r:
                await r.read()
                return r.status

        t0 = time.monotonic()
        codes = await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.monotonic() - t0
    assert codes == [200] * n
    return elapsed


async def test_replicas_serialise_or_overlap(make_server: Any) -> None:
    one = make_server(replicas=1, delay_ms=300)
    two = make_server(replicas=2, delay_ms=300)
    assert await _concurrent(one.url, 2) >= 0.58
    assert one.stats()["max_queue_depth"] >= 1
    assert await _concurrent(two.url, 2) < 0.5


async def test_delay_per_item(make_server: Any) -> None:
    srv = make_server(delay_per_item_ms=100)
    assert await _concurrent(srv.url, 1, batch=3) >= 0.29


def test_cache_mode(make_server: Any) -> None:
    srv = make_server(cache=True)
    z = torch.randn(1, 4, 4, 4)
    bodies = [post_decode(srv.url, z).content for _ in range(3)]
    assert bodies[0] == bodies[1] == bodies[2]
    other = post_decode(srv.url, z, partial_postprocess=True)
    assert read_tensor(other).dtype == torch.uint8
    assert srv.stats()["cache_hits"] == 2


# --------------------------------------------------------------------------- models


def test_builtin_mix_is_full_rank_and_deterministic() -> None:
    for c in (3, 4, 16):
        m, pinv = BuiltinVAE(c).mix(c)
        assert m.shape == (c, 3)
        torch.testing.assert_close(pinv @ m, torch.eye(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(BuiltinVAE().mix(c)[0], m)
    with pytest.raises(ValueError):
        BuiltinVAE(2)


def test_load_model_errors(tmp_path: Any) -> None:
    assert isinstance(load_model("builtin", 16), BuiltinVAE)
    with pytest.raises(InputError):
        load_model(str(tmp_path / "missing"))


def test_diffusers_adapter(tmp_path: Any, make_server: Any) -> None:
    diffusers = pytest.importorskip("diffusers")
    from asyncvae.server import DiffusersVAE

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    model = DiffusersVAE(tmp_path / "vae")
    assert model.spatial_factor == 2 and model.latent_channels == 4 and model.scaling_factor == 0.5
    srv = make_server(model=model)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = read_tensor(post_encode(srv.url, x))
    assert z.shape == (1, 4, 8, 8)
    y = read_tensor(post_decode(srv.url, z, "pt"))
    assert y.shape == (1, 3, 16, 16) and y.abs().max() <= 1
    assert_json_error(post_decode(srv.url, torch.zeros(1, 16, 2, 2), "pt"), 400, "4-channel")
    assert srv.stats()["model"].startswith("diffusers:")


# --------------------------------------------------------------------------- process


def test_serve_subprocess(serve_subprocess: Any) -> None:
    sp = serve_subprocess("--fault-503", "0", "--replicas", "2", "--seed", "1")
    assert sp.url.startswith("http://127.0.0.1:")
    assert requests.get(sp.url + "health", timeout=5).json() == {"status": "ok"}
    assert post_decode(sp.url, torch.zeros(1, 4, 2, 2)).status_code == 200
    assert requests.get(sp.url + "stats", timeout=5).json()["replicas"] == 2
    port = sp.port
    sp.restart()
    assert sp.port == port
    assert requests.get(sp.url + "health", timeout=5).status_code == 200
    assert sp.terminate() == 0


def test_serve_subprocess_faults(serve_subprocess: Any) -> None:
    sp = serve_subprocess("--fault-429", "1", "--retry-after", "3", "--fault-stall", "0:5", "--chunked")
    r = post_decode(sp.url, torch.zeros(1, 4, 2, 2))
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"


def test_serve_help_lists_flags() -> None:
    import argparse

    from asyncvae.server import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    sub = parser.parse_args(["serve", "--port", "0", "--fault-stall", "0.1:2", "--cache"])
    cfg = cli.config_from_args(sub)
    assert cfg.port == 0 and cfg.cache and cfg.faults.fault_stall == 0.1 and cfg.faults.stall_seconds == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--fault-503", "2"])
    text = parser._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for flag in (
        "--host", "--port", "--model", "--replicas", "--latent-channels", "--cache", "--delay-ms",
        "--delay-per-item-ms", "--fault-503", "--fault-429", "--retry-after", "--fault-reset",
        "--fault-truncate", "--fault-stall", "--fault-bad-headers", "--fault-502-html", "--chunked", "--seed",
        "--device", "--dtype", "--tiling", "--slicing", "--max-batch", "--batch-wait-ms", "--max-queue",
        "--busy-retry-after", "--token", "--token-file", "--admin", "--drain-timeout", "--access-log",
        "--reuse-port", "--max-body-bytes", "--max-output-pixels",
    ):
        assert flag in text
    cfg = cli.config_from_args(parser.parse_args(
        ["serve", "--max-batch", "8", "--batch-wait-ms", "5", "--max-queue", "0", "--dtype", "bf16",
         "--device", "cuda:1", "--admin", "--drain-timeout", "3", "--token", "t0k"]))
    assert (cfg.max_batch, cfg.batch_wait_ms, cfg.max_queue, cfg.dtype, cfg.device) == (8, 5, 0, "bf16", "cuda:1")
    assert cfg.admin_enabled and cfg.drain_timeout == 3 and cfg.token == "t0k" and "t0k" not in repr(cfg)
    assert not cli.config_from_args(parser.parse_args(["serve"])).admin_enabled
    assert cli.config_from_args(parser.parse_args(["serve", "--fault-503", "0"])).admin_enabled
    for bad in (["--max-batch", "0"], ["--device", "gpu"], ["--dtype", "fp8"], ["--replicas", "0"]):
        with pytest.raises((SystemExit, InputError)):
            cli.config_from_args(parser.parse_args(["serve", *bad]))
