"""HTTP helpers and tiny diffusers VAE configs for the server tests (plain ``requests``,
never the project's client). Import as ``from server_helpers import ...`` (``tests/``
is on ``sys.path`` under pytest's default import mode)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import requests
import torch

from asyncvae import protocol as P


def decode_params(
    shape: Any,
    dtype: str,
    output_type: str = "pt",
    partial_postprocess: bool = False,
    image_format: str = "jpg",
    **extra: Any,
) -> list[tuple[str, str]]:
    """Query parameters in the reference client's order."""
    p = [
        ("image_format", image_format),
        ("output_type", output_type),
        ("partial_postprocess", str(partial_postprocess)),
    ]
    p += [("shape", str(s)) for s in shape]
    p.append(("dtype", dtype))
    p += [(k, str(v)) for k, v in extra.items()]
    return p


def accept_for(output_type: str, image_format: str = "jpg", processor: bool = False) -> str:
    if output_type == "pil" and not processor:
        return P.CONTENT_TYPE_JPEG if image_format == "jpg" else P.CONTENT_TYPE_PNG
    if output_type == "mp4":
        return P.CONTENT_TYPE_MP4
    return P.CONTENT_TYPE_TENSOR


def post_decode(
    url: str,
    latents: torch.Tensor,
    output_type: str = "pt",
    partial_postprocess: bool = False,
    image_format: str = "jpg",
    processor: bool = False,
    accept: str | None = None,
    **extra: Any,
) -> requests.Response:
    params = decode_params(
        latents.shape, P.dtype_name(latents.dtype), output_type, partial_postprocess, image_format, **extra
    )
    headers = {
        "Content-Type": P.CONTENT_TYPE_TENSOR,
        "Accept": accept or accept_for(output_type, image_format, processor),
    }
    return requests.post(url, params=params, data=bytes(P.tensor_body(latents)), headers=headers, timeout=30)


def post_encode(url: str, data: Any, **params: Any) -> requests.Response:
    """Encode a tensor (with shape/dtype params) or raw image bytes (no Content-Type)."""
    q: list[tuple[str, str]] = [(k, str(v)) for k, v in params.items()]
    if isinstance(data, torch.Tensor):
        q += [("shape", str(s)) for s in data.shape] + [("dtype", P.dtype_name(data.dtype))]
        data = bytes(P.tensor_body(data))
    return requests.post(url, params=q, data=data, timeout=30)


def read_tensor(resp: requests.Response) -> torch.Tensor:
    """The tensor of a response, checked against its shape/dtype headers."""
    assert resp.status_code == 200, resp.text
    h = resp.headers
    assert h["Content-Type"] == P.CONTENT_TYPE_TENSOR
    shape = json.loads(h["shape"])
    dtype = P.DTYPES[h["dtype"]]
    assert len(resp.content) == math.prod(shape) * dtype.itemsize
    return torch.frombuffer(bytearray(resp.content), dtype=dtype).reshape(shape)


def assert_json_error(resp: requests.Response, status: int, *fragments: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith(P.CONTENT_TYPE_JSON)
    msg = resp.json()["error"]
    assert isinstance(msg, str) and msg
    for frag in fragments:
        assert frag.lower() in msg.lower(), msg
    return msg


# --------------------------------------------------------------------------- tiny VAEs

#: diffusers class → constructor kwargs of a randomly initialised model small enough to
#: run in a few milliseconds on a CPU (few channels, one layer per block, small factors).
TINY_VAES: dict[str, dict[str, Any]] = {
    "AutoencoderKL": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    ),
    "AutoencoderTiny": dict(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ),
    "AutoencoderDC": dict(
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    ),
    "AutoencoderKLWan": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
    ),
    "AutoencoderKLHunyuanVideo": dict(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    ),
    "AutoencoderKLLTXVideo": dict(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        patch_size=1,
        patch_size_t=1,
    ),
    "AutoencoderKLCogVideoX": dict(
        block_out_channels=(8, 8, 8),
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
    ),
    "AutoencoderKLQwenImage": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ),
}


def save_tiny_vae(name: str, folder: Path, seed: int = 0) -> Any:
    """Build the tiny ``name`` VAE with random weights (seeded), ``save_pretrained`` it
    into ``folder`` and return the model (eval mode, float32, CPU)."""
    import diffusers

    torch.manual_seed(seed)
    vae = getattr(diffusers, name)(**TINY_VAES[name]).eval()
    vae.save_pretrained(folder)
    return vae


def vae_latent(out: Any) -> torch.Tensor:
    """The latent of a diffusers ``encode()`` output, as the server takes it (the mode)."""
    for attr in ("latent_dist", "latents", "latent"):
        v = getattr(out, attr, None)
        if v is not None:
            return v.mode() if attr == "latent_dist" else v
    raise TypeError(f"no latent in {type(out).__name__}")
