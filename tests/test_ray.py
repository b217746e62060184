"""The Ray Data adapter: ``VAEEncode`` as a plain callable (always), and inside Ray Data
(only where ``ray`` is installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asyncvae
from asyncvae.integrations.ray import VAEEncode
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
    assert out["latent"].shape == (6, 4, 8, 8) and out["latent"].dtype == np.float16
    assert (out["id"] == np.arange(6)).all() and out["image"] is images
    expected = await _expected(server.url, list(images))
    for got, exp in zip(out["latent"], expected, strict=True):
        assert torch.equal(torch.from_numpy(got), exp.to(torch.float16))


def test_vaeencode_resolution_ragged_and_errors(server, tmp_path):
    from PIL import Image

    ragged = np.empty(3, dtype=object)
    ragged[0] = np.zeros((40, 72, 3), np.uint8)
    ragged[1] = np.full((64, 64), 128, np.uint8)  # grayscale
    ragged[2] = np.zeros((2, 2, 3), np.uint8)  # too small once cropped to multiples of 8
    with VAEEncode(server.url, on_error="null", dtype="float32") as enc:
        out = enc({"image": ragged})
    assert out["latent"][0].shape == (4, 5, 9) and out["latent"][1].shape == (4, 8, 8)
    assert out["latent"][2] is None and "8x8" in out["latent_error"][2]
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


def test_ray_map_batches(server):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        ds = ray.data.from_numpy(_batch(8)).rename_columns({"data": "image"})
        ds = ds.map_batches(VAEEncode, fn_constructor_kwargs={"endpoint": server.url}, concurrency=1,
                            batch_size=4, batch_format="numpy")
        rows = ds.take_all()
        assert len(rows) == 8 and rows[0]["latent"].shape == (4, 8, 8)
    finally:
        ray.shutdown()
