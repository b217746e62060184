"""Running the reference server: in the current loop, blocking (the CLI), or on a
background thread (tests, notebooks, examples)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Any

from aiohttp import web

from .app import STATE_KEY, Faults, ServerConfig, ServerState, create_app
from .model import VAEModel

__all__ = ["LocalServer", "RunningServer", "run_server", "start_server"]

LISTENING_PREFIX = "asyncvae serve: listening on "


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

    async def close(self) -> None:
        """Stop listening, close every connection, release the thread pool."""
        await self.runner.cleanup()


async def start_server(
    config: ServerConfig | None = None, model: VAEModel | None = None
) -> RunningServer:
    """Start the reference server in the running event loop; returns once it is bound."""
    config = config or ServerConfig()
    app = create_app(config, model)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
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


def run_server(config: ServerConfig | None = None, model: VAEModel | None = None) -> int:
    """Serve until SIGINT/SIGTERM (blocking). Prints one line
    ``asyncvae serve: listening on http://HOST:PORT/`` to stdout once bound."""

    async def main() -> None:
        server = await start_server(config, model)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        print(f"{LISTENING_PREFIX}{server.url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


class LocalServer:
    """The reference server on its own event loop in a daemon thread, on 127.0.0.1
    and an ephemeral port unless the config says otherwise.

    ::

        with LocalServer(ServerConfig(replicas=2)) as srv:
            remote_decode(srv.url, latents, ...)
    """

    def __init__(self, config: ServerConfig | None = None, model: VAEModel | None = None) -> None:
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
        """Swap the fault configuration at runtime (thread-safe)."""
        self.state.set_faults(faults)

    def __repr__(self) -> str:
        where = self._server.url if self._server else "stopped"
        return f"LocalServer({where})"
