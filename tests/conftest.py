"""Shared fixtures: the reference server in-process (``server``, ``make_server``) and as
a subprocess (``serve_subprocess``), all on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncvae.server import LocalServer, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "asyncvae serve: listening on "

#: The command that starts the server (``python -m asyncvae serve``).
SERVE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "asyncvae", "serve")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """A started :class:`LocalServer` with the default config (stopped afterwards)."""
    with LocalServer(ServerConfig()) as srv:
        yield srv


@pytest.fixture
def make_server() -> Iterator[Callable[..., LocalServer]]:
    """Factory: ``make_server(**ServerConfig kwargs, model=None) -> started LocalServer``;
    every server made is stopped at teardown."""
    made: list[LocalServer] = []

    def make(model: Any = None, **kwargs: Any) -> LocalServer:
        srv = LocalServer(ServerConfig(**kwargs), model=model).start()
        made.append(srv)
        return srv

    yield make
    for srv in reversed(made):
        srv.stop()


class ServeProcess:
    """A ``python -m asyncvae serve`` subprocess on an ephemeral (or given) port."""

    def __init__(self, args: list[str], command: tuple[str, ...] = SERVE_COMMAND, timeout: float = 30.0):
        self.args = list(args)
        self.command = command
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = 0
        self.output: list[str] = []

    def start(self, port: int = 0) -> ServeProcess:
        """Start the process and wait for its ``listening on`` line."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [*self.command, "--port", str(port), *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        found: list[str] = []
        done = threading.Event()
        proc = self.proc

        def reader() -> None:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    self.output.append(line)
                    if not found and line.startswith(LISTENING):
                        found.append(line[len(LISTENING) :].strip())
                        done.set()
            except (ValueError, OSError):  # the pipe was closed by kill()
                pass
            finally:
                done.set()

        threading.Thread(target=reader, daemon=True).start()
        done.wait(self.timeout)
        if not found:
            self.kill()
            raise RuntimeError(f"{' '.join(cmd)} did not report its URL:\n{''.join(self.output)}")
        self.url = found[0]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """Kill the process (SIGKILL, like a crashed replica) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            with contextlib.suppress(Exception):
                self.proc.stdout.close()

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful shutdown); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_pipe()
        return self.proc.returncode

    def restart(self, attempts: int = 50) -> ServeProcess:
        """Kill and start again on the same port (retrying while the port is busy)."""
        self.kill()
        port = self.port
        for i in range(attempts):
            try:
                return self.start(port)
            except RuntimeError:
                if i == attempts - 1:
                    raise
                time.sleep(0.1)
        return self


@pytest.fixture
def serve_subprocess() -> Iterator[Callable[..., ServeProcess]]:
    """Factory: ``serve_subprocess(*cli_args) -> ServeProcess`` (``.url``, ``.proc``,
    ``.kill()``, ``.restart()``); every process is killed at teardown."""
    procs: list[ServeProcess] = []

    def start(*args: str, command: tuple[str, ...] = SERVE_COMMAND) -> ServeProcess:
        sp = ServeProcess(list(args), command=command)
        procs.append(sp)
        return sp.start()

    yield start
    for sp in procs:
        sp.kill()


class RawServer:
    """``tests/rawserver.py`` in its own process: answers every request with the raw
    bytes last given to :meth:`set` (free to lie about anything), optionally in two
    TCP segments. Its own process, so its allocations never count as the client's."""

    def __init__(self) -> None:
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def set(self, raw: bytes, *, split: int = 0, pause: float = 0.0) -> None:
        """The answer of the next requests (``split``: bytes sent before a ``pause``)."""
        req = urllib.request.Request(
            f"{self.url}__answer?split={split}&pause={pause}", data=raw, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 204

    def start(self) -> RawServer:
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "rawserver.py")], stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        assert line.startswith("rawserver: listening on "), line
        self.url = line.split(" on ", 1)[1].strip()
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()


@pytest.fixture(scope="module")
def raw_server() -> Iterator[RawServer]:
    """A :class:`RawServer` for the module."""
    srv = RawServer().start()
    yield srv
    srv.stop()
