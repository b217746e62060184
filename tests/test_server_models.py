"""Real diffusers VAEs behind ``asyncvae serve``: every supported class, as a tiny
randomly initialised model saved with ``save_pretrained`` (no downloads), answers over
HTTP what the same model computes locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

diffusers = pytest.importorskip("diffusers")

from server_helpers import (  # noqa: E402
    TINY_VAES,
    assert_json_error,
    post_decode,
    post_encode,
    read_tensor,
    save_tiny_vae,
    vae_latent,
)

from asyncvae.errors import InputError  # noqa: E402
from asyncvae.server import DiffusersVAE, ServerConfig  # noqa: E402
from asyncvae.server.cli import check_model  # noqa: E402
from asyncvae.server.diffusers_model import find_model  # noqa: E402

VIDEO = {"AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo",
         "AutoencoderKLCogVideoX", "AutoencoderKLQwenImage"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny VAE, saved once per module: class name → folder."""
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name in TINY_VAES:
        save_tiny_vae(name, root / name)
        out[name] = root / name
    return out


def local(name: str, folder: Path) -> Any:
    return getattr(diffusers, name).from_pretrained(folder).eval()


@pytest.mark.parametrize("name", list(TINY_VAES))
def test_each_class_serves_what_it_computes_locally(name: str, saved: dict[str, Path], make_server: Any) -> None:
    folder = saved[name]
    model = DiffusersVAE(folder, device="cpu", dtype="fp32")
    assert model.class_name == name and model.video == (name in VIDEO)
    vae = local(name, folder)
    srv = make_server(model=model)
    c, f = model.latent_channels, model.spatial_factor
    torch.manual_seed(1)
    # decode: a batch of 2 image latents (video models take them as one frame)
    z = torch.randn(2, c, 4, 6)
    got = read_tensor(post_decode(srv.url, z, "pt"))
    with torch.inference_mode():
        ref = vae.decode(z.unsqueeze(2) if model.video else z).sample.clamp(-1, 1)
    if model.video:
        ref = ref.squeeze(2)
    assert got.shape == (2, 3, 4 * f, 6 * f)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # encode: a batch of 2 images → the mode of the latent distribution
    x = torch.rand(2, 3, 4 * f, 6 * f) * 2 - 1
    got_z = read_tensor(post_encode(srv.url, x))
    with torch.inference_mode():
        ref_z = vae_latent(vae.encode(x.unsqueeze(2) if model.video else x))
    if model.video:
        ref_z = ref_z.squeeze(2)
    assert got_z.shape == (2, c, 4, 6)
    torch.testing.assert_close(got_z, ref_z, atol=1e-4, rtol=1e-4)
    # the uint8 path is the same pixels, post-processed
    u8 = read_tensor(post_decode(srv.url, z[:1], "pt", partial_postprocess=True))
    assert u8.shape == (1, 4 * f, 6 * f, 3) and u8.dtype == torch.uint8
    assert srv.stats()["model"].startswith(f"diffusers:{name}:")


@pytest.mark.parametrize(
    "name", ["AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX"]
)
def test_video_vaes_decode_5d_latents_themselves(name: str, saved: dict[str, Path], make_server: Any) -> None:
    folder = saved[name]
    model = DiffusersVAE(folder, device="cpu", dtype="fp32")
    vae = local(name, folder)
    srv = make_server(model=model)
    torch.manual_seed(2)
    z = torch.randn(1, model.latent_channels, 3, 4, 4)
    got = read_tensor(post_decode(srv.url, z, "pt"))
    with torch.inference_mode():
        ref = vae.decode(z).sample.clamp(-1, 1)
    assert got.shape == ref.shape  # the model's own frame count, not an interpolation
    assert got.shape[2] == model.decoded_frames(3)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # a 5-D clip to encode goes through the video encoder as a whole
    frames = model.decoded_frames(3)
    clip = torch.rand(1, 3, frames, 16, 16) * 2 - 1
    got_z = read_tensor(post_encode(srv.url, clip))
    with torch.inference_mode():
        ref_z = vae_latent(vae.encode(clip))
    torch.testing.assert_close(got_z, ref_z, atol=1e-4, rtol=1e-4)
    if model.temporal_factor > 1:  # a clip the encoder would silently trim is refused
        bad = torch.zeros(1, 3, frames + 1, 16, 16)
        assert_json_error(post_encode(srv.url, bad), 400, "frames")


