"""The Ray Data adapters: ``VAEEncode`` as a plain callable (always), and inside Ray Data
on a local Ray (``ray[data]`` is in the test extra, so CI runs it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import asyncvae
from asyncvae.integrations.ray import AsyncVAEEncode, VAEEncode
from asyncvae.jobs import load_image, to_wire_tensor


def _batch(n: int = 6, size: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


async def _expected(url: str, images: list[np.ndarray]) -> list[torch.Tensor]:
    async with asyncvae.Client(url) as c:
        return [r[0] async for r in c.encode_many([to_wire_tensor(a) for a in images])]


async def test_vaeencode_call_without_ray(server):
    images = _batch()
    enc = VAEEncode(server.url, scaling_factor=None)
    try:
        out = enc({"image": images, "id": np.arange(len(images))})
    finally:
        enc.close()
    assert out["latent"].dtype == object and out["latent"][0].shape == (4, 8, 8)
    assert (out["id"] == np.arange(6)).all() and out["image"] is images
    expected = await _expected(server.url, list(images))
    for got, exp in zip(out["latent"], expected, strict=True):
        assert torch.equal(torch.from_numpy(got), exp.to(torch.float16))


def test_vaeencode_resolution_ragged_and_errors(server, tmp_path):
    ragged = np.empty(3, dtype=object)
    ragged[0] = np.zeros((40, 72, 3), np.uint8)
    ragged[1] = np.full((64, 64), 128, np.uint8)  # grayscale
    ragged[2] = np.zeros((2, 2, 3), np.uint8)  # too small once cropped to multiples of 8
    with VAEEncode(server.url, on_error="null", dtype="float32") as enc:
        out = enc({"image": ragged})
    assert out["latent"][0].shape == (4, 5, 9) and out["latent"][1].shape == (4, 8, 8)
    assert out["latent"][2].size == 0 and "8x8" in out["latent_error"][2] and out["latent_error"][0] == ""
    with VAEEncode(server.url, resolution=32) as enc:
        out = enc({"image": ragged[:2]})
        assert out["latent"].shape == (2, 4, 4, 4)
        Image.fromarray(np.zeros((48, 80, 3), np.uint8)).save(tmp_path / "a.png")
        direct = load_image(tmp_path / "a.png", (32, 32)).pixels
        out = enc({"image": [(tmp_path / "a.png").read_bytes(), direct]})
        assert np.array_equal(out["latent"][0], out["latent"][1])
        with pytest.raises(asyncvae.InputError):
            enc({"image": [np.zeros((4, 4, 3), np.float32)]})
        with pytest.raises(asyncvae.InputError, match="no column"):
            enc({"pixels": ragged})


def test_exif_rotated_bytes_are_sized_after_rotation(server):
    arr = np.random.default_rng(2).integers(0, 256, (64, 128, 3), dtype=np.uint8)  # 128 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 64 wide, 128 high
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", exif=exif)
    with VAEEncode(server.url) as enc:
        out = enc({"image": [buf.getvalue()]})
    assert out["latent"][0].shape == (4, 16, 8)  # [C, H/8, W/8] of the upright 64x128 picture


def test_stable_column_types_and_dropping_images(server):
    with VAEEncode(server.url, resolution=32, keep_images=False, on_error="null") as enc:
        empty = enc({"image": np.zeros((0, 32, 32, 3), np.uint8), "id": np.arange(0)})
        full = enc({"image": _batch(3, 32), "id": np.arange(3)})
        bad = enc({"image": [np.zeros((32, 32, 3), np.float32)], "id": np.arange(1)})
    for out in (empty, full, bad):
        assert "image" not in out and out["latent"].dtype == np.float16 and out["latent"].shape[1:] == (4, 4, 4)
    assert empty["latent"].shape[0] == 0 and full["latent"].shape[0] == 3
    assert np.isnan(bad["latent"][0]).all() and "uint8" in bad["latent_error"][0]


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("cls", [VAEEncode, AsyncVAEEncode], ids=["sync", "async"])
def test_ray_map_batches_with_actor_pool(ray_session, server, cls):
    ray = ray_session
    from ray.data import ActorPoolStrategy

    images = _batch(8)
    ds = ray.data.from_numpy(images).rename_columns({"data": "image"})
    ds = ds.map_batches(cls, fn_constructor_kwargs={"endpoint": server.url, "resolution": 64, "keep_images": False},
                        compute=ActorPoolStrategy(size=1), batch_size=4, batch_format="numpy")
    rows = ds.take_all()
    assert len(rows) == 8 and "image" not in rows[0]
    got = np.stack([r["latent"] for r in rows])
    assert got.shape == (8, 4, 8, 8) and got.dtype == np.float16
    with VAEEncode(server.url, resolution=64) as enc:
        want = enc({"image": images})["latent"]
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))  # same latents (row order may differ)
