"""The reference endpoint as an ``aiohttp.web`` application.

Routes:

=========================  ===================================================================
``POST /``                 decode when the query carries ``output_type``, else encode
``POST /decode``           decode
``POST /encode``           encode
``GET /health``            liveness: 200 ``{"status": "ok"}`` while the process serves
``GET /ready``             readiness: 200 once the model is loaded, 503 while it loads or drains
``GET /stats``             counters (JSON)
``GET /metrics``           Prometheus text exposition (:mod:`asyncvae.server.metrics`)
``POST /stats/reset``      admin: zero the counters
``POST /faults``           admin: JSON of :class:`Faults` fields; swaps the fault configuration
=========================  ===================================================================

With a token configured every route but ``/health`` and ``/ready`` needs it
(:mod:`asyncvae.server.auth`); admin routes answer only with fault flags or
``admin=True``.

A decode/encode request is refused *before its body is read* when the model is still
loading (503 + ``Retry-After``), the server is draining (503 + ``Retry-After``) or
``max_queue`` requests already wait (429 + ``Retry-After``). Otherwise it is read,
validated into a job (:mod:`asyncvae.server.codec`) and queued for a replica slot
(:mod:`asyncvae.server.batching`), where same-shape jobs may share a forward pass.
Every wire detail comes from :mod:`asyncvae.protocol`.

- ``chunked`` streams every 200 body with chunked transfer encoding (64 KiB writes).
- ``Retry-After`` is written as an integer when the configured value is whole,
  else as a decimal (our client accepts it; it makes fast tests possible).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import protocol as P
from ..errors import InputError
from .auth import auth_middleware, require_admin
from .codec import HTTPFail, Result, decode_job, encode_job, encode_mp4
from .config import FAULT_KINDS, Faults, ServerConfig
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .state import ModelSpec, ServerState, retry_after_value

__all__ = [
    "FAULT_KINDS",
    "STATE_KEY",
    "Faults",
    "HTTPFail",
    "ServerConfig",
    "ServerState",
    "create_app",
    "encode_mp4",
]

log = logging.getLogger("asyncvae.server")

CHUNK = 64 * 1024
HTML_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)

STATE_KEY: web.AppKey[ServerState] = web.AppKey("asyncvae_state", ServerState)


def json_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error answer ``{"error": message}`` with a JSON content type."""
    h = {P.HEADER_CONTENT_TYPE: P.CONTENT_TYPE_JSON, **(headers or {})}
    return web.Response(status=status, body=P.error_json(message), headers=h)


# --------------------------------------------------------------------------- sending


def _spoil_headers(headers: dict[str, str], pick: float) -> dict[str, str]:
    h = dict(headers)
    if pick < 1 / 3:
        shape = json.loads(h[P.HEADER_SHAPE])
        shape[0] = shape[0] + 1
        h[P.HEADER_SHAPE] = json.dumps(shape)
    elif pick < 2 / 3:
        h.pop(P.HEADER_DTYPE, None)
    else:
        h[P.HEADER_SHAPE] = "x".join(str(s) for s in json.loads(h[P.HEADER_SHAPE]))
    return h