def test_video_vae_answers_mp4(saved: dict[str, Path], make_server: Any) -> None:
    av = pytest.importorskip("av")
    import io

    model = DiffusersVAE(saved["AutoencoderKLWan"], device="cpu", dtype="fp32")
    srv = make_server(model=model)
    z = torch.randn(1, model.latent_channels, 3, 4, 4)
    r = post_decode(srv.url, z, "mp4")
    assert r.status_code == 200 and r.content[4:8] == b"ftyp"
    with av.open(io.BytesIO(r.content)) as container:
        n = len(list(container.decode(video=0)))
    assert n == model.decoded_frames(3) == 9


def test_2d_model_decodes_video_latents_frame_by_frame(saved: dict[str, Path], make_server: Any) -> None:
    folder = saved["AutoencoderKL"]
    model = DiffusersVAE(folder, device="cpu", dtype="fp32")
    vae = local("AutoencoderKL", folder)
    srv = make_server(model=model)
    z = torch.randn(1, 4, 3, 4, 4)
    got = read_tensor(post_decode(srv.url, z, "pt"))
    assert got.shape == (1, 3, 3, 8, 8)  # T frames, no interpolation in time
    with torch.inference_mode():
        ref = vae.decode(z[0].permute(1, 0, 2, 3)).sample.clamp(-1, 1)
    torch.testing.assert_close(got[0].permute(1, 0, 2, 3), ref, atol=1e-4, rtol=1e-4)


