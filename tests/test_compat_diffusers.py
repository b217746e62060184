"""asyncvae's drop-in functions against diffusers' own ``remote_decode``/``remote_encode``,
side by side on the project's reference server.

Where diffusers works, both must give identical results (tensor dtype/shape/values,
PIL mode/size/format/pixels, bytes). Where diffusers breaks (documented holes in
PROTOCOL.md), asyncvae must be right: those tests pin asyncvae's result and accept
either diffusers' known failure or, should a future diffusers fix it, the same result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import requests
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode as d_decode
from diffusers.utils.remote_utils import remote_encode as d_encode
from diffusers.video_processor import VideoProcessor
from images import image_tensor, latents, picture
from PIL import Image

import asyncvae
from asyncvae.server import Faults, LocalServer, ServerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

IMG_PROC = VaeImageProcessor()
VID_PROC = VideoProcessor()

SD_SCALE = 0.18215
SDXL_SCALE = 0.13025
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159
HUNYUAN_SCALE = 0.476986


@pytest.fixture(scope="module")
def srv() -> Iterator[LocalServer]:
    """One default reference server for the whole module (starting one is cheap, but
    sharing it lets asyncvae reuse its pooled connection)."""
    with LocalServer(ServerConfig()) as s:
        yield s


@pytest.fixture
def no_retry() -> Iterator[None]:
    """asyncvae's sync functions without retries; defaults restored afterwards."""
    asyncvae.configure(retry=asyncvae.Retry.none())
    try:
        yield
    finally:
        asyncvae.configure()


def assert_same(a: Any, b: Any, where: str = "result") -> None:
    """``a`` and ``b`` are the same value: tensors by dtype/shape/``torch.equal``, PIL
    images by mode/size/format/pixels, lists elementwise, bytes by equality."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b).__name__} is not a tensor"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {list(a.shape)} != {list(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, Image.Image):
        assert isinstance(b, Image.Image), f"{where}: {type(b).__name__} is not a PIL image"
        assert (a.mode, a.size, a.format) == (b.mode, b.size, b.format), (
            f"{where}: mode/size/format {(a.mode, a.size, a.format)} != {(b.mode, b.size, b.format)}"
        )
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"{where}: pixels differ"
    elif isinstance(a, list):
        assert isinstance(b, list), f"{where}: {type(b).__name__} is not a list"
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, bytes):
        assert isinstance(b, bytes), f"{where}: {type(b).__name__} is not bytes"
        assert a == b, f"{where}: bytes differ ({len(a)} vs {len(b)})"
    else:  # pragma: no cover - the matrix only produces the types above
        raise AssertionError(f"{where}: unexpected type {type(a).__name__}")


def diffusers_or_known_hole(call: Callable[[], Any], hole: type[BaseException]) -> Any:
    """diffusers' result, or ``None`` when it fails with its documented ``hole``."""
    try:
        return call()
    except hole:
        return None


# --------------------------------------------------------------------------- inputs


@functools.cache
def lat(name: str) -> torch.Tensor:
    """The matrix's latents by name (cached; never mutated)."""
    return {
        "sd": lambda: latents(1, 4, 64, 64, dtype=torch.float16, seed=1),
        "sd_f32": lambda: latents(1, 4, 64, 64, dtype=torch.float32, seed=2),
        "sd_b2": lambda: latents(2, 4, 64, 64, dtype=torch.float16, seed=3),
        "sdxl_f16": lambda: latents(1, 4, 128, 128, dtype=torch.float16, seed=4),
        "sdxl_bf16": lambda: latents(1, 4, 128, 128, dtype=torch.bfloat16, seed=5),
        "flux": lambda: latents(1, 16, 128, 128, dtype=torch.bfloat16, seed=6),
        "flux_packed": lambda: latents(1, 4096, 64, dtype=torch.bfloat16, seed=7),
        "video": lambda: latents(1, 16, 3, 40, 64, dtype=torch.float16, seed=8),
    }[name]()


PACKED_HW = {"height": 1024, "width": 1024}

