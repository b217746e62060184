"""Running the reference server: in the current loop, blocking (the CLI), or on a
background thread (tests, notebooks, examples).

Graceful shutdown (:meth:`RunningServer.drain`, what SIGTERM/SIGINT do in
:func:`run_server`): stop listening, mark the server not ready (``/ready`` 503, new
requests on open connections 503 + ``Connection: close``), let every request in flight
finish up to ``drain_timeout`` seconds, then close. A second signal ends the drain at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .app import STATE_KEY, Faults, ServerConfig, ServerState, create_app
from .state import ModelSpec

__all__ = ["LocalServer", "RunningServer", "run_server", "start_server"]

LISTENING_PREFIX = "asyncvae serve: listening on "
#: aiohttp access log line: peer, time, request line, status, bytes, seconds.
ACCESS_LOG_FORMAT = '%a %t "%r" %s %b %Tfs'
access_log = logging.getLogger("asyncvae.access")


class RunningServer:
    """A server started by :func:`start_server` in the current event loop."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def state(self) -> ServerState:
        """The app's shared state (stats, faults, model)."""
        return self.runner.app[STATE_KEY]

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` (the endpoint URL for decode or encode)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def drain(self, timeout: float, force: asyncio.Event | None = None) -> int:
        """Stop accepting connections and wait up to ``timeout`` seconds (or until
        ``force`` is set) for the requests in flight; returns how many are left."""
        state = self.state
        state.draining = True
        for site in list(self.runner.sites):
            await site.stop()
        server = self.runner.server
        if server is not None:
            server.pre_shutdown()  # idle keep-alive connections close; busy ones after their answer
        deadline = time.monotonic() + timeout
        while state.stats.in_flight > 0 and time.monotonic() < deadline:
            if force is not None and force.is_set():
                break
            await asyncio.sleep(0.01)
        return state.stats.in_flight

    async def close(self) -> None:
        """Stop listening, close every connection, release the thread pool."""
        await self.runner.cleanup()


async def start_server(config: ServerConfig | None = None, model: ModelSpec = None) -> RunningServer:
    """Start the reference server in the running event loop; returns once it is bound.

    ``model``: a :class:`~asyncvae.server.VAEModel`, a function that loads one (run on a
    thread; the server answers 503 until it returns), or None for ``config.model``.
    """
    config = config or ServerConfig()
    app = create_app(config, model)
    runner = web.AppRunner(
        app,
        access_log=access_log if config.access_log else None,
        access_log_format=ACCESS_LOG_FORMAT,
        shutdown_timeout=config.shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, config.host, config.port, reuse_address=True, reuse_port=config.reuse_port or None
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = config.port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            port = int(addr[1])
            break
    return RunningServer(runner, config.host, port)


def _say(line: str, stream: Any = None) -> None:
    """Write one whole line in one call (a model loading on another thread may log to
    the same pipe; ``print`` writes the text and the newline separately)."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def _log_access_to_stderr() -> None:
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


async def serve(config: ServerConfig, model: ModelSpec = None) -> int:
    """Serve in the running loop until SIGINT/SIGTERM, then drain; returns the exit
    status (0, or 1 when the model failed to load)."""
    server = await start_server(config, model)
    state = server.state
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
    _say(f"{LISTENING_PREFIX}{server.url}")
    loaded = asyncio.create_task(state.wait_loaded())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({loaded, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if loaded.done():
            if not loaded.result():
                _say(f"asyncvae serve: error: {state.load_error}", sys.stderr)
                return 1
            if state.load_seconds is not None and state.model is not None:
                _say(
                    f"asyncvae serve: model ready: {state.model.name}, loaded in "
                    f"{state.load_seconds:.1f} s"
                )
        await stopped
        busy = state.stats.in_flight
        _say(
            f"asyncvae serve: shutting down: {busy} request(s) in flight, draining for up to "
            f"{config.drain_timeout:g} s (signal again to stop now)",
            sys.stderr,
        )
        left = await server.drain(config.drain_timeout, force)
        if left:
            _say(
                f"asyncvae serve: {left} request(s) still running at the drain deadline were cancelled",
                sys.stderr,
            )
        return 0
    finally:
        loaded.cancel()
        stopped.cancel()
        await server.close()


def run_server(config: ServerConfig | None = None, model: ModelSpec = None) -> int:
    """Serve until SIGINT/SIGTERM (blocking), then drain gracefully. Prints one line
    ``asyncvae serve: listening on http://HOST:PORT/`` to stdout once bound (the model
    may still be loading: poll ``GET /ready``); returns the exit status."""
    config = config or ServerConfig()
    if config.access_log:
        _log_access_to_stderr()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve(config, model))
    except KeyboardInterrupt:
        return 130


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when importable (less CPU per request for the HTTP layer), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return None
    return uvloop.new_event_loop


class LocalServer:
    """The reference server on its own event loop in a daemon thread, on 127.0.0.1
    and an ephemeral port unless the config says otherwise.

    ::

        with LocalServer(ServerConfig(replicas=2)) as srv:
            remote_decode(srv.url, latents, ...)
    """

    def __init__(self, config: ServerConfig | None = None, model: ModelSpec = None) -> None:
        self.config = config or ServerConfig()
        self.model = model
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: RunningServer | None = None

    # ---- lifecycle
    def start(self) -> LocalServer:
        """Start the thread and wait until the port is bound (raises what startup raised)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(start_server(self.config, self.model))
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="asyncvae-local-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._loop = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop the loop and join the thread (idempotent)."""
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None:
            return
        if server is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(server.close(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- facts
    @property
    def running(self) -> RunningServer:
        if self._server is None:
            raise RuntimeError(
                "LocalServer is not started; call start() or use it as a context manager"
            )
        return self._server

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/``."""
        return self.running.url

    @property
    def decode_url(self) -> str:
        return self.url + "decode"

    @property
    def encode_url(self) -> str:
        return self.url + "encode"

    @property
    def state(self) -> ServerState:
        return self.running.state

    def stats(self) -> dict[str, Any]:
        """The counters of ``GET /stats``."""
        return self.state.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.state.stats.reset()

    def set_faults(self, faults: Faults) -> None:
        """Swap the fault configuration at runtime (thread-safe; in-process, so always
        allowed, whatever the HTTP admin routes say)."""
        self.state.set_faults(faults)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the model is loaded; raises :class:`RuntimeError` with the reason
        when it failed to load, :class:`TimeoutError` after ``timeout`` seconds."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("LocalServer is not started")
        fut = asyncio.run_coroutine_threadsafe(self.state.wait_loaded(), loop)
        if not fut.result(timeout):
            raise RuntimeError(f"the model failed to load: {self.state.load_error}")

    def __repr__(self) -> str:
        where = self._server.url if self._server else "stopped"
        return f"LocalServer({where})"
