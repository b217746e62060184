"""The sync layer: ``remote_decode``/``remote_encode`` and the ordered batch functions.

Bad input is an :class:`asyncvae.InputError` (a ``ValueError``) raised before anything
is sent; calls work from many threads at once and from inside a running event loop
(Jupyter); batches keep input order and put an :class:`asyncvae.ItemError` where an
item failed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode as d_decode
from diffusers.utils.remote_utils import remote_encode as d_encode
from images import image_tensor, latents, picture
from PIL import Image

import asyncvae
from asyncvae.server import LocalServer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

#: Small, fast, exact: uint8 images as a tensor.
U8 = {
    "output_type": "pt",
    "partial_postprocess": True,
    "return_type": "pt",
    "scaling_factor": 0.18215,
}


def request_count(server: LocalServer) -> int:
    """Requests the server has seen, from ``GET /stats``."""
    stats = requests.get(server.url + "stats", timeout=10).json()
    return sum(stats["requests"].values())


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, Image.Image):
        return (
            isinstance(b, Image.Image)
            and (a.mode, a.size, a.format) == (b.mode, b.size, b.format)
            and np.array_equal(np.asarray(a), np.asarray(b))
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


# --------------------------------------------------------------------------- bad input

SD = latents(1, 4, 64, 64)
PACKED = latents(1, 4096, 64, dtype=torch.bfloat16)

DecodeCall = Callable[[str], Any]

BAD_DECODES: dict[str, DecodeCall] = {
    "2-d": lambda url: asyncvae.remote_decode(url, latents(4, 64)),
    "1-d": lambda url: asyncvae.remote_decode(url, latents(64)),
    "6-d": lambda url: asyncvae.remote_decode(url, latents(1, 4, 1, 1, 8, 8)),
    "empty": lambda url: asyncvae.remote_decode(url, latents(0, 4, 8, 8)),
    "float64": lambda url: asyncvae.remote_decode(url, SD.double()),
    "int64": lambda url: asyncvae.remote_decode(url, SD.long()),
    "uint8": lambda url: asyncvae.remote_decode(url, SD.to(torch.uint8)),
    "bool": lambda url: asyncvae.remote_decode(url, SD > 0),
    "not-a-tensor": lambda url: asyncvae.remote_decode(url, SD.numpy()),
    "packed-without-height-width": lambda url: asyncvae.remote_decode(
        url, PACKED, output_type="pt"
    ),
    "packed-height-only": lambda url: asyncvae.remote_decode(url, PACKED, height=1024),
    "processor-missing": lambda url: asyncvae.remote_decode(
        url, SD, output_type="pt", return_type="pil"
    ),
    "unknown-output-type": lambda url: asyncvae.remote_decode(url, SD, output_type="np"),
    "unknown-return-type": lambda url: asyncvae.remote_decode(
        url, SD, output_type="pt", return_type="np"
    ),
    "return-mp4-without-output-mp4": lambda url: asyncvae.remote_decode(url, SD, return_type="mp4"),
    "mp4-of-image-latents": lambda url: asyncvae.remote_decode(
        url, SD, output_type="mp4", return_type="mp4"
    ),
    "unknown-image-format": lambda url: asyncvae.remote_decode(url, SD, image_format="webp"),
    "scaling-factor-str": lambda url: asyncvae.remote_decode(url, SD, scaling_factor="0.18215"),
    "scaling-factor-nan": lambda url: asyncvae.remote_decode(url, SD, scaling_factor=float("nan")),
    "height-negative": lambda url: asyncvae.remote_decode(url, PACKED, height=-16, width=1024),
    "input-tensor-type-unknown": lambda url: asyncvae.remote_decode(
        url, SD, input_tensor_type="json"
    ),
    "endpoint-not-a-url": lambda url: asyncvae.remote_decode("not a url", SD),
    "endpoint-ftp": lambda url: asyncvae.remote_decode("ftp://127.0.0.1/", SD),
    "endpoint-no-scheme": lambda url: asyncvae.remote_decode(url.split("://", 1)[1], SD),
    "endpoint-empty": lambda url: asyncvae.remote_decode("", SD),
    "endpoint-none": lambda url: asyncvae.remote_decode(None, SD),  # type: ignore[arg-type]
}

BAD_ENCODES: dict[str, DecodeCall] = {
    "float64": lambda url: asyncvae.remote_encode(url, image_tensor(1, 64, 64, torch.float64)),
    "int64": lambda url: asyncvae.remote_encode(url, image_tensor(1, 64, 64, torch.uint8).long()),
    "2-d": lambda url: asyncvae.remote_encode(url, torch.zeros(64, 64)),
    "4-channels": lambda url: asyncvae.remote_encode(url, torch.zeros(1, 4, 64, 64)),
    "not-multiple-of-8": lambda url: asyncvae.remote_encode(url, torch.zeros(1, 3, 60, 64)),
    "pil-too-small": lambda url: asyncvae.remote_encode(url, picture(7, 7)),
    "not-an-image": lambda url: asyncvae.remote_encode(url, [[0.0] * 8] * 8),
    "numpy-array": lambda url: asyncvae.remote_encode(url, np.zeros((64, 64, 3), np.uint8)),
    "scaling-factor-str": lambda url: asyncvae.remote_encode(
        url, picture(64, 64), scaling_factor="1"
    ),
    "endpoint-not-a-url": lambda url: asyncvae.remote_encode("not a url", picture(64, 64)),
}


@pytest.mark.parametrize(
    "call",
    [pytest.param(f, id=f"decode-{k}") for k, f in BAD_DECODES.items()]
    + [pytest.param(f, id=f"encode-{k}") for k, f in BAD_ENCODES.items()],
)
def test_bad_input_is_input_error_and_sends_nothing(server: LocalServer, call: DecodeCall) -> None:
    before = request_count(server)
    with pytest.raises(asyncvae.InputError) as err:
        call(server.url)
    assert isinstance(err.value, ValueError)
    assert len(str(err.value)) > 20, f"unhelpful message: {err.value!r}"
    assert request_count(server) == before, "a request was sent for bad input"


def test_input_errors_name_the_fix(server: LocalServer) -> None:
    """Messages say what was wrong and how to fix it."""
    with pytest.raises(asyncvae.InputError, match=r"(?i)height.*width"):
        asyncvae.remote_decode(server.url, PACKED)
    with pytest.raises(asyncvae.InputError, match="float64"):
        asyncvae.remote_decode(server.url, SD.double())
    with pytest.raises(asyncvae.InputError, match="processor"):
        asyncvae.remote_decode(server.url, SD, output_type="pt")
    with pytest.raises(asyncvae.InputError, match="webp"):
        asyncvae.remote_decode(server.url, SD, image_format="webp")
    with pytest.raises(asyncvae.InputError, match="not a url"):
        asyncvae.remote_decode("not a url", SD)


def test_the_client_still_works_after_input_errors(server: LocalServer) -> None:
    for call in (BAD_DECODES["float64"], BAD_DECODES["processor-missing"]):
        with pytest.raises(asyncvae.InputError):
            call(server.url)
    assert same(d_decode(server.url, SD, **U8), asyncvae.remote_decode(server.url, SD, **U8))


# --------------------------------------------------------------------------- threads


def test_eight_threads_at_once(server: LocalServer) -> None:
    n = 24
    lats = [latents(1, 4, 8 + 2 * (i % 5), 8 + 2 * (i % 3), seed=i) for i in range(n)]
    imgs = [picture(64, 32 + 8 * (i % 4), seed=i) for i in range(n)]
    want_dec = [d_decode(server.url, x, **U8) for x in lats]
    want_enc = [d_encode(server.url, im, scaling_factor=0.5) for im in imgs]
    start = threading.Barrier(8)

    def work(worker: int) -> list[tuple[int, Any, Any]]:
        start.wait(timeout=30)
        out = []
        for i in range(worker, n, 8):
            out.append(
                (
                    i,
                    asyncvae.remote_decode(server.url, lats[i], **U8),
                    asyncvae.remote_encode(server.url, imgs[i], scaling_factor=0.5),
                )
            )
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(work, range(8)) for r in rs]
    assert sorted(i for i, _, _ in results) == list(range(n))
    for i, dec, enc in results:
        assert same(want_dec[i], dec), f"decode {i} differs"
        assert same(want_enc[i], enc), f"encode {i} differs"


def test_threads_with_errors_do_not_disturb_others(server: LocalServer) -> None:
    def work(i: int) -> Any:
        if i % 2:
            with pytest.raises(asyncvae.InputError):
                asyncvae.remote_decode(server.url, SD.double())
            return None
        return asyncvae.remote_decode(server.url, SD, **U8)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(16)))
    want = d_decode(server.url, SD, **U8)
    assert all(same(want, r) for r in results[::2])


# --------------------------------------------------------------------------- inside a loop


def test_inside_a_running_event_loop_like_jupyter(server: LocalServer) -> None:
    """Jupyter runs cells inside a running loop; the sync functions must not try to
    run (or block on) that loop."""
    img = picture(64, 64, seed=3)

    async def cell() -> tuple[Any, Any, Any, Any]:
        assert asyncio.get_running_loop().is_running()
        dec = asyncvae.remote_decode(server.url, SD, **U8)
        pil = asyncvae.remote_decode(server.url, SD, image_format="png", scaling_factor=0.18215)
        enc = asyncvae.remote_encode(server.url, img)
        batch = asyncvae.remote_decode_batch(server.url, [SD, SD], **U8)
        return dec, pil, enc, batch

    dec, pil, enc, batch = asyncio.run(cell())
    assert same(d_decode(server.url, SD, **U8), dec)
    assert same(d_decode(server.url, SD, image_format="png", scaling_factor=0.18215), pil)
    assert same(d_encode(server.url, img), enc)
    assert same([dec, dec], batch)


def test_inside_two_successive_loops(server: LocalServer) -> None:
    """Each ``asyncio.run`` is a new loop (re-running a notebook); the sync layer's own
    loop and pooled client outlive them."""

    async def cell() -> Any:
        return asyncvae.remote_decode(server.url, SD, **U8)

    first = asyncio.run(cell())
    second = asyncio.run(cell())
    assert same(first, second)


async def test_inside_an_async_test(server: LocalServer) -> None:
    got = asyncvae.remote_decode(server.url, SD, **U8)
    off_loop = await asyncio.to_thread(asyncvae.remote_decode, server.url, SD, **U8)
    assert same(got, off_loop)
    with pytest.raises(asyncvae.InputError):
        asyncvae.remote_decode(server.url, SD.double())


# --------------------------------------------------------------------------- batches


def test_decode_batch_is_ordered_and_equals_one_by_one(
    make_server: Callable[..., LocalServer],
) -> None:
    srv = make_server(replicas=4)
    # very different sizes so that completions come back out of order
    items = [
        latents(1, 4, s, s, seed=i) for i, s in enumerate([64, 8, 48, 8, 32, 16, 64, 8, 24, 8])
    ]
    one_by_one = [asyncvae.remote_decode(srv.url, x, **U8) for x in items]
    got = asyncvae.remote_decode_batch(srv.url, items, **U8)
    assert isinstance(got, list) and len(got) == len(items)
    for i, (a, b) in enumerate(zip(one_by_one, got, strict=True)):
        assert same(a, b), f"item {i} differs"
    assert same(got, asyncvae.remote_decode_batch(srv.url, iter(items), **U8)), (
        "a generator works too"
    )


@pytest.mark.parametrize(
    "opts",
    [
        {"scaling_factor": 0.18215},
        {"output_type": "pt", "partial_postprocess": True, "scaling_factor": 0.18215},
        {"output_type": "pt", "return_type": "pt", "do_scaling": False},
    ],
    ids=["pil-jpg", "pt-pil-pp", "pt-pt"],
)
def test_decode_batch_options_match_remote_decode(
    server: LocalServer, opts: dict[str, Any]
) -> None:
    items = [latents(1, 4, 16, 16, seed=i) for i in range(4)]
    assert same(
        [asyncvae.remote_decode(server.url, x, **opts) for x in items],
        asyncvae.remote_decode_batch(server.url, items, **opts),
    )


def test_batches_of_nothing(server: LocalServer) -> None:
    assert asyncvae.remote_decode_batch(server.url, []) == []
    assert asyncvae.remote_encode_batch(server.url, []) == []
    assert request_count(server) == 0


def test_encode_batch_is_ordered_and_equals_one_by_one(
    make_server: Callable[..., LocalServer],
) -> None:
    srv = make_server(replicas=4)
    items: list[Any] = [
        picture(256, 256, seed=0),
        image_tensor(1, 16, 16, seed=1),
        picture(32, 24, seed=2),
        image_tensor(2, 128, 64, torch.float16, seed=3),
        picture(8, 8, seed=4),
    ]
    one_by_one = [
        asyncvae.remote_encode(srv.url, x, scaling_factor=0.3611, shift_factor=0.1159)
        for x in items
    ]
    got = asyncvae.remote_encode_batch(srv.url, items, scaling_factor=0.3611, shift_factor=0.1159)
    assert len(got) == len(items)
    for i, (a, b) in enumerate(zip(one_by_one, got, strict=True)):
        assert same(a, b), f"item {i} differs"


def test_decode_batch_failing_item_is_item_error_at_its_index(server: LocalServer) -> None:
    items = [latents(1, 4, 16, 16, seed=i) for i in range(5)]
    items[2] = items[2].double()
    got = asyncvae.remote_decode_batch(server.url, items, **U8)
    assert len(got) == 5
    err = got[2]
    assert isinstance(err, asyncvae.ItemError)
    assert err.index == 2 and isinstance(err.error, asyncvae.InputError)
    for i in (0, 1, 3, 4):
        assert same(asyncvae.remote_decode(server.url, items[i], **U8), got[i]), f"item {i} differs"
    server.reset_stats()
    asyncvae.remote_decode_batch(server.url, items, **U8)
    assert request_count(server) == 4, "the invalid item must not be sent"


def test_decode_batch_item_rejected_by_the_server(server: LocalServer) -> None:
    """A failure only the server sees (packed latents whose token count disagrees with
    height/width) lands at its index as the endpoint's RuntimeError."""
    hw = {"height": 512, "width": 512}
    items = [
        latents(1, 4, 16, 16, seed=1),
        latents(1, 4096, 64, dtype=torch.bfloat16),
        latents(1, 1024, 64, seed=2),
    ]
    got = asyncvae.remote_decode_batch(server.url, items, **U8, **hw)
    assert isinstance(got[1], asyncvae.ItemError) and got[1].index == 1
    assert isinstance(got[1].error, RuntimeError)
    assert isinstance(got[1].error.args[0], dict) and "tokens" in got[1].error.args[0]["error"]
    assert same(asyncvae.remote_decode(server.url, items[0], **U8, **hw), got[0])
    assert same(asyncvae.remote_decode(server.url, items[2], **U8, **hw), got[2])


def test_decode_batch_on_error_raise(server: LocalServer) -> None:
    items = [SD, SD.double(), SD]
    with pytest.raises(asyncvae.InputError):
        asyncvae.remote_decode_batch(server.url, items, on_error="raise", **U8)


def test_encode_batch_failing_item_is_item_error_at_its_index(server: LocalServer) -> None:
    items: list[Any] = [
        picture(64, 64, seed=0),
        image_tensor(1, 64, 64, torch.float64),
        image_tensor(1, 64, 64),
        torch.zeros(1, 3, 60, 64),
    ]
    got = asyncvae.remote_encode_batch(server.url, items, scaling_factor=0.5)
    assert [type(g).__name__ for g in got] == ["Tensor", "ItemError", "Tensor", "ItemError"]
    assert got[1].index == 1 and isinstance(got[1].error, asyncvae.InputError)
    assert got[3].index == 3 and isinstance(got[3].error, asyncvae.InputError)
    assert same(asyncvae.remote_encode(server.url, items[0], scaling_factor=0.5), got[0])
    assert same(asyncvae.remote_encode(server.url, items[2], scaling_factor=0.5), got[2])