# (id, latents, options); "processor" is "image"/"video" and made real in the test.
DECODE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    # SD v1 512²: the option matrix
    ("sd-default", "sd", {}),
    ("sd-pil-jpg-scale", "sd", {"scaling_factor": SD_SCALE}),
    ("sd-pil-png-scale", "sd", {"scaling_factor": SD_SCALE, "image_format": "png"}),
    (
        "sd-pil-png-scale-shift",
        "sd",
        {"scaling_factor": SD_SCALE, "shift_factor": 0.05, "image_format": "png"},
    ),
    ("sd-pil-shift-only", "sd", {"shift_factor": 0.1, "image_format": "png"}),
    ("sd-pil-noscaling", "sd", {"do_scaling": False, "scaling_factor": SD_SCALE}),
    (
        "sd-pt-pt-do-scaling-none",
        "sd",
        {
            "output_type": "pt",
            "return_type": "pt",
            "do_scaling": None,
            "scaling_factor": SD_SCALE,
            "shift_factor": 0.1,
        },
    ),
    ("sd-pt-pt-int-scale", "sd", {"output_type": "pt", "return_type": "pt", "scaling_factor": 2}),
    (
        "sd-pt-pt-pp-processor-ignored",
        "sd",
        {
            "output_type": "pt",
            "return_type": "pt",
            "partial_postprocess": True,
            "processor": "image",
            "scaling_factor": SD_SCALE,
        },
    ),
    ("sd-hw-on-4d", "sd", {"output_type": "pt", "return_type": "pt", "height": 512, "width": 512}),
    ("sd-pt-pt", "sd", {"output_type": "pt", "return_type": "pt", "scaling_factor": SD_SCALE}),
    ("sd-pt-pt-noscaling", "sd", {"output_type": "pt", "return_type": "pt", "do_scaling": False}),
    ("sd-pt-pt-deprecated-scaling", "sd", {"output_type": "pt", "return_type": "pt"}),
    (
        "sd-pt-pt-pp",
        "sd",
        {
            "output_type": "pt",
            "return_type": "pt",
            "partial_postprocess": True,
            "scaling_factor": SD_SCALE,
        },
    ),
    (
        "sd-pt-pil-pp",
        "sd",
        {"output_type": "pt", "partial_postprocess": True, "scaling_factor": SD_SCALE},
    ),
    (
        "sd-pt-pil-processor",
        "sd",
        {"output_type": "pt", "processor": "image", "scaling_factor": SD_SCALE},
    ),
    (
        "sd-pt-pt-processor",
        "sd",
        {
            "output_type": "pt",
            "return_type": "pt",
            "processor": "image",
            "scaling_factor": SD_SCALE,
        },
    ),
    ("sd-pil-processor-pil", "sd", {"processor": "image", "scaling_factor": SD_SCALE}),
    (
        "sd-pil-processor-pt",
        "sd",
        {"processor": "image", "return_type": "pt", "scaling_factor": SD_SCALE},
    ),
    (
        "sd-base64-deprecated",
        "sd",
        {
            "output_type": "pt",
            "return_type": "pt",
            "input_tensor_type": "base64",
            "output_tensor_type": "base64",
            "scaling_factor": SD_SCALE,
        },
    ),
    (
        "sd-f32-pt-pt",
        "sd_f32",
        {"output_type": "pt", "return_type": "pt", "scaling_factor": SD_SCALE},
    ),
    # a batch of 2
    ("b2-pt-pt", "sd_b2", {"output_type": "pt", "return_type": "pt", "scaling_factor": SD_SCALE}),
    (
        "b2-pt-pil-pp",
        "sd_b2",
        {"output_type": "pt", "partial_postprocess": True, "scaling_factor": SD_SCALE},
    ),
    (
        "b2-pt-pt-pp",
        "sd_b2",
        {
            "output_type": "pt",
            "return_type": "pt",
            "partial_postprocess": True,
            "scaling_factor": SD_SCALE,
        },
    ),
    ("b2-pil-processor", "sd_b2", {"processor": "image", "scaling_factor": SD_SCALE}),
    (
        "b2-pt-pil-processor",
        "sd_b2",
        {"output_type": "pt", "processor": "image", "scaling_factor": SD_SCALE},
    ),
    # SDXL 1024²
    ("sdxl-f16-pil-jpg", "sdxl_f16", {"scaling_factor": SDXL_SCALE}),
    (
        "sdxl-f16-pt-pil-pp",
        "sdxl_f16",
        {"output_type": "pt", "partial_postprocess": True, "scaling_factor": SDXL_SCALE},
    ),
    (
        "sdxl-bf16-pt-pt",
        "sdxl_bf16",
        {"output_type": "pt", "return_type": "pt", "scaling_factor": SDXL_SCALE},
    ),
    ("sdxl-bf16-pil-png", "sdxl_bf16", {"scaling_factor": SDXL_SCALE, "image_format": "png"}),
    # Flux 1024², unpacked and packed
    (
        "flux-pt-pt",
        "flux",
        {
            "output_type": "pt",
            "return_type": "pt",
            "scaling_factor": FLUX_SCALE,
            "shift_factor": FLUX_SHIFT,
        },
    ),
    ("flux-pil-jpg", "flux", {"scaling_factor": FLUX_SCALE, "shift_factor": FLUX_SHIFT}),
    (
        "flux-packed-pt-pil-pp",
        "flux_packed",
        {
            "output_type": "pt",
            "partial_postprocess": True,
            "scaling_factor": FLUX_SCALE,
            "shift_factor": FLUX_SHIFT,
            **PACKED_HW,
        },
    ),
    (
        "flux-packed-pt-pt",
        "flux_packed",
        {
            "output_type": "pt",
            "return_type": "pt",
            "scaling_factor": FLUX_SCALE,
            "shift_factor": FLUX_SHIFT,
            **PACKED_HW,
        },
    ),
    ("flux-packed-pil-jpg-noscaling", "flux_packed", {"do_scaling": False, **PACKED_HW}),
    # video [1,16,3,40,64] → 9 frames of 320x512
    ("video-pil-processor-pil", "video", {"processor": "video", "scaling_factor": HUNYUAN_SCALE}),
    (
        "video-pil-processor-pt",
        "video",
        {"processor": "video", "return_type": "pt", "scaling_factor": HUNYUAN_SCALE},
    ),
    (
        "video-pt-pil-processor",
        "video",
        {"output_type": "pt", "processor": "video", "scaling_factor": HUNYUAN_SCALE},
    ),
    (
        "video-pt-pt",
        "video",
        {"output_type": "pt", "return_type": "pt", "scaling_factor": HUNYUAN_SCALE},
    ),
    (
        "video-pt-pil-pp",
        "video",
        {"output_type": "pt", "partial_postprocess": True, "scaling_factor": HUNYUAN_SCALE},
    ),
]


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    proc = {"image": IMG_PROC, "video": VID_PROC, None: None}[opts.get("processor")]
    return {**opts, "processor": proc}


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("name", "opts"), [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES]
)
def test_decode_matches_diffusers(srv: LocalServer, name: str, opts: dict[str, Any]) -> None:
    x = lat(name)
    kw = _options(opts)
    expected = d_decode(srv.url, x, **kw)
    got = asyncvae.remote_decode(srv.url, x, **kw)
    assert_same(expected, got)
    assert torch.equal(x, lat(name)), "the caller's latents were modified"