def test_default_scaling_uses_latents_mean_and_std(saved: dict[str, Path], make_server: Any) -> None:
    folder = saved["AutoencoderKLWan"]
    model = DiffusersVAE(folder, device="cpu", dtype="fp32")
    srv = make_server(model=model)
    z = torch.randn(1, 4, 2, 4, 4)
    cfg = TINY_VAES["AutoencoderKLWan"]
    mean = torch.tensor(cfg["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(cfg["latents_std"]).view(1, 4, 1, 1, 1)
    scaled = read_tensor(post_decode(srv.url, z, "pt", do_scaling=True))
    plain = read_tensor(post_decode(srv.url, z * std + mean, "pt"))
    torch.testing.assert_close(scaled, plain, atol=1e-4, rtol=1e-4)


def test_pipeline_root_loads_in_the_background(tmp_path: Path, saved: dict[str, Path], make_server: Any) -> None:
    root = tmp_path / "pipe"
    vae = save_tiny_vae("AutoencoderKL", root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    assert find_model(root).folder == root / "vae"
    srv = make_server(model=root, device="cpu", dtype="fp32")  # a path: loaded in the background
    srv.wait_ready(60)
    assert requests.get(srv.url + "ready", timeout=5).json()["status"] == "ready"
    z = torch.randn(1, 4, 4, 4)
    with torch.inference_mode():
        ref = vae.decode(z).sample.clamp(-1, 1)
    torch.testing.assert_close(read_tensor(post_decode(srv.url, z, "pt")), ref, atol=1e-4, rtol=1e-4)


def test_fp16_and_bf16_run_in_that_dtype(saved: dict[str, Path], make_server: Any) -> None:
    folder = saved["AutoencoderKL"]
    z = torch.randn(1, 4, 4, 4)
    ref = read_tensor(post_decode(make_server(model=DiffusersVAE(folder, device="cpu", dtype="fp32")).url, z, "pt"))
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = DiffusersVAE(folder, device="cpu", dtype=dtype)
        assert next(model.vae.parameters()).dtype == torch_dtype
        got = read_tensor(post_decode(make_server(model=model).url, z, "pt"))
        torch.testing.assert_close(got, ref, atol=0.1, rtol=0)  # reduced precision, same model


def test_tiling_and_slicing_switches(saved: dict[str, Path]) -> None:
    model = DiffusersVAE(saved["AutoencoderKL"], device="cpu", dtype="fp32", tiling=True, slicing=True)
    assert model.vae.use_tiling and model.vae.use_slicing


# --------------------------------------------------------------------------- errors


def _one_line(e: pytest.ExceptionInfo[InputError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_model_errors_are_one_line_and_name_the_fix(tmp_path: Path, saved: dict[str, Path]) -> None:
    with pytest.raises(InputError) as e:
        DiffusersVAE(tmp_path / "missing")
    assert "download" in _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as e:
        DiffusersVAE(tmp_path / "empty")
    assert "config.json" in _one_line(e)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(InputError) as e:
        DiffusersVAE(tmp_path / "pipe")
    assert "vae/" in _one_line(e)
    for name, fragment in (("AutoencoderFromTheFuture", "pip install -U diffusers"),
                           ("UNet2DModel", "not a VAE"),
                           ("AutoencoderKLTemporalDecoder", "num_frames")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(InputError) as e:
            check_model(ServerConfig(model=str(d)))
        msg = _one_line(e)
        assert name in msg and fragment in msg, msg
    # weights missing: the class is named, and what to check
    broken = tmp_path / "noweights"
    broken.mkdir()
    (broken / "config.json").write_text((saved["AutoencoderTiny"] / "config.json").read_text())
    with pytest.raises(InputError) as e:
        DiffusersVAE(broken, device="cpu")
    assert "AutoencoderTiny" in _one_line(e) and "weights" in str(e.value)
    with pytest.raises(InputError) as e:
        DiffusersVAE(saved["AutoencoderTiny"], device="cpu", slicing=False, dtype="fp8")
    assert "--dtype" in _one_line(e)
    if not torch.cuda.is_available():
        with pytest.raises(InputError) as e:
            DiffusersVAE(saved["AutoencoderTiny"], device="cuda")
        assert "--device cpu" in _one_line(e)


def test_cli_refuses_a_bad_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from asyncvae.cli import main

    assert main(["serve", "--port", "0", "--model", str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    assert out == ""  # refused before binding
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncvae serve: error: --model"), err


def test_cli_serves_a_real_vae_after_loading(serve_subprocess: Any, saved: dict[str, Path]) -> None:
    import time

    sp = serve_subprocess("--model", str(saved["AutoencoderTiny"]), "--device", "cpu", "--dtype", "fp32")
    deadline = time.monotonic() + 120
    while requests.get(sp.url + "ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "".join(sp.output)
        time.sleep(0.1)
    z = torch.randn(1, 4, 4, 4)
    got = read_tensor(post_decode(sp.url, z, "pt"))
    vae = local("AutoencoderTiny", saved["AutoencoderTiny"])
    with torch.inference_mode():
        torch.testing.assert_close(got, vae.decode(z).sample.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    assert any("model ready: diffusers:AutoencoderTiny" in line for line in sp.output)
    assert sp.terminate() == 0


def test_diffusers_and_asyncvae_clients_against_a_real_vae(saved: dict[str, Path], make_server: Any) -> None:
    """diffusers' own remote_decode/remote_encode and ours, against a served AutoencoderKL
    with batching on, get what the model computes locally."""
    from diffusers.utils.remote_utils import remote_decode as d_decode
    from diffusers.utils.remote_utils import remote_encode as d_encode
    from PIL import Image

    import asyncvae

    folder = saved["AutoencoderKL"]
    vae = local("AutoencoderKL", folder)
    srv = make_server(model=DiffusersVAE(folder, device="cpu", dtype="fp32"), max_batch=4)
    z = torch.randn(1, 4, 8, 8)
    opts: dict[str, Any] = dict(output_type="pt", partial_postprocess=True, return_type="pt", scaling_factor=0.5)
    theirs = d_decode(srv.url, z, **opts)
    ours = asyncvae.remote_decode(srv.url, z, **opts)
    with torch.inference_mode():
        ref = vae.decode(z / 0.5).sample.clamp(-1, 1)
    ref_u8 = ((ref / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(theirs, ours)
    assert (theirs.int() - ref_u8.int()).abs().max() <= 1
    image = Image.fromarray(ref_u8[0].numpy())
    with torch.inference_mode():
        x = torch.from_numpy(ref_u8[0].numpy().copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        ref_z = vae_latent(vae.encode(x)) * 0.5
    got_theirs = d_encode(srv.url, image, scaling_factor=0.5)
    got_ours = asyncvae.remote_encode(srv.url, image, scaling_factor=0.5)
    torch.testing.assert_close(got_theirs.float(), ref_z, atol=2e-3, rtol=1e-2)  # float16 on the wire
    torch.testing.assert_close(got_ours.float(), ref_z, atol=2e-3, rtol=1e-2)
