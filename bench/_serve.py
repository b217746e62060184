"""The endpoint a benchmark drives, in its own process on an ephemeral port — one
implementation for every script in ``bench/``.

``Server(args)`` runs ``python -m asyncvae serve --port 0 ARGS``; ``Server(command=[...])``
any other command that prints ``... listening on http://HOST:PORT/`` (e.g.
``bench/fastserver.py``). Its output is drained by a thread, so a chatty server never
blocks on a full pipe.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LISTENING = re.compile(r"listening on (http://\S+)")


class Server:
    def __init__(self, args: Sequence[str] = (), *, command: Sequence[str] | None = None,
                 start_timeout: float = 180.0) -> None:
        cmd = list(command) if command is not None else [
            sys.executable, "-m", "asyncvae", "serve", "--port", "0", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        found: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if not found:
                    m = _LISTENING.search(line)
                    if m:
                        found.append(m.group(1))
                        ready.set()
            ready.set()  # it exited

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(start_timeout)
        if not found:
            self.stop()
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")
        self.url = found[0]  # ends with "/"

    def stats(self) -> dict[str, Any]:
        """The server's ``/stats`` (raises when it can't be read)."""
        with urllib.request.urlopen(self.url.rstrip("/") + "/stats", timeout=10) as r:
            return dict(json.load(r))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