def test_decode_positional_arguments_match_diffusers(srv: LocalServer) -> None:
    """Every parameter in diffusers' positional order."""
    args = (
        srv.url,
        lat("sd"),
        None,
        True,
        SD_SCALE,
        None,
        "pt",
        "pt",
        "jpg",
        True,
        "binary",
        "binary",
        None,
        None,
    )
    assert_same(d_decode(*args), asyncvae.remote_decode(*args))


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_decode_pil_with_return_type_pt(srv: LocalServer, image_format: str) -> None:
    """diffusers leaves ``output`` unbound for output_type="pil", return_type="pt" without
    a processor; asyncvae gives the image's pixels as a ``[1,H,W,3]`` uint8 tensor."""
    x = lat("sd")
    image = d_decode(srv.url, x, scaling_factor=SD_SCALE, image_format=image_format)
    got = asyncvae.remote_decode(
        srv.url, x, scaling_factor=SD_SCALE, image_format=image_format, return_type="pt"
    )
    assert_same(torch.from_numpy(np.asarray(image).copy()).unsqueeze(0), got)
    broken = diffusers_or_known_hole(
        lambda: d_decode(
            srv.url, x, scaling_factor=SD_SCALE, image_format=image_format, return_type="pt"
        ),
        UnboundLocalError,
    )
    if broken is not None:
        assert_same(broken, got)