async def _send(
    request: web.Request, state: ServerState, result: Result, faults: Faults, hit: set[str]
) -> web.StreamResponse:
    headers = dict(result.headers)
    body = result.body
    stats = state.stats
    if "fault_bad_headers" in hit and result.tensor:
        stats.count("faults", "fault_bad_headers")
        headers = _spoil_headers(headers, state.random())
    broken = next((k for k in ("fault_reset", "fault_truncate") if k in hit), None)
    if broken is not None and len(body) >= 2:
        stats.count("faults", broken)
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            if broken == "fault_reset":
                transport.abort()
            else:
                transport.close()
        return resp
    if faults.chunked:
        resp = web.StreamResponse(status=200, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        view = memoryview(body)
        for i in range(0, len(body), CHUNK):
            await resp.write(view[i : i + CHUNK])
        await resp.write_eof()
        return resp
    return web.Response(status=200, body=body, headers=headers)


async def _read_body(request: web.Request, state: ServerState) -> bytes:
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise HTTPFail(
            413, f"request body of {request.content_length} bytes is over max_body_bytes={limit}"
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HTTPFail(413, f"request body is over max_body_bytes={limit}") from None


def _refuse_unready(state: ServerState) -> None:
    """503 + Retry-After while loading or draining; 500 when the model failed to load."""
    retry = {P.HEADER_RETRY_AFTER: retry_after_value(state.config.busy_retry_after)}
    if state.draining:
        raise HTTPFail(
            503,
            "503 Service Unavailable: this server is shutting down; retry (another replica)",
            retry,
        )
    if state.model is None:
        if state.load_error is not None:
            raise HTTPFail(500, f"the model failed to load: {state.load_error}")
        raise HTTPFail(503, "503 Service Unavailable: the model is still loading; retry later", retry)


async def _handle(request: web.Request, op: str | None) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    query = request.query
    if op is None:
        op = "decode" if P.is_decode(query) else "encode"
    stats = state.stats
    stats.count("requests", op)
    stats.add("in_flight", 1)
    try:
        _refuse_unready(state)
        ticket = state.admit()
        try:
            body = await _read_body(request, state)
            faults, hit = state.draw_faults()
            if "fault_503" in hit:
                stats.count("faults", "fault_503")
                return json_response(503, "503 Service Unavailable")
            if "fault_429" in hit:
                stats.count("faults", "fault_429")
                return json_response(
                    429,
                    "429 Too Many Requests: rate limit exceeded, retry later",
                    {P.HEADER_RETRY_AFTER: retry_after_value(faults.retry_after)},
                )
            if "fault_502_html" in hit:
                stats.count("faults", "fault_502_html")
                return web.Response(status=502, text=HTML_502, content_type="text/html")
            if "fault_stall" in hit:
                stats.count("faults", "fault_stall")
                await asyncio.sleep(faults.stall_seconds)
            model = state.model
            assert model is not None
            limit = state.config.max_output_pixels
            if op == "decode":
                accept = request.headers.get(P.HEADER_ACCEPT, "")
                job = decode_job(model, query, body, accept, limit)
            else:
                job = encode_job(model, query, body, limit)
            result = await state.run(job, ticket)
        finally:
            ticket.done()
        return await _send(request, state, result, faults, hit)
    finally:
        stats.add("in_flight", -1)


# --------------------------------------------------------------------------- app


def _op_label(request: web.Request) -> str:
    path = request.path
    if path in ("/decode", "/encode"):
        return path[1:]
    if path == "/" and request.method == "POST":
        return "decode" if P.is_decode(request.query) else "encode"
    return "other"


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answers JSON ``{"error": ...}``: 400 for bad input, the status of
    an :class:`HTTPFail`/HTTP exception, 500 for anything unexpected. Counts statuses
    (``/stats``) and requests and latencies (``/metrics``)."""
    state = request.app[STATE_KEY]
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
    except InputError as e:
        resp = json_response(400, str(e))
    except HTTPFail as e:
        resp = json_response(e.status, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        resp = json_response(e.status, e.text or e.reason or f"HTTP {e.status}", None)
        for k, v in e.headers.items():
            if k.lower() not in ("content-type", "content-length"):
                resp.headers[k] = v
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        log.exception("unexpected error handling %s %s", request.method, request.path_qs)
        resp = json_response(500, f"internal server error: {type(e).__name__}: {e}")
    state.stats.count("responses", str(resp.status))
    op = _op_label(request)
    state.metrics.observe_request(op, resp.status, time.perf_counter() - t0 if op != "other" else None)
    return resp


async def _decode(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "decode")


async def _encode(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "encode")


async def _root(request: web.Request) -> web.StreamResponse:
    return await _handle(request, None)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.ready:
        assert state.model is not None
        return web.json_response({"status": "ready", "model": state.model.name})
    if state.draining:
        status = "draining"
    elif state.load_error is not None:
        status = "failed"
    else:
        status = "loading"
    doc: dict[str, Any] = {"status": status}
    if state.load_error is not None:
        doc["error"] = state.load_error
    return web.json_response(
        doc,
        status=503,
        headers={P.HEADER_RETRY_AFTER: retry_after_value(state.config.busy_retry_after)},
    )


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].snapshot())


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={P.HEADER_CONTENT_TYPE: METRICS_CONTENT_TYPE})


async def _stats_reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    require_admin(state.config.admin_enabled, "POST /stats/reset")
    state.stats.reset()
    return web.json_response({"status": "ok"})


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    require_admin(state.config.admin_enabled, "POST /faults")
    try:
        data = await request.json()
    except ValueError:
        raise InputError("POST /faults needs a JSON object of Faults fields") from None
    if not isinstance(data, dict):
        raise InputError("POST /faults needs a JSON object of Faults fields")
    faults = Faults.from_dict(data)
    state.set_faults(faults)
    return web.json_response(dataclasses.asdict(faults))


def create_app(config: ServerConfig | None = None, model: ModelSpec = None) -> web.Application:
    """The reference endpoint as an ``aiohttp.web.Application`` (state under ``STATE_KEY``).

    ``model``: a :class:`VAEModel`, a function that loads one (called on a thread at
    start-up; the server answers 503 until it returns), or None for ``config.model``.
    """
    config = config or ServerConfig()
    state = ServerState(config, model)
    middlewares: list[Any] = [_errors]
    if config.token is not None:
        middlewares.append(auth_middleware(config.token))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[STATE_KEY] = state
    app.router.add_post("/", _root)
    app.router.add_post("/decode", _decode)
    app.router.add_post("/encode", _encode)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/stats/reset", _stats_reset)
    app.router.add_post("/faults", _set_faults)

    async def _startup(app: web.Application) -> None:
        await state.start()

    async def _shutdown(app: web.Application) -> None:
        await state.close()

    app.on_startup.append(_startup)
    app.on_cleanup.append(_shutdown)
    return app

