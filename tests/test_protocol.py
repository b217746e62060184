"""The pure wire layer: request building matches the reference client byte for byte,
response headers are checked before anything is allocated."""

from __future__ import annotations

import email.utils
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvae import InputError, ProtocolError, protocol
from asyncvae.protocol import DecodeOptions


def reference_params(tensor, **kw):
    """What diffusers' prepare_decode sends (as requests would serialise it)."""
    from diffusers.utils.remote_utils import prepare_decode

    out = prepare_decode(tensor, **kw)
    pairs = []
    for k, v in out["params"].items():
        for x in (v if isinstance(v, list) else [v]):
            pairs.append((k, str(x)))
    return tuple(pairs), out["headers"], out["data"]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"scaling_factor": 0.18215},
        {"scaling_factor": 0.3611, "shift_factor": 0.1159},
        {"shift_factor": 0.1159},
        {"do_scaling": False, "scaling_factor": 0.5},
        {"output_type": "pt", "partial_postprocess": True},
        {"output_type": "mp4"},
        {"image_format": "png"},
        {"height": 1024, "width": 1024},
        {"processor": object(), "output_type": "pil"},
    ],
)
def test_decode_request_matches_reference_client(kw):
    t = torch.randn(1, 4, 8, 8).to(torch.float16)
    params, headers, data = reference_params(t, **kw)
    opts = DecodeOptions(**{k: v for k, v in kw.items()})
    req = protocol.WireRequest(opts.params(t.shape, "float16"), {}, b"", "tensor")
    assert req.params == params
    assert opts.accept == headers["Accept"]
    assert bytes(protocol.tensor_body(t)) == data


def test_body_of_non_contiguous_and_bf16_tensor_is_logical_values():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    tt = t.transpose(1, 2)
    assert bytes(protocol.tensor_body(tt)) == tt.contiguous().numpy().tobytes()
    b = torch.randn(2, 3, dtype=torch.bfloat16)
    assert bytes(protocol.tensor_body(b)) == bytes(b.view(torch.int16).numpy().tobytes())


def test_zero_copy_for_contiguous_tensor():
    t = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    view = protocol.tensor_body(t)
    t[0, 0, 0, 0] = 1.0
    assert bytes(view[:2]) == t[0, 0, 0, 0:1].numpy().tobytes()  # shares memory


@pytest.mark.parametrize(
    "tensor, kw, match",
    [
        (torch.zeros(4, 8, 8), {}, "height"),
        (torch.zeros(1, 4, 8), {}, "height"),  # 3-D packed without height/width
        (torch.zeros(8, 8), {}, "4-D"),
        (torch.zeros(1, 4, 8, 8, dtype=torch.float64), {}, "float64"),
        (torch.zeros(1, 4, 0, 8), {}, "empty"),
        (torch.zeros(1, 4, 8, 8), {"output_type": "webp"}, "output_type"),
        (torch.zeros(1, 4, 8, 8), {"image_format": "gif"}, "image_format"),
        (torch.zeros(1, 4, 8, 8), {"output_type": "pt"}, "processor"),
        (torch.zeros(1, 4, 8, 8), {"output_type": "mp4"}, "5-D"),
        (torch.zeros(1, 4, 8, 8), {"return_type": "mp4"}, "mp4"),
        (torch.zeros(1, 4, 8, 8), {"height": 64}, "both height and width"),
        (torch.zeros(1, 4, 8, 8), {"scaling_factor": float("nan")}, "finite"),
        ([1, 2, 3], {}, "torch.Tensor"),
    ],
)
def test_bad_decode_input_is_input_error(tensor, kw, match):
    with pytest.raises(InputError, match=match):
        protocol.decode_request(tensor, DecodeOptions(**kw))


def test_bad_encode_input_is_input_error():
    with pytest.raises(InputError, match="PIL"):
        protocol.encode_request("not an image")
    with pytest.raises(InputError, match="multiples of 8"):
        protocol.encode_request(torch.zeros(1, 3, 10, 16))
    with pytest.raises(InputError, match=r"\[3,H,W\]"):
        protocol.encode_request(torch.zeros(1, 4, 16, 16))


def test_parse_tensor_headers_checks_before_allocating():
    spec = protocol.parse_tensor_headers({"shape": "[1, 3, 8, 8]", "dtype": "float16"})
    assert spec.nbytes == 384 and spec.torch_dtype is torch.float16
    with pytest.raises(ProtocolError, match="lacks the dtype"):
        protocol.parse_tensor_headers({"shape": "[1]"})
    with pytest.raises(ProtocolError, match="JSON"):
        protocol.parse_tensor_headers({"shape": "1x3", "dtype": "uint8"})
    with pytest.raises(ProtocolError, match="not one of"):
        protocol.parse_tensor_headers({"shape": "[1]", "dtype": "complex64"})
    with pytest.raises(ProtocolError, match="max_response_bytes"):
        protocol.parse_tensor_headers({"shape": "[100000, 100000, 100000]", "dtype": "float32"}, max_bytes=1 << 30)
    with pytest.raises(ProtocolError, match="disagrees"):
        protocol.check_body_length(384, 100)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.one_of(st.text(max_size=40), st.lists(st.integers(-10, 10**12), max_size=10).map(str)),
    dtype=st.one_of(st.sampled_from(list(protocol.DTYPES)), st.text(max_size=12)),
)
def test_fuzzed_headers_raise_protocol_error_or_stay_under_limit(shape, dtype):
    limit = 1 << 20
    try:
        spec = protocol.parse_tensor_headers({"shape": shape, "dtype": dtype}, max_bytes=limit)
    except ProtocolError:
        return
    assert spec.nbytes <= limit and all(s >= 0 for s in spec.shape)


def test_retry_after_seconds_and_http_date():
    assert protocol.parse_retry_after("3") == 3.0
    assert protocol.parse_retry_after("garbage") is None
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert 8.5 <= protocol.parse_retry_after(date, now=now) <= 10.5
    assert protocol.parse_retry_after("-5") == 0.0


def test_error_body_json_or_status_text():
    assert protocol.error_body(400, b'{"error": "bad"}') == {"error": "bad"}
    html = protocol.error_body(502, b"<html><body>502 Bad Gateway</body></html>")
    assert html["status"] == 502 and "Bad Gateway" in html["error"]
    assert "empty body" in protocol.error_body(504, b"")["error"]