@pytest.mark.parametrize("return_type", ["mp4", "pil", "pt"])
def test_decode_mp4(srv: LocalServer, return_type: str) -> None:
    """output_type="mp4" returns the mp4 bytes whatever return_type is; diffusers only
    manages return_type="mp4" (UnboundLocalError otherwise)."""
    x = lat("video")
    reference = d_decode(
        srv.url, x, output_type="mp4", return_type="mp4", scaling_factor=HUNYUAN_SCALE
    )
    assert isinstance(reference, bytes)
    got = asyncvae.remote_decode(
        srv.url, x, output_type="mp4", return_type=return_type, scaling_factor=HUNYUAN_SCALE
    )
    assert isinstance(got, bytes)
    assert got[4:8] == b"ftyp", got[:16]
    assert_same(reference, got)
    if return_type != "mp4":
        theirs = diffusers_or_known_hole(
            lambda: d_decode(
                srv.url, x, output_type="mp4", return_type=return_type, scaling_factor=HUNYUAN_SCALE
            ),
            UnboundLocalError,
        )
        if theirs is not None:
            assert_same(theirs, got)


def test_decode_mp4_default_return_type(srv: LocalServer) -> None:
    """The acceptance case verbatim: only output_type="mp4", default return_type."""
    got = asyncvae.remote_decode(srv.url, lat("video"), output_type="mp4")
    assert isinstance(got, bytes) and got[4:8] == b"ftyp"
    assert_same(d_decode(srv.url, lat("video"), output_type="mp4", return_type="mp4"), got)


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("sd", {"scaling_factor": np.float32(SD_SCALE)}),
        ("sd", {"scaling_factor": np.float64(SD_SCALE), "shift_factor": np.float16(0.5)}),
        (
            "flux_packed",
            {
                "scaling_factor": np.float32(FLUX_SCALE),
                "shift_factor": np.float32(FLUX_SHIFT),
                "height": np.int64(1024),
                "width": np.int64(1024),
            },
        ),
        ("flux_packed", {"height": np.int32(1024), "width": 1024}),
    ],
    ids=[
        "np-float32-scale",
        "np-float64-scale-np-float16-shift",
        "packed-np-float32-np-int64",
        "packed-np-int32",
    ],
)
def test_decode_numpy_scalar_options(srv: LocalServer, name: str, opts: dict[str, Any]) -> None:
    """diffusers ``str()``-formats any scalar (numpy scalars from configs or arithmetic
    included); the drop-in must accept them too and send the same values."""
    kw = {"output_type": "pt", "return_type": "pt", **opts}
    assert_same(
        d_decode(srv.url, lat(name), **kw), asyncvae.remote_decode(srv.url, lat(name), **kw)
    )


# --------------------------------------------------------------------------- non-contiguous


def _noncontig_latents() -> dict[str, torch.Tensor]:
    sd = latents(1, 4, 64, 64, seed=11)
    big = latents(2, 8, 128, 128, seed=12)
    col = latents(1, 4, 64, 1, seed=13)
    flux = latents(1, 64, 4096, dtype=torch.bfloat16, seed=14)
    video = latents(1, 16, 40, 3, 64, seed=15)
    return {
        "transposed": sd.transpose(2, 3),
        "expanded": col.expand(1, 4, 64, 64),
        "expanded-batch": sd.expand(2, 4, 64, 64),
        "sliced-channels": big[:1, 2:6, :64, :64],
        "strided": big[:1, :4, ::2, ::2],
        "offset": big[1:2, :4, :64, :64].contiguous()[:, :, :, :],
        "channels-last": sd.to(memory_format=torch.channels_last),
        "requires-grad": sd.float().requires_grad_(),
        "packed-transposed": flux.transpose(1, 2),
        "video-permuted": video.permute(0, 1, 3, 2, 4),
    }


NONCONTIG = _noncontig_latents()


@pytest.mark.parametrize("case", list(NONCONTIG))
def test_decode_non_contiguous_sends_logical_values(srv: LocalServer, case: str) -> None:
    """diffusers (with safetensors 0.8) silently sends a view's *storage* order (a
    transposed latent arrives untransposed); asyncvae sends the logical values, so it
    must equal diffusers given ``x.contiguous()``."""
    x = NONCONTIG[case]
    kw: dict[str, Any] = {"output_type": "pt", "return_type": "pt", "scaling_factor": SD_SCALE}
    if x.dim() == 3:
        kw.update(PACKED_HW)
    expected = d_decode(srv.url, x.detach().contiguous(), **kw)
    got = asyncvae.remote_decode(srv.url, x, **kw)
    assert_same(expected, got)


