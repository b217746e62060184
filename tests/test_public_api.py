"""Pin the curated public namespace (like trio's export tests): a name added or removed
here is a decision, not an accident."""

import inspect

import asyncvae

EXPECTED = {
    "AsyncVAEError", "Client", "ClientClosedError", "EndpointError", "InputError", "ItemError",
    "Limits", "ProtocolError", "Retry", "RetryExhausted", "Stats", "Timeout", "TransportError",
    "__version__", "configure", "remote_decode", "remote_decode_batch", "remote_encode",
    "remote_encode_batch", "shutdown",
}

#: The transport seam: its own curated namespace.
EXPECTED_TRANSPORT = {"Request", "Response", "Timeouts", "Transport"}


def test_exports_are_pinned():
    assert set(asyncvae.__all__) == EXPECTED
    for name in asyncvae.__all__:
        assert hasattr(asyncvae, name), name
    import importlib

    assert set(importlib.import_module("asyncvae.transport").__all__) == EXPECTED_TRANSPORT


def test_documented_signatures_match_diffusers_exactly():
    sig = inspect.signature(asyncvae.remote_decode)
    assert [(p.name, p.default) for p in sig.parameters.values()] == [
        ("endpoint", inspect.Parameter.empty), ("tensor", inspect.Parameter.empty),
        ("processor", None), ("do_scaling", True), ("scaling_factor", None), ("shift_factor", None),
        ("output_type", "pil"), ("return_type", "pil"), ("image_format", "jpg"),
        ("partial_postprocess", False), ("input_tensor_type", "binary"),
        ("output_tensor_type", "binary"), ("height", None), ("width", None),
    ]
    sig = inspect.signature(asyncvae.remote_encode)
    assert [(p.name, p.default) for p in sig.parameters.values()] == [
        ("endpoint", inspect.Parameter.empty), ("image", inspect.Parameter.empty),
        ("scaling_factor", None), ("shift_factor", None),
    ]


def test_error_hierarchy():
    assert issubclass(asyncvae.InputError, ValueError)
    assert issubclass(asyncvae.EndpointError, RuntimeError)
    assert issubclass(asyncvae.RetryExhausted, RuntimeError)
    for cls in (asyncvae.InputError, asyncvae.EndpointError, asyncvae.ProtocolError,
                asyncvae.RetryExhausted, asyncvae.TransportError, asyncvae.ClientClosedError):
        assert issubclass(cls, asyncvae.AsyncVAEError)


def test_public_callables_are_documented_and_typed():
    for name in asyncvae.__all__:
        obj = getattr(asyncvae, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"
    for fn in (asyncvae.remote_decode, asyncvae.remote_encode, asyncvae.remote_decode_batch,
               asyncvae.remote_encode_batch, asyncvae.Client.decode, asyncvae.Client.encode,
               asyncvae.Client.decode_many, asyncvae.Client.encode_many):
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, fn