def test_decode_non_contiguous_pil(srv: LocalServer) -> None:
    x = NONCONTIG["transposed"]
    expected = d_decode(srv.url, x.contiguous(), scaling_factor=SD_SCALE, image_format="png")
    assert_same(
        expected, asyncvae.remote_decode(srv.url, x, scaling_factor=SD_SCALE, image_format="png")
    )


# --------------------------------------------------------------------------- encode


ENCODE_IMAGES: dict[str, Callable[[], Any]] = {
    "pil-512": lambda: picture(512, 512, seed=1),
    "pil-odd-size": lambda: picture(100, 75, seed=2),
    "pil-rgba": lambda: picture(64, 48, seed=3, mode="RGBA"),
    "pil-L": lambda: picture(64, 64, seed=4, mode="L"),
    "tensor-f32": lambda: image_tensor(1, 512, 512, torch.float32, seed=5),
    "tensor-f16-batch2": lambda: image_tensor(2, 64, 128, torch.float16, seed=6),
    "tensor-bf16": lambda: image_tensor(1, 64, 64, torch.bfloat16, seed=7),
    "tensor-3d": lambda: image_tensor(None, 64, 64, torch.float32, seed=8),
    "tensor-uint8": lambda: image_tensor(1, 64, 64, torch.uint8, seed=9),
}
ENCODE_SCALING = {
    "none": {},
    "scale": {"scaling_factor": SD_SCALE},
    "scale-shift": {"scaling_factor": FLUX_SCALE, "shift_factor": FLUX_SHIFT},
}


@pytest.mark.parametrize(
    ("image", "scaling"),
    [(i, "scale") for i in ENCODE_IMAGES]
    + [
        ("pil-512", "none"),
        ("pil-512", "scale-shift"),
        ("tensor-f32", "none"),
        ("tensor-f32", "scale-shift"),
    ],
)
def test_encode_matches_diffusers(srv: LocalServer, image: str, scaling: str) -> None:
    img = ENCODE_IMAGES[image]()
    kw = ENCODE_SCALING[scaling]
    assert_same(d_encode(srv.url, img, **kw), asyncvae.remote_encode(srv.url, img, **kw))


def test_encode_positional_arguments_match_diffusers(srv: LocalServer) -> None:
    img = picture(64, 64, seed=20)
    args = (srv.url, img, FLUX_SCALE, FLUX_SHIFT)
    assert_same(d_encode(*args), asyncvae.remote_encode(*args))


@pytest.mark.parametrize(
    "scale", [np.float32(SD_SCALE), np.float64(SD_SCALE)], ids=["np-float32", "np-float64"]
)
def test_encode_numpy_scalar_scaling(srv: LocalServer, scale: Any) -> None:
    img = picture(64, 64, seed=21)
    kw = {"scaling_factor": scale, "shift_factor": np.float32(FLUX_SHIFT)}
    assert_same(d_encode(srv.url, img, **kw), asyncvae.remote_encode(srv.url, img, **kw))


def _noncontig_images() -> dict[str, torch.Tensor]:
    hwc = torch.from_numpy(
        image_tensor(1, 64, 64, seed=30)[0].permute(1, 2, 0).contiguous().numpy()
    )
    big = image_tensor(2, 128, 128, seed=31)
    one = image_tensor(1, 64, 64, seed=32)
    return {
        "permuted-from-hwc": hwc.permute(2, 0, 1).unsqueeze(0),
        "sliced": big[1:, :, 32:96, 16:80],
        "strided": big[:, :, ::2, ::2],
        "expanded": one.expand(3, 3, 64, 64),
        "channel-flipped": big[:1].flip(1)[:, :, :64, :64].transpose(2, 3),
        "channels-last-f16": one.half().to(memory_format=torch.channels_last),
    }


NONCONTIG_IMAGES = _noncontig_images()


@pytest.mark.parametrize("case", list(NONCONTIG_IMAGES))
def test_encode_non_contiguous_sends_logical_values(srv: LocalServer, case: str) -> None:
    x = NONCONTIG_IMAGES[case]
    expected = d_encode(srv.url, x.contiguous(), scaling_factor=SD_SCALE)
    assert_same(expected, asyncvae.remote_encode(srv.url, x, scaling_factor=SD_SCALE))


# --------------------------------------------------------------------------- errors


#: Requests the client can't reject but the server does: (op, URL suffix, input, options).
HTTP_ERROR_CASES: dict[str, tuple[str, str, Callable[[], Any], dict[str, Any]]] = {
    "packed-token-mismatch": (
        "decode",
        "",
        lambda: lat("flux_packed"),
        {"output_type": "pt", "return_type": "pt", "height": 512, "width": 512},
    ),
    "pil-batch-without-processor": ("decode", "", lambda: lat("sd_b2"), {}),
    "mp4-batch": (
        "decode",
        "",
        lambda: latents(2, 16, 2, 8, 8, seed=40),
        {"output_type": "mp4", "return_type": "mp4"},
    ),
    "decode-scaling-factor-0": ("decode", "", lambda: lat("sd"), {"scaling_factor": 0}),
    "encode-scaling-factor-0": ("encode", "", lambda: picture(64, 64), {"scaling_factor": 0.0}),
    "unknown-path-404": (
        "decode",
        "no/such/endpoint",
        lambda: lat("sd"),
        {"output_type": "pt", "return_type": "pt"},
    ),
}


@pytest.mark.parametrize("case", list(HTTP_ERROR_CASES))
def test_http_error_is_runtime_error_with_json_body(srv: LocalServer, case: str) -> None:
    """diffusers raises ``RuntimeError(response.json())``; asyncvae raises a RuntimeError
    subclass with the same ``args[0]``, without retrying a 4xx."""
    op, suffix, make, kw = HTTP_ERROR_CASES[case]
    theirs, ours = (
        (d_decode, asyncvae.remote_decode) if op == "decode" else (d_encode, asyncvae.remote_encode)
    )
    url = srv.url + suffix
    with pytest.raises(RuntimeError) as d_err:
        theirs(url, make(), **kw)
    before = _request_count(srv)
    with pytest.raises(RuntimeError) as a_err:
        ours(url, make(), **kw)
    if not suffix:
        assert _request_count(srv) == before + 1, "a 4xx must not be retried"
    assert isinstance(d_err.value.args[0], dict) and "error" in d_err.value.args[0]
    assert a_err.value.args[0] == d_err.value.args[0]
    assert isinstance(a_err.value, asyncvae.AsyncVAEError)


def test_body_size_mismatch_answers_400_json(srv: LocalServer) -> None:
    """The clients always send matching bodies; a raw request that doesn't gets the
    server's 400 JSON, the body ``RuntimeError(response.json())`` carries above."""
    resp = requests.post(
        srv.url,
        params=[
            ("image_format", "jpg"),
            ("output_type", "pt"),
            ("partial_postprocess", "False"),
            ("shape", "1"),
            ("shape", "4"),
            ("shape", "64"),
            ("shape", "64"),
            ("dtype", "float16"),
        ],
        data=lat("sd").numpy().tobytes()[:-2],
        headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
        timeout=30,
    )
    assert resp.status_code == 400
    assert set(resp.json()) == {"error"} and "bytes" in resp.json()["error"]


def test_non_json_error_body_raises_http_error(
    make_server: Callable[..., LocalServer], no_retry: None
) -> None:
    """A gateway's HTML 502: diffusers fails decoding JSON; asyncvae raises a RuntimeError
    whose args[0] names the status and the text."""
    bad = make_server(faults=Faults(fault_502_html=1.0))
    x = lat("sd")
    try:
        d_decode(bad.url, x, output_type="pt", return_type="pt")
    except RuntimeError as e:  # a fixed diffusers would raise the HTTP error
        assert "502" in str(e.args[0])
    except ValueError:  # requests' JSONDecodeError: the documented hole
        pass
    bad.reset_stats()
    with pytest.raises(RuntimeError) as err:
        asyncvae.remote_decode(bad.url, x, output_type="pt", return_type="pt")
    first = err.value.args[0]
    assert "502" in str(first) and "Bad Gateway" in str(first), first
    assert bad.stats()["requests"].get("decode") == 1, "Retry.none() must send exactly one request"
    with pytest.raises(RuntimeError) as err:
        asyncvae.remote_encode(bad.url, picture(64, 64))
    assert "502" in str(err.value.args[0]) and "Bad Gateway" in str(err.value.args[0])


def _request_count(server: LocalServer) -> int:
    stats = requests.get(server.url + "stats", timeout=10).json()
    return sum(stats["requests"].values())
